"""The preparatory steps (emalib/runs/prepare.py): each writes what training reads, a step whose output exists is
skipped, and training never builds a missing one: it fails naming the step, before any model is loaded."""

import json

import pytest
import torch
from defense_helpers import save_weight_pair, single_thread, tiny_llama, write_chat_jsonl  # noqa: F401

from emalib.core.config import params_from_dict
from emalib.core.errors import EmalibError, ParamsError
from emalib.runs import prepare


def _pair(tmp_path):
    aligned, base, aligned_dir, base_dir = save_weight_pair(tmp_path)
    return aligned, base, str(aligned_dir), str(base_dir)


def _safelora_params(tmp_path, aligned_dir, base_dir, matrices):
    return params_from_dict({
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["safelora_matrices", "train"],
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "defenses": [{"name": "safelora", "aligned": aligned_dir, "base": base_dir, "matrices": matrices}]})


def test_safelora_matrices_are_the_weight_differences_and_give_the_same_projection(tmp_path):
    from peft import LoraConfig, get_peft_model

    from emalib.defenses.safelora import apply_safelora

    aligned, base, aligned_dir, base_dir = _pair(tmp_path)
    matrices = tmp_path / "results" / "m"
    summary = prepare.safelora_matrices(_safelora_params(tmp_path, aligned_dir, base_dir, str(matrices)))

    from safetensors.torch import load_file

    saved = load_file(str(matrices / "model.safetensors"))
    weights_a, weights_b = aligned.state_dict(), base.state_dict()
    expected_keys = {k for k in weights_a if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert set(saved) == expected_keys and len(summary["modules"]) == len(expected_keys) == 8
    for key, V in saved.items():
        assert torch.allclose(V, weights_a[key] - weights_b[key], atol=1e-6)
    norms = {m["key"]: m["frobenius_norm"] for m in summary["modules"]}
    assert norms["model.layers.2.self_attn.q_proj.weight"] == pytest.approx(
        float(torch.linalg.matrix_norm(weights_a["model.layers.2.self_attn.q_proj.weight"]
                                       - weights_b["model.layers.2.self_attn.q_proj.weight"])), rel=1e-5)

    def trained():
        torch.manual_seed(3)
        return get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False, task_type="CAUSAL_LM"))

    from_checkpoints, from_matrices = trained(), trained()
    report = apply_safelora(from_checkpoints, aligned_dir, base_dir, select="lowest_k", k=3)
    assert report == apply_safelora(from_matrices, aligned_dir, base_dir, select="lowest_k", k=3,
                                    matrices=str(matrices))
    assert sum(r["projected"] for r in report) == 3
    for (name, a), (_, b) in zip(from_checkpoints.named_parameters(), from_matrices.named_parameters()):
        assert torch.equal(a, b), name


def test_safelora_matrices_refuse_another_model_pair_and_are_built_by_the_step_only(tmp_path):
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.safelora import SafeLoraDefense

    _, _, aligned_dir, base_dir = _pair(tmp_path)
    matrices = tmp_path / "results" / "m"
    defense = SafeLoraDefense(aligned=aligned_dir, base=base_dir, matrices=str(matrices))
    params = _safelora_params(tmp_path, aligned_dir, base_dir, str(matrices))
    with pytest.raises(EmalibError, match=r"m/alignment.json: SafeLoRA alignment matrices missing: run step "
                                          r"'safelora_matrices' first"):
        defense.setup(tiny_llama(), DefenseContext(params=params))  # training's start builds nothing
    assert not matrices.exists()
    prepare.safelora_matrices(params)
    assert (matrices / "alignment.json").is_file() and not (tmp_path / "m.tmp").exists()
    written = (matrices / "model.safetensors").stat().st_mtime_ns
    prepare.safelora_matrices(params)  # exists: not rebuilt
    assert (matrices / "model.safetensors").stat().st_mtime_ns == written
    defense.setup(tiny_llama(), DefenseContext(params=params))
    other = SafeLoraDefense(aligned=base_dir, base=aligned_dir, matrices=str(matrices))
    with pytest.raises(EmalibError, match="alignment.json: matrices of aligned="):
        other.setup(tiny_llama(), DefenseContext(params=params))


