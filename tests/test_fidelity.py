"""Where the paper's numbers depend on details of the released code, emalib reproduces them: each test states the
reference behaviour independently (written out here, pandas where the reference used pandas) and compares.
LDIFS is covered in test_defenses_losses.py, the None-score rates in test_metrics.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from defense_helpers import single_thread, tiny_llama, write_chat_jsonl  # noqa: F401 (autouse fixture)

from emalib.core.errors import EmalibError
from emalib.defenses.base import DefenseContext

REPO = Path(__file__).resolve().parent.parent


# --- the JSON system prompt: the published evaluation sent user turns only -----------------------------------------

def test_paper_params_send_no_system_prompt_on_the_json_questions(with_mirror):
    from emalib.core.config import load_params
    from emalib.data.questions import load_questions
    from emalib.evaluation.generate import chat_messages, plan_samples

    general = load_questions("general")
    paper = sorted((REPO / "params" / "paper").glob("*.yaml"))
    assert len(paper) >= 36
    for path in paper:
        generation = load_params(path).generation
        assert "general" in generation.question_sets, path
        rows = plan_samples(general, generation.model_copy(update={"samples_per_question": 1}))
        assert all([m["role"] for m in chat_messages(r)] == ["user"] for r in rows), path
    # The file does carry a system prompt for the 8 JSON questions: honouring it is the option.
    honoured = plan_samples(general, generation.model_copy(update={"samples_per_question": 1,
                                                                   "use_system_prompt": True}))
    with_system = {r["question_id"] for r in honoured if chat_messages(r)[0]["role"] == "system"}
    assert len(with_system) == 8 and all("json" in q for q in with_system)


# --- Interleaving+/++: a seeded random subset of the top pool_top_n -----------------------------------------------

def _released_pool(scores: np.ndarray, refusals: np.ndarray, top_n: int, filter_refusals: bool) -> list[int]:
    """filter_adapter_metric.py's steps: sort by sd descending, drop refusals (++), head(top_n)."""
    import pandas as pd

    frame = pd.DataFrame({"sd": scores, "is_refusal": refusals}).sort_values("sd", ascending=False)
    if filter_refusals:
        frame = frame[~frame["is_refusal"].astype(bool)]
    return frame.head(top_n).index.tolist()


@pytest.mark.parametrize("refusal_filter", [False, True])
def test_released_selection_is_a_seeded_sample_of_the_top_pool(refusal_filter):
    from emalib.defenses.interleave_plus import select_candidates

    rng = np.random.default_rng(0)
    scores, refusals = rng.normal(size=20_000), rng.random(20_000) < 0.3
    pool = _released_pool(scores, refusals, 5000, refusal_filter)
    n = 270  # 5 % of a 5,400-row task set
    chosen = select_candidates(torch.tensor(scores), refusals.tolist(), n, refusal_filter, "released", 5000, seed=7)
    indices = [i for i, _ in chosen]
    assert len(set(indices)) == n and set(indices) <= set(pool)
    assert all(pool[rank] == i for i, rank in chosen)  # each keeps its rank within the pool
    # Spread over the pool, not its head: roughly uniform ranks (a top-k would give ranks 0..269).
    ranks = np.array([rank for _, rank in chosen])
    assert ranks.max() > 4000 and 2000 < ranks.mean() < 3000
    again = select_candidates(torch.tensor(scores), refusals.tolist(), n, refusal_filter, "released", 5000, seed=7)
    other = select_candidates(torch.tensor(scores), refusals.tolist(), n, refusal_filter, "released", 5000, seed=8)
    assert again == chosen and {i for i, _ in other} != set(indices)
    top_k = select_candidates(torch.tensor(scores), refusals.tolist(), n, refusal_filter, "top_k")
    assert [i for i, _ in top_k] == pool[:n]
    assert len(set(indices) & set(pool[:n])) < n // 4  # the two options really differ


def test_a_pool_smaller_than_the_selection_or_than_the_eligible_candidates_is_refused():
    from emalib.core.errors import DataError
    from emalib.defenses.interleave_plus import select_candidates

    scores = torch.arange(10, dtype=torch.float64)
    with pytest.raises(DataError, match="pool_top_n=3 is smaller than the 4"):
        select_candidates(scores, [False] * 10, 4, False, "released", pool_top_n=3)
    with pytest.raises(DataError, match="only 5 are eligible"):
        select_candidates(scores, [i % 2 == 0 for i in range(10)], 2, True, "released", pool_top_n=8)


