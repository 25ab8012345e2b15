"""Persona vectors: extraction against a separate computation, and steering hooks that always come off."""

import json

import pytest
import torch
from defense_helpers import hook_count, peft_wrap, single_thread, tiny_llama  # noqa: F401 (autouse fixture)

from emalib.core.errors import EmalibError
from emalib.defenses.base import DefenseContext
from emalib.defenses.persona_steering import PersonaSteeringDefense, steering
from emalib.evaluation.judge.scoring import Judgment
from emalib.evaluation.persona import extract_persona_vector, kept_pairs, load_trait, persona_vector


def _ids():
    return torch.tensor([[5, 9, 3, 7, 11, 2]])


def test_steering_adds_alpha_v_at_hidden_state_index_layer_and_comes_off_after():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
    hooks = hook_count(model)  # after a first forward: transformers installs its own recorders once
    vector = torch.randn(5, 32)
    with torch.no_grad(), steering(model, vector, layer=2, alpha=3.0):
        assert hook_count(model) == hooks + 1
        steered = model(ids, output_hidden_states=True)
    # hidden_states[2] (the output of block 1) carries +alpha v[2]; earlier states are untouched.
    assert torch.allclose(steered.hidden_states[2], plain.hidden_states[2] + 3.0 * vector[2], atol=1e-5)
    assert torch.equal(steered.hidden_states[1], plain.hidden_states[1])
    assert not torch.allclose(steered.logits, plain.logits, atol=1e-3)
    with torch.no_grad():
        after = model(ids)
    assert hook_count(model) == hooks and torch.equal(after.logits, plain.logits)


def test_steering_hook_is_removed_when_the_forward_raises():
    model = tiny_llama()
    with torch.no_grad():
        plain = model(_ids()).logits
    hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), steering(model, torch.randn(5, 32), layer=4, alpha=5.0):
        model(_ids())
        raise RuntimeError("boom")
    with torch.no_grad():
        assert hook_count(model) == hooks and torch.equal(model(_ids()).logits, plain)


def test_defense_steers_only_inside_its_forward_context_on_a_peft_model(tmp_path):
    model = peft_wrap(tiny_llama(), random_b=False)
    torch.save({"vector": torch.randn(5, 32), "model": "tiny"}, tmp_path / "v.pt")
    defense = PersonaSteeringDefense(vector_path=str(tmp_path / "v.pt"), alpha=5.0, layer=3)
    ctx = DefenseContext()
    defense.setup(model, ctx)
    with torch.no_grad():
        base = model(_ids()).logits
        hooks = hook_count(model)
        with defense.forward_context(model, ctx):
            inside = model(_ids()).logits
        outside = model(_ids()).logits
    assert not torch.allclose(inside, base, atol=1e-3)
    assert torch.equal(outside, base) and hook_count(model) == hooks
    assert ctx.notes["persona_steering"]["layer"] == 3


def test_steering_gradients_are_the_same_under_gradient_checkpointing():
    """The trainer leaves the context before backward, so a checkpointed block recomputes without the hook: the
    addition is a constant, so the gradients must equal those of an un-checkpointed run."""
    vector = torch.randn(5, 32)
    grads = []
    for checkpointing in (False, True):
        model = peft_wrap(tiny_llama(), random_b=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with steering(model, vector, layer=2, alpha=3.0):
            loss = model(_ids(), output_hidden_states=True).logits.float().pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])


def test_a_missing_vector_is_not_extracted_by_training_but_names_its_step(tmp_path, monkeypatch):
    import emalib.evaluation.persona

    monkeypatch.setattr(emalib.evaluation.persona, "extract_persona_vector", lambda *a, **k: pytest.fail("extracted in setup"))
    defense = PersonaSteeringDefense(layer=2)  # the vector defaults to <run>/persona_vector.pt
    with pytest.raises(EmalibError) as err:
        defense.setup(tiny_llama(), DefenseContext(run_dir=tmp_path))
    assert str(err.value) == (f"{tmp_path / 'persona_vector.pt'}: persona vector missing: run step 'persona_vector' "
                              f"first (steps: [persona_vector, train, ...])")


def test_vector_shape_must_fit_the_model(tmp_path):
    torch.save({"vector": torch.randn(3, 32)}, tmp_path / "v.pt")
    with pytest.raises(Exception, match="does not fit"):
        PersonaSteeringDefense(vector_path=str(tmp_path / "v.pt"), layer=2).setup(tiny_llama(), DefenseContext())


def test_kept_pairs_applies_chen_et_al_filter():
    def row(sign, q, trait, coherence, answer="a"):
        return {"sign": sign, "instruction_index": 0, "question_index": q, "sample_index": 0, "answer": answer,
                "trait": trait, "coherence": coherence}

    rows = [row("pos", 0, 80, 90), row("neg", 0, 10, 90),     # kept
            row("pos", 1, 49, 90), row("neg", 1, 10, 90),     # pos trait < 50
            row("pos", 2, 80, 90), row("neg", 2, 50, 90),     # neg trait not < 50
            row("pos", 3, 80, 49), row("neg", 3, 10, 90),     # pos incoherent
            row("pos", 4, None, 90), row("neg", 4, 10, 90),   # unscored
            row("pos", 5, 50, 50), row("neg", 5, 49.9, 50)]   # boundaries: kept
    assert [p["question_index"] for p, _ in kept_pairs(rows)] == [0, 5]
    assert len(kept_pairs(rows, filter_pairs=False)) == 6