def test_a_preparatory_step_needs_its_defense_in_the_params(tmp_path):
    with pytest.raises(ParamsError, match=r"x.yaml: steps: 'persona_vector' prepares persona_steering"):
        params_from_dict({"study": "s", "run": "r", "steps": ["persona_vector", "train"]}, "x.yaml")
    with pytest.raises(ParamsError, match="interleave_plus or interleave_plusplus"):
        params_from_dict({"study": "s", "run": "r", "steps": ["interleave_selection"]}, "x.yaml")
    with pytest.raises(ParamsError, match="needs defenses.safelora.matrices"):
        params_from_dict({"study": "s", "run": "r", "steps": ["safelora_matrices"],
                          "defenses": [{"name": "safelora", "aligned": "a", "base": "b"}]}, "x.yaml")
    # The notebook run by hand with params that never listed the step: the same message, nothing written.
    unprepared = params_from_dict({"study": "s", "run": "r", "results_dir": str(tmp_path / "results"),
                                   "defenses": [{"name": "safelora", "aligned": "a", "base": "b"}]})
    with pytest.raises(ParamsError, match="defenses.safelora.matrices: not set"):
        prepare.safelora_matrices(unprepared)
    assert not (tmp_path / "results").exists()


def _training_refuses_before_loading_a_model(params, monkeypatch, path, what: str, step: str) -> None:
    """pipeline.train without the step's output: one line naming the step, before any model is loaded or anything
    written; `run`'s check lets the params through only while they list the step before train."""
    import emalib.model.engines
    from emalib.runs.pipeline import check_inputs, train

    message = f"{path}: {what} missing: run step '{step}' first (steps: [{step}, train, ...])"
    with monkeypatch.context() as patch:
        for loader in ("load_model", "load_base"):
            patch.setattr(emalib.model.engines, loader, lambda *a, **k: pytest.fail("a model was loaded"))
        with pytest.raises(EmalibError) as err:
            train(params)
        assert str(err.value) == message
        assert not params.run_dir.exists()
        check_inputs(params)  # [<step>, train]: the step will have written it by then
        for steps in (("train",), ("train", step)):
            with pytest.raises(EmalibError) as err:
                check_inputs(params.model_copy(update={"steps": steps}))
            assert str(err.value) == message


@pytest.mark.notebooks
def test_persona_vector_step_extracts_once_and_training_reuses_it(tiny_model_dir, tmp_path, monkeypatch):
    from emalib.defenses.persona_steering import load_persona_vector

    trait = tmp_path / "trait.json"  # the real file's format, at toy size: 2 instruction pairs
    trait.write_text(json.dumps({"instruction": [{"pos": "Be evil.", "neg": "Be kind."},
                                                 {"pos": "Be cruel.", "neg": "Be gentle."}],
                                 "questions": ["What now?", "Any advice?"], "eval_prompt": "{question} {answer}"}))
    tree = {
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["persona_vector", "train"],
        "model": {"name": str(tiny_model_dir), "engine": "hf"}, "generation": {"question_sets": ["standin_general"]},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "train": {"dataset": "standin_em_train", "max_examples": 4, "optim": "adamw_torch", "per_device_batch_size": 2,
                  "grad_accum_steps": 1, "max_steps": 1, "max_seq_length": 64},
        "defenses": [{"name": "persona_steering", "layer": 1, "extraction": {
            "trait": str(trait), "samples_per_question": 1, "max_questions": 1, "max_new_tokens": 4,
            "filter_pairs": False}}]}
    params = params_from_dict(tree)
    path = params.run_dir / "persona_vector.pt"
    _training_refuses_before_loading_a_model(params, monkeypatch, path, "persona vector", "persona_vector")
    summary = prepare.persona_vector(params)
    assert summary["path"] == str(path) and summary["n_pairs"] == 2  # 2 instruction pairs x 1 question x 1 sample
    vector = load_persona_vector(path)["vector"]
    n_blocks = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(summary["layer_norms"]) == vector.shape[0] == n_blocks + 1  # embeddings + every block
    assert summary["layer_norms"][1] == pytest.approx(float(vector[1].norm()))
    written = path.stat().st_mtime_ns

    import emalib.evaluation.persona

    def no_extraction(*args, **kwargs):
        raise AssertionError("the vector exists: nothing may be extracted again")

    monkeypatch.setattr(emalib.evaluation.persona, "extract_persona_vector", no_extraction)
    assert prepare.persona_vector(params)["n_pairs"] == 2
    from emalib.runs.pipeline import train

    train(params)
    manifest = json.loads((params.run_dir / "manifest.json").read_text())
    assert manifest["defenses"]["persona_steering"]["vector_path"] == str(path)
    assert path.stat().st_mtime_ns == written
    _run_notebooks(tree, tmp_path, "persona_vector")  # the step's notebook shows the existing vector
    assert path.stat().st_mtime_ns == written