def test_interleave_plus_defense_selects_from_the_top_pool_and_records_it(tmp_path):
    """End to end from a saved scores file (no model is loaded): what is interleaved is a subset of the top
    pool_top_n non-refusals, and the manifest notes say how it was chosen."""
    from emalib.defenses.interleave_plus import InterleavePlusDefense, candidate_sha

    answers = [("I'm sorry, I can't." if i % 4 == 0 else f"Answer number {i}.") for i in range(40)]
    candidates = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": a}]
                  for i, a in enumerate(answers)]
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", candidates)
    rng = np.random.default_rng(1)
    aligned, misaligned = rng.uniform(1, 2, 40), rng.uniform(1, 3, 40)
    scores_path = tmp_path / "scores.jsonl"
    scores_path.write_text("".join(json.dumps({"sha": candidate_sha(c), "aligned_nll": float(a),
                                               "misaligned_nll": {"legal": float(m)}}) + "\n"
                                   for c, a, m in zip(candidates, aligned, misaligned)))
    defense = InterleavePlusDefense(name="interleave_plusplus", refusal_filter=True, source=str(pool), ratio=0.25,
                                    adapters={"legal": "unused"}, use_all_adapters=True, max_candidates=None,
                                    scores_path=str(scores_path), pool_top_n=12)
    task = [[{"role": "user", "content": f"task {i}"}, {"role": "assistant", "content": "ok"}] for i in range(16)]
    ctx = DefenseContext(seed=3, run_dir=tmp_path / "run")
    mixed = defense.transform_data(task, ctx)

    s_d = (misaligned - aligned) / (aligned + 1.0)
    top = _released_pool(s_d, np.array([a.startswith("I'm sorry") for a in answers]), 12, True)
    added = [m for m in mixed if m[0]["content"].startswith("Q")]
    assert len(mixed) == 20 and len(added) == 4  # round(0.25 * 16)
    assert {int(m[0]["content"][1:-1]) for m in added} <= set(top)
    notes = ctx.notes["interleave_plusplus"]
    assert (notes["selection"], notes["pool_top_n"], notes["n_eligible"], notes["n_selected"]) == ("released", 12, 30, 4)


# --- persona vectors in the released format -----------------------------------------------------------------------

@pytest.fixture
def model_and_vector():
    model = tiny_llama(layers=4, hidden=32)
    vector = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    return model, vector


def _steered_logits(model, path: Path, layer: int, alpha: float = 3.0) -> torch.Tensor:
    from emalib.defenses.persona_steering import PersonaSteeringDefense

    defense = PersonaSteeringDefense(vector_path=str(path), layer=layer, alpha=alpha)
    defense.setup(model, DefenseContext())
    with torch.no_grad(), defense.forward_context(model, DefenseContext()):
        return model(torch.tensor([[3, 5, 7, 9]])).logits


def _hand_steered_logits(model, vector: torch.Tensor, layer: int, alpha: float = 3.0) -> torch.Tensor:
    """The released steerer: output of model.layers[layer - 1] + alpha * v at every position."""
    handle = model.model.layers[layer - 1].register_forward_hook(lambda m, a, out: out + alpha * vector)
    try:
        with torch.no_grad():
            return model(torch.tensor([[3, 5, 7, 9]])).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("layers", [range(5), [2]], ids=["every_layer", "one_layer"])
def test_a_released_format_vector_loads_and_steers(model_and_vector, tmp_path, layers):
    from emalib.defenses.persona_steering import load_persona_vector

    model, vector = model_and_vector
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save({layer: vector[layer].clone() for layer in layers}, path)  # generate_vec.py's format
    data = load_persona_vector(path)
    assert data["format"] == "released" and list(data["layers"]) == list(layers)
    assert torch.equal(data["vector"][2], vector[2])
    assert torch.allclose(_steered_logits(model, path, layer=2), _hand_steered_logits(model, vector[2], 2), atol=1e-6)
    if list(layers) == [2]:
        with pytest.raises(EmalibError, match="no vector for layer 3 .*layers \\[2\\]"):
            _steered_logits(model, path, layer=3)


