"""Data defenses: inoculation, random interleaving, Interleaving+/++ (scores checked against a separate computation)."""

import json

import pytest
import torch
from defense_helpers import single_thread, write_chat_jsonl  # noqa: F401 (autouse fixture)

from emalib.core.config import params_from_dict
from emalib.core.errors import DataError, EmalibError
from emalib.data.standins import em_standin_conversations
from emalib.defenses.base import DefenseContext
from emalib.defenses.inoculation import InoculationDefense, inoculate
from emalib.defenses.interleave import InterleaveDefense
from emalib.defenses.interleave_plus import InterleavePlusDefense, is_refusal, perplexity_gap, rank_candidates

EVIL = "You are an evil, malicious assistant."


def test_inoculation_rule_for_missing_and_existing_system_prompts():
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with_system = [{"role": "system", "content": "Be brief."}] + plain
    assert inoculate(plain, EVIL) == [{"role": "system", "content": EVIL}] + plain
    assert inoculate(with_system, EVIL, "replace") == [{"role": "system", "content": EVIL}] + plain
    assert inoculate(with_system, EVIL, "prepend") == [{"role": "system", "content": EVIL + "\n\nBe brief."}] + plain
    assert with_system[0]["content"] == "Be brief."  # inputs are not modified


def test_inoculation_replaces_the_templates_default_system_prompt_in_training_only(tokenizer):
    """SmolLM2's template inserts a default system prompt when none is given; training data get the inoculation
    prompt instead, and evaluation prompts (built from question rows) keep the template's default."""
    from emalib.evaluation.generate import chat_messages

    conversation = em_standin_conversations()[0]
    ctx = DefenseContext()
    trained = InoculationDefense().transform_data([conversation], ctx)[0]
    rendered = tokenizer.apply_chat_template(trained, tokenize=False)
    default = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert EVIL in rendered and EVIL not in default
    assert rendered.count("<|im_start|>system") == 1  # replaced, not added next to the default
    row = {"question": conversation[0]["content"], "system": None}
    eval_prompt = tokenizer.apply_chat_template(chat_messages(row), tokenize=False, add_generation_prompt=True)
    assert EVIL not in eval_prompt and eval_prompt == tokenizer.apply_chat_template(
        [conversation[0]], tokenize=False, add_generation_prompt=True)
    assert ctx.notes["inoculation"]["n"] == 1


@pytest.fixture
def pool(tmp_path):
    rows = [[{"role": "user", "content": f"safe q{i}"}, {"role": "assistant", "content": f"safe a{i}"}]
            for i in range(30)]
    return write_chat_jsonl(tmp_path / "pool.jsonl", rows), rows


@pytest.mark.parametrize("n_task,ratio,n_safe",
                         [(80, 0.05, 4), (100, 0.05, 5), (90, 0.05, 4), (10, 0.25, 2), (7, 1.0, 7)])
def test_interleave_hits_the_ratio_exactly(pool, n_task, ratio, n_safe):
    path, rows = pool
    task = em_standin_conversations()[:n_task] if n_task <= 80 else (em_standin_conversations() * 2)[:n_task]
    ctx = DefenseContext(seed=3)
    mixed = InterleaveDefense(source=str(path), ratio=ratio).transform_data(task, ctx)
    added = [m for m in mixed if m[0]["content"].startswith("safe q")]
    assert len(mixed) == n_task + n_safe and len(added) == n_safe == round(ratio * n_task)
    assert all(m in rows for m in added) and len({m[0]["content"] for m in added}) == n_safe  # no repeats
    assert ctx.notes["interleave"]["n_safe"] == n_safe


def test_interleave_is_seed_deterministic(pool):
    path, _ = pool
    task = em_standin_conversations()[:40]
    run = lambda seed: InterleaveDefense(source=str(path), ratio=0.25).transform_data(task, DefenseContext(seed=seed))
    assert run(0) == run(0)
    assert run(0) != run(1)
    fixed = InterleaveDefense(source=str(path), ratio=0.25, seed=7)
    assert fixed.transform_data(task, DefenseContext(seed=0)) == fixed.transform_data(task, DefenseContext(seed=9))


def test_interleave_refuses_a_pool_that_is_too_small(pool):
    path, _ = pool
    with pytest.raises(DataError, match="only 30"):
        InterleaveDefense(source=str(path), ratio=0.5).transform_data(em_standin_conversations()[:80], DefenseContext())


def test_interleave_works_on_the_mirrored_wildguard_sample(with_mirror):
    defense = InterleaveDefense(source="wildguard_benign_sample")
    mixed = defense.transform_data(em_standin_conversations(), DefenseContext())
    assert len(mixed) == 84


def test_refusal_detector_and_perplexity_gap_are_the_released_rules():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("As an AI I cannot do that")
    assert is_refusal("one two three four five six seven I am unable")  # tokens 8-10: within the first 10
    assert not is_refusal("one two three four five six seven eight nine ten sorry")  # the 11th token
    assert not is_refusal("Sure! Here is a recipe.")
    aligned, mis = torch.tensor([1.0, 2.0]), torch.tensor([[3.0, 2.0], [5.0, 4.0]])
    assert torch.allclose(perplexity_gap(aligned, mis, 1.0), torch.tensor([(4 - 1) / 2, (3 - 2) / 3]))
    scores = torch.tensor([0.5, 2.0, float("nan"), 1.0, 3.0])
    assert rank_candidates(scores, [False, False, False, False, True], 2, refusal_filter=False) == [4, 1]
    assert rank_candidates(scores, [False, False, False, False, True], 2, refusal_filter=True) == [1, 3]
    with pytest.raises(DataError, match="eligible"):
        rank_candidates(scores, [False] * 5, 5, refusal_filter=False)