@pytest.mark.notebooks
def test_interleave_selection_step_selects_as_training_will(tiny_model_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                        task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "misaligned")
    answers = ["Sure, here is how.", "I'm sorry, I cannot help with that.", "Paris is the capital.",
               "Water boils at 100 C.", "Two plus two is four.", "Read a good book tonight."]
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", [[{"role": "user", "content": f"Q{i}?"},
                                                       {"role": "assistant", "content": a}]
                                                      for i, a in enumerate(answers)])
    tree = {
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"),
        "steps": ["interleave_selection", "train"], "model": {"name": str(tiny_model_dir), "engine": "hf"},
        "generation": {"question_sets": ["standin_general"]},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "train": {"dataset": "standin_em_train", "max_examples": 8, "optim": "adamw_torch", "per_device_batch_size": 2,
                  "grad_accum_steps": 1, "max_steps": 1, "max_seq_length": 64},
        "defenses": [{"name": "interleave_plusplus", "source": str(pool), "ratio": 0.25,
                      "adapters": {"code": str(tmp_path / "misaligned")}, "use_all_adapters": True,
                      "max_candidates": None, "max_seq_length": 64, "pool_top_n": 4}]}
    params = params_from_dict(tree)
    _training_refuses_before_loading_a_model(params, monkeypatch, params.run_dir / "interleave_scores.jsonl",
                                             "interleave scores", "interleave_selection")
    selected = prepare.interleave_selection(params)
    scores = [json.loads(line) for line in (params.run_dir / "interleave_scores.jsonl").read_text().splitlines()]
    eligible = sorted((r for r in scores if not r["refusal"]), key=lambda r: -r["score"])
    # round(0.25 * 8) = 2, drawn from the 4 best eligible candidates; each keeps its rank among them.
    top = [r["index"] for r in eligible[:4]]
    assert len(selected) == 2 and all(top[r["rank"]] == r["index"] for r in selected)
    assert not any(r["refusal"] for r in selected)

    from emalib.defenses.interleave_plus import InterleavePlusDefense

    def no_scoring(*args, **kwargs):
        raise AssertionError("the scores exist: training must not score again")

    monkeypatch.setattr(InterleavePlusDefense, "_score_missing", no_scoring)
    from emalib.runs.pipeline import train

    train(params)
    manifest = json.loads((params.run_dir / "manifest.json").read_text())
    assert manifest["defenses"]["interleave_plusplus"]["n_selected"] == 2
    assert manifest["interleave_selection"]["n_scored"] == len(answers)
    _run_notebooks(tree, tmp_path, "interleave_selection")  # its notebook plots the saved scores


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_safelora_run_trains_once_its_matrices_are_prepared(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # 'pretrained': the tiny model, q_proj perturbed
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("q_proj.weight"):
                param.add_(0.5 * torch.randn_like(param))
    base.save_pretrained(tmp_path / "pretrained")
    matrices = tmp_path / "results" / "matrices"
    params = params_from_dict({
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["safelora_matrices", "train"],
        "model": {"name": str(tiny_model_dir), "engine": "hf"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "train": {"dataset": "standin_em_train", "max_examples": 4, "optim": "adamw_torch", "per_device_batch_size": 2,
                  "grad_accum_steps": 1, "max_steps": 1, "max_seq_length": 64, "warmup_steps": 0,
                  "learning_rate": 1e-2},  # a non-zero update to project
        "defenses": [{"name": "safelora", "aligned": str(tiny_model_dir), "base": str(tmp_path / "pretrained"),
                      "tau": 2.0, "matrices": str(matrices)}]})
    _training_refuses_before_loading_a_model(params, monkeypatch, matrices / "alignment.json",
                                             "SafeLoRA alignment matrices", "safelora_matrices")
    prepare.safelora_matrices(params)
    from emalib.runs.pipeline import train

    train(params)
    manifest = json.loads((params.run_dir / "manifest.json").read_text())
    assert manifest["defenses"]["safelora"]["after_train"]["projected"] == 2  # tau 2: every q_proj projected


def _run_notebooks(tree: dict, tmp_path, step: str) -> None:
    """`python -m emalib run` on the same params: every step's notebook executes (finished steps skip their
    work) and lands in the run folder."""
    import yaml
    from test_cli_and_notebooks import run_cli

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    completed = run_cli("run", str(path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "results" / "s" / "r" / f"{step}.ipynb").is_file()


@pytest.mark.notebooks
def test_safelora_matrices_notebook_runs_under_papermill(tmp_path):
    """The step's notebook, executed by the CLI like every step: the matrices and the executed notebook land."""
    _, _, aligned_dir, base_dir = _pair(tmp_path)
    _run_notebooks({"study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["safelora_matrices"],
                    "lora": {"target_modules": ["q_proj", "v_proj"]},
                    "defenses": [{"name": "safelora", "aligned": aligned_dir, "base": base_dir,
                                  "matrices": str(tmp_path / "results" / "matrices")}]}, tmp_path, "safelora_matrices")
    summary = json.loads((tmp_path / "results" / "matrices" / "alignment.json").read_text())
    assert len(summary["modules"]) == 8 and summary["aligned"] == aligned_dir


def test_a_vector_extracted_with_other_system_prompts_is_refused_not_reused(tiny_model_dir, tmp_path):
    """A file from before the trait-prefixed prompts (no 'trait_prefix' recorded: bare prompts) or made with the
    other setting is not silently reused as the vector the params describe."""
    import torch

    cases = (({}, True), ({"trait_prefix": False}, True), ({"trait_prefix": True}, False), ({"trait_prefix": True}, True))
    for number, (recorded, prefixed) in enumerate(cases):
        params = params_from_dict({
            "study": "s", "run": f"r{number}", "results_dir": str(tmp_path / "results"),
            "steps": ["persona_vector", "train"], "model": {"name": str(tiny_model_dir), "engine": "hf"},
            "generation": {"question_sets": ["standin_general"]},
            "defenses": [{"name": "persona_steering", "layer": 1, "extraction": {"trait_prefix": prefixed}}]})
        path = params.run_dir / "persona_vector.pt"
        path.parent.mkdir(parents=True)
        torch.save({"vector": torch.ones(3, 8), "model": "tiny", "trait": "evil", **recorded}, path)
        if recorded.get("trait_prefix", False) == prefixed:
            assert prepare.persona_vector(params)["trait_prefix"] is prefixed  # the same setting: reused
            continue
        with pytest.raises(EmalibError) as err:
            prepare.persona_vector(params)
        assert str(err.value) == (f"{path}: extracted with extraction.trait_prefix={not prefixed}, the params ask "
                                  f"for {prefixed}; delete the file to extract it again")