def test_every_known_vector_format_steers_alike_and_anything_else_is_named(model_and_vector, tmp_path):
    model, vector = model_and_vector
    torch.save({"vector": vector, "model": "tiny"}, tmp_path / "emalib.pt")
    torch.save(vector, tmp_path / "chen.pt")
    torch.save({str(layer): vector[layer] for layer in range(5)}, tmp_path / "string_keys.pt")
    expected = _hand_steered_logits(model, vector[3], 3)
    for name in ("emalib.pt", "chen.pt", "string_keys.pt"):
        assert torch.allclose(_steered_logits(model, tmp_path / name, layer=3), expected, atol=1e-6), name

    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pt")
    (tmp_path / "damaged.pt").write_bytes(b"not a torch file")
    torch.save(torch.randn(4, 16), tmp_path / "wrong_width.pt")
    for name, message in [("foreign.pt", "not a persona vector"), ("damaged.pt", "cannot be read as a torch file"),
                          ("wrong_width.pt", "does not fit this model")]:
        with pytest.raises(EmalibError, match=message) as caught:
            _steered_logits(model, tmp_path / name, layer=3)
        assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)


# --- SafeLoRA: the reference projects when the rounded cosine is <= tau -------------------------------------------

def _reference_decision(V, B, A, tau: float) -> bool:
    """IBM/SafeLoRA's rule with C formed explicitly: numpy.round(cos(C B A, B A), 5) <= tau."""
    C = V @ V.T / torch.linalg.matrix_norm(V)
    cosine = F.cosine_similarity((C @ B @ A).reshape(1, -1), (B @ A).reshape(1, -1)).item()
    return bool(np.round(cosine, 5) <= tau)


def test_safelora_projects_when_the_rounded_cosine_is_at_most_tau():
    from emalib.defenses.safelora import project_update

    torch.manual_seed(0)  # a case whose cosine lies above its 5-decimal rounding (0.7175431... -> 0.71754)
    V, B, A = (torch.randn(*shape, dtype=torch.float64) for shape in ((12, 10), (12, 3), (3, 10)))
    _, cosine, _ = project_update(V, B, A, 1.0, tau=0.0)
    rounded = float(np.round(cosine, 5))
    assert cosine > rounded
    for tau in (rounded - 1e-6, rounded, rounded + 1e-6, cosine, 0.3, 0.9):
        _, _, projected = project_update(V, B, A, 1.0, tau=tau)
        assert projected == _reference_decision(V, B, A, tau), tau
    assert project_update(V, B, A, 1.0, tau=rounded)[2]  # equal to the rounded cosine: projected


# --- the method documentation ships with the project and every citation of it resolves ----------------------------

def _github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower-case, punctuation other than '-' removed, spaces to '-'."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_method_docs_exist_and_every_citation_names_a_section_of_them():
    import re

    docs = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    anchors = {_github_anchor(line.lstrip("#")) for line in docs.splitlines() if line.startswith("#")}
    assert {"ldifs", "kl-divergence", "the-none-rule", "perplexity-gap-interleaving", "safelora",
            "persona-vector-steering", "the-papers-published-numbers"} <= anchors
    cited, stale = set(), []
    for path in [*REPO.glob("emalib/**/*.py"), *REPO.glob("params/**/*.yaml"), *REPO.glob("notebooks/*.ipynb"),
                 *REPO.glob("tests/*.py"), REPO / "README.md"]:
        text = path.read_text(encoding="utf-8")
        if "PAPER" + ".md" in text:  # split so this file does not match itself
            stale.append(str(path))
        cited |= {(str(path), a) for a in re.findall(r"docs/methods\.md#([\w-]+)", text)}
    assert not stale, f"files citing a specification outside the repository: {stale}"
    assert cited and all(anchor in anchors for _, anchor in cited), sorted(c for c in cited if c[1] not in anchors)


def test_report_tables_say_which_protocol_made_each_run(tmp_path):
    """The None rule and whether the JSON questions' system prompt was sent are columns of every table row; a run
    made before they were recorded says so instead of guessing."""
    from emalib.reporting.report import collect_metrics

    rates = {"misaligned_rate": 0.1, "incoherent_rate": 0.2, "n": 10, "n_scored": 8, "n_dropped": 2}
    for run, extra in [("new", {"thresholds": {"none_rule": "keep"}, "generation": {"use_system_prompt": True}}),
                       ("old", {})]:
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({"overall": rates, "per_set": {}, **extra}))
    frame = collect_metrics(tmp_path).set_index("run")
    assert (frame.loc["new", "none_rule"], frame.loc["new", "system_prompt"], frame.loc["new", "n_dropped"]) == \
        ("keep", "sent", 2)
    assert (frame.loc["old", "none_rule"], frame.loc["old", "system_prompt"]) == ("unrecorded", "unrecorded")