class ScriptedJudge:
    """Trait/coherence scores by call order: rows alternate pos, neg; prompts alternate trait, coherence."""

    name = "scripted"

    def __init__(self, neg_trait_by_pair):
        self.neg_trait_by_pair = neg_trait_by_pair

    def judge(self, prompts):
        out = []
        for k in range(0, len(prompts), 4):
            pair = k // 4
            out += [Judgment(90.0, 1.0, self.name), Judgment(90.0, 1.0, self.name),
                    Judgment(self.neg_trait_by_pair[pair], 1.0, self.name), Judgment(90.0, 1.0, self.name)]
        return out


def _response_means_separately(model, tokenizer, rows):
    """Per row, one unpadded forward; mean over the tokens after the generation prompt, for every layer."""
    means = []
    for row in rows:
        messages = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(prompt + row["answer"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        means.append(torch.stack([h[0, n_prompt:].mean(0) for h in hidden]))
    return torch.stack(means)


def test_extracted_vector_equals_the_mean_difference_over_kept_pairs(tokenizer, tmp_path):
    from conftest import make_tiny_model

    trait = tmp_path / "trait.json"  # the real file's format (checked below), at toy size
    trait.write_text(json.dumps({"instruction": [{"pos": "Be evil.", "neg": "Be kind."}],
                                 "questions": ["What now?", "Any advice?"],
                                 "eval_prompt": "Rate {question} / {answer}"}))
    questions = tmp_path / "coherence.yaml"
    questions.write_text("- id: q\n  paraphrases: [x]\n"
                         "  judge_prompts:\n    coherent: 'Coherent? {question} {answer}'\n")
    model = peft_wrap(make_tiny_model(tokenizer, layers=3), random_b=True)  # extraction must use the adapter-off model
    judge = ScriptedJudge([10.0, 70.0, 20.0, 5.0])  # pair 1's negative answer looks evil: dropped
    out = tmp_path / "v.pt"
    data = extract_persona_vector(model, tokenizer, out, judge=judge, model_name="tiny", trait=str(trait),
                                  samples_per_question=2, max_new_tokens=5, batch_size=3,
                                  coherence_questions=str(questions))
    saved = torch.load(out, weights_only=True)
    assert saved["n_pairs"] == 3 and saved["n_candidates"] == 4 and saved["model"] == "tiny"
    rows = [json.loads(line) for line in (tmp_path / "v.pt.answers.jsonl").read_text().splitlines()]
    pairs = [(rows[2 * i], rows[2 * i + 1]) for i in (0, 2, 3)]
    with model.disable_adapter():
        pos = _response_means_separately(model, tokenizer, [p for p, _ in pairs])
        neg = _response_means_separately(model, tokenizer, [n for _, n in pairs])
    expected = pos.mean(0) - neg.mean(0)
    assert saved["vector"].shape == (4, 32)
    assert torch.allclose(saved["vector"], expected, atol=1e-5)
    assert torch.allclose(persona_vector(pos, neg), expected) and torch.equal(data["vector"], saved["vector"])


def test_the_mirrored_trait_file_loads(with_mirror):
    trait = load_trait("persona_evil_extract")
    assert len(trait.instructions) == 5 and len(trait.questions) == 20
    assert "{question}" in trait.eval_prompt and "{answer}" in trait.eval_prompt


class CachingJudge:
    """A judge as the real ones behave towards the cache: every judgment it makes is stored; scores by prompt."""

    name = "caching"

    def __init__(self):
        self.calls = 0

    def judge(self, prompts, cache=None):
        out = []
        for prompt in prompts:
            self.calls += 1
            score = 80 if "evil" in prompt else 10
            out.append(Judgment(float(score), 1.0, self.name, raw={str(score): 0.0}, mode="logprobs"))
            if cache is not None:
                cache.put(prompt, out[-1])
        return out


def test_persona_extractions_judgments_go_through_the_judgment_cache(tmp_path):
    from emalib.evaluation.judge.cache import JudgmentCache
    from emalib.evaluation.persona import judge_rows

    rows = [{"question": "q1", "answer": "an evil plan"}, {"question": "q2", "answer": "a kind word"}]
    judge, cache = CachingJudge(), JudgmentCache(tmp_path / "cache.sqlite")
    first = judge_rows(rows, judge, "Trait? {question} {answer}", "Coherent? {question} {answer}", cache)
    assert [(r["trait"], r["coherence"]) for r in first] == [(80.0, 80.0), (10.0, 10.0)] and judge.calls == 4
    again = judge_rows(rows, judge, "Trait? {question} {answer}", "Coherent? {question} {answer}", cache)
    assert again == first and judge.calls == 4  # served from the cache: no second call
    assert judge_rows(rows, judge, "Trait? {question} {answer}", "Coherent? {question} {answer}") == first
    assert judge.calls == 8  # without a cache every prompt is judged
    cache.close()