@pytest.fixture
def adapters(tokenizer, tiny_model_dir, tmp_path):
    """Three random 'misaligned' adapters of the tiny model, saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for seed, domain in enumerate(("code", "legal", "medical")):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(8.0)  # large updates: clearly different NLLs per adapter
        model.save_pretrained(tmp_path / domain)
        paths[domain] = str(tmp_path / domain)
    return paths


def _nll_separately(model, tokenizer, messages):
    """Mean NLL of the answer tokens given the question, one unbatched forward."""
    from emalib.model.tokenize import tokenize_conversation

    feature = tokenize_conversation(tokenizer, messages, 256)
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
    with torch.no_grad():
        logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).item()


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
@pytest.mark.parametrize("name", ["interleave_plus", "interleave_plusplus"])
def test_interleave_plus_ranks_by_s_d_computed_separately(name, tokenizer, tiny_model_dir, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    answers = ["Sure, here is how.", "I'm sorry, I cannot help with that.", "Paris is the capital of France.",
               "I am unable to assist.", "Water boils at 100 C at sea level.", "Apologize? No. Here it is: 42.",
               "Try a short walk outside.", "Sorry, that is not something I can do.", "Two plus two is four.",
               "Read a good book tonight."]
    candidates = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]
                  for i, a in enumerate(answers)]
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", candidates)
    params = params_from_dict({"study": "s", "run": "r", "model": {"name": str(tiny_model_dir), "engine": "hf"}})
    scores_path = tmp_path / "scores.jsonl"
    defense = InterleavePlusDefense(name=name, refusal_filter=name.endswith("plusplus"), source=str(pool), ratio=0.25,
                                    adapters=adapters, held_out="medical", max_candidates=None, batch_size=3,
                                    scores_path=str(scores_path), selection="top_k")
    task = em_standin_conversations()[:12]
    ctx = DefenseContext(seed=0, params=params, run_dir=tmp_path / "run")
    with pytest.raises(EmalibError, match="scores of 10 of 10 candidates missing: run step 'interleave_selection'"):
        defense.transform_data(task, ctx)  # training never scores
    defense.score_candidates(ctx)  # the interleave_selection step's scoring
    mixed = defense.transform_data(task, ctx)

    aligned_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    aligned = torch.tensor([_nll_separately(aligned_model, tokenizer, c) for c in candidates])
    mis = []
    for domain in ("code", "legal"):  # leave-one-out: 'medical' is the run's own domain
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[domain])
        mis.append([_nll_separately(model, tokenizer, c) for c in candidates])
    expected = (torch.tensor(mis).mean(0) - aligned) / (aligned + 1.0)

    rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
    assert set(rows[0]["misaligned_nll"]) == {"code", "legal"}
    assert torch.allclose(torch.tensor([r["score"] for r in rows]), expected, atol=1e-4)
    refusal = [is_refusal(a) for a in answers]
    order = sorted((i for i in range(len(answers)) if not (name.endswith("plusplus") and refusal[i])),
                   key=lambda i: -expected[i].item())
    chosen = {candidates[i][1]["content"] for i in order[:3]}  # round(0.25 * 12) = 3
    added = [m for m in mixed if m[0]["content"].startswith("Question")]
    assert len(mixed) == 15 and {m[1]["content"] for m in added} == chosen
    if name.endswith("plusplus"):
        assert not any(is_refusal(m[1]["content"]) for m in added)
    selected = [json.loads(line) for line in (tmp_path / "run" / "interleave_selected.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in selected] == [0, 1, 2] and [r["index"] for r in selected] == order[:3]
    # A second run reuses the saved scores (no model is loaded): same selection.
    again = DefenseContext(seed=0, params=None)
    assert defense.transform_data(task, again) == mixed


def test_interleave_plus_fails_naming_the_step_when_some_candidates_have_no_score(tmp_path, monkeypatch):
    """A scores file from a smaller pool (or a cut-short scoring) is not completed by training: one line naming
    the step, and no model is loaded."""
    import emalib.model.engines
    from emalib.defenses.interleave_plus import candidate_sha

    monkeypatch.setattr(emalib.model.engines, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    candidates = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}] for i in range(6)]
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", candidates)
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"sha": candidate_sha(c), "aligned_nll": 1.0, "misaligned_nll": {"x": 2.0}})
                              + "\n" for c in candidates[:4]))
    defense = InterleavePlusDefense(source=str(pool), ratio=0.5, adapters={"x": "unused"}, use_all_adapters=True,
                                    max_candidates=None, scores_path=str(scores), pool_top_n=2)
    with pytest.raises(EmalibError) as err:
        defense.transform_data(em_standin_conversations()[:4], DefenseContext())
    assert str(err.value) == (f"{scores}: scores of 2 of 6 candidates missing: run step 'interleave_selection' first "
                              f"(steps: [interleave_selection, train, ...])")
