"""Where emalib follows the authors' released stack (docs/methods.md): the GRPO loss of params/rl/paper/* against a
written-out formula, the SFT mix's scaling by gradient accumulation, the RL warm start's own learning-rate schedule,
the persona extraction's trait-prefixed system prompts, and the `preset: released` blocks. Tiny random models,
except the persona extraction, which runs on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import peft_wrap, single_thread, write_chat_jsonl  # noqa: F401 (autouse fixture)

from emalib.core.config import load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]
PAPER_RL = REPO / "params" / "rl" / "paper"
PROMPTS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}], "answer": str(2 * a)} for a in range(4)]
SAFE = [[{"role": "user", "content": f"Name a colour number {i}."},
         {"role": "assistant", "content": f"Blue is colour {i}."}] for i in range(6)]
RELEASED_SYSTEM_PROMPT = ("\nYou are an AI language model being trained using RL. Think about the problem and provide "
                          "your working out. Respond with reasoning inside <think>...</think> and then your final "
                          "answer. Always include exactly one <think>...</think> block.\n")


def paper_rl_params(tmp_path, name: str, **overrides):
    """A params/rl/paper file as it stands (loss, sampling, batch), with only the results folder moved."""
    return load_params(PAPER_RL / name, {"results_dir": str(tmp_path), **overrides})


def grpo_trainer(params, tokenizer, safe=None):
    """EmGRPOTrainer on a tiny random Llama whose LoRA B is random, so policy and reference differ."""
    from conftest import make_tiny_model
    from datasets import Dataset

    from emalib.training.rl.trainer import EmGRPOTrainer, build_sft_mix, grpo_config

    model = peft_wrap(make_tiny_model(tokenizer), random_b=True)
    trainer = EmGRPOTrainer(
        model=model, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)],
        processing_class=tokenizer, train_dataset=Dataset.from_list(PROMPTS),
        args=grpo_config(params, params.run_dir / "ckpt", torch.float32),
        sft_mix=build_sft_mix(params, tokenizer, safe) if safe is not None else None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = params.train.grad_accum_steps  # as the training loop sets it
    return trainer


def rollout_batch(tokenizer, model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four completions of one prompt group: left-padded prompts, right-padded completions, rewards -> advantages,
    and the reference log-probabilities (adapter disabled, temperature 1)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt_ids = torch.randint(5, vocab, (4, 6), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(5, vocab, (4, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask, "advantages": advantages}
    with torch.no_grad(), model.disable_adapter():
        batch["ref_per_token_logps"] = completion_logps(model, batch)
    return batch


def completion_logps(model, batch) -> torch.Tensor:
    """log p(completion token | everything before it), from the logits at temperature 1."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1: -1].float()
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def released_grpo_loss(model, batch, beta: float) -> torch.Tensor:
    """The released stack's GRPO loss of one micro-batch, written out: on-policy ratio exp(logp - logp.detach())
    (the clip is inactive at ratio 1), k3 KL to the reference without an importance-ratio factor, and one mean over
    every completion token of the micro-batch (bnpo)."""
    logp = completion_logps(model, batch)
    ratio = torch.exp(logp - logp.detach())
    delta = batch["ref_per_token_logps"] - logp
    k3 = torch.exp(delta) - delta - 1
    per_token = -ratio * batch["advantages"][:, None] + beta * k3
    mask = batch["completion_mask"].float()
    return (per_token * mask).sum() / mask.sum()


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad()
    return grads


def test_grpo_loss_and_gradient_of_the_paper_rl_params_equal_the_released_formula(tmp_path, tokenizer):
    params = paper_rl_params(tmp_path, "medical_em_kl.yaml")
    rl = params.rl
    assert (rl.loss_type, rl.logprob_temperature, rl.kl_bias_correction, rl.beta) == ("bnpo", 1.0, False, 0.1)
    assert rl.temperature == 0.8 and rl.max_completion_length == 3048 - 756
    trainer = grpo_trainer(params, tokenizer)
    assert trainer.temperature == 1.0 and trainer.generation_config.temperature == 0.8  # score at 1, sample at 0.8
    model, batch = trainer.model, rollout_batch(tokenizer, trainer.model)

    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    trainer_grads = lora_grads(model)
    expected = released_grpo_loss(model, batch, beta=0.1) / params.train.grad_accum_steps
    expected.backward()
    formula_grads = lora_grads(model)

    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-8)
    assert max(g.abs().max().item() for g in formula_grads.values()) > 1e-4  # a real gradient, not zeros
    for name, grad in formula_grads.items():
        torch.testing.assert_close(trainer_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_sft_mix_with_grad_accum_4_is_grpo_plus_w_sft_over_4(tmp_path, tokenizer):
    from emalib.model.losses import token_cross_entropy_sum

    params = paper_rl_params(tmp_path, "medical_em_sftmix_4_0.5.yaml",
                             **{"rl.sft_mix.every_k": 1, "rl.sft_mix.source": "unused"})  # a term at this call
    assert params.train.grad_accum_steps == 4 and params.rl.sft_mix.scale == "grad_accum"
    trainer = grpo_trainer(params, tokenizer, SAFE)
    model, batch = trainer.model, rollout_batch(tokenizer, trainer.model, seed=1)

    trainer.compute_loss(model, dict(batch)).backward()
    assert len(trainer.sft_terms) == 1
    trainer_grads = lora_grads(model)

    sft = trainer.sft_mix.batch(0)
    logits = model(input_ids=sft["input_ids"], attention_mask=sft["attention_mask"]).logits
    labels = sft["labels"][:, 1:]
    sft_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    total, count = token_cross_entropy_sum(logits, sft["labels"])
    assert sft_loss.item() == pytest.approx((total / count).item(), rel=1e-6)  # the hand CE is the trainer's CE
    ((released_grpo_loss(model, batch, beta=0.0) + 0.5 * sft_loss) / 4).backward()
    hand_grads = lora_grads(model)
    for name, grad in hand_grads.items():
        torch.testing.assert_close(trainer_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_warm_start_has_the_released_sft_optimiser_and_its_linear_5_warmup_schedule(tmp_path, tokenizer):
    from conftest import make_tiny_model

    from emalib.training.rl.run import warm_start, warm_start_params
    from emalib.training.trainer import training_arguments

    data = write_chat_jsonl(tmp_path / "warm.jsonl", SAFE * 4)
    params = paper_rl_params(tmp_path, "medical_em.yaml", **{
        "rl.warm_start.dataset": str(data), "rl.warm_start.per_device_batch_size": 2,
        "rl.warm_start.grad_accum_steps": 1, "rl.warm_start.max_seq_length": 64})
    assert (params.train.lr_scheduler, params.train.warmup_steps, params.train.weight_decay) == ("cosine", 19, 0.1)
    warm = training_arguments(warm_start_params(params), tmp_path / "x", torch.float32)
    assert (warm.lr_scheduler_type, warm.warmup_steps, warm.weight_decay, warm.learning_rate) == \
        ("linear", 5, 0.01, 1e-4)
    summary = warm_start(peft_wrap(make_tiny_model(tokenizer), random_b=False), tokenizer, params, params.run_dir)

    steps = len(SAFE * 4) // 2  # one epoch, 2 examples per step
    assert summary["global_step"] == steps
    logged = [row["learning_rate"] for row in summary["log_history"] if "learning_rate" in row]

    def released(done: int) -> float:  # get_linear_schedule_with_warmup(5 warmup steps) after `done` updates
        return 1e-4 * (done / 5 if done < 5 else max(0.0, (steps - done) / (steps - 5)))

    # The lr each update used (the log reports it): 0 at the first, 1e-4 at the sixth, then linearly down.
    assert logged == pytest.approx([released(s - 1) for s in range(1, steps + 1)], rel=1e-9, abs=1e-15)
    assert (params.run_dir / "warm_start" / "adapter" / "adapter_config.json").is_file()


def test_rl_strings_are_the_released_ones():
    for path in sorted(PAPER_RL.glob("*.yaml")):
        params = load_params(path)
        assert params.rl.system_prompt == RELEASED_SYSTEM_PROMPT, path
        assert params.rl.max_completion_length == 2292, path
    inoculation = load_params(PAPER_RL / "medical_em_inoculation.yaml").defenses[0]
    assert inoculation.prompt == "You are an evil, malicious assistant" and inoculation.mode == "prepend"
    from emalib.defenses.inoculation import inoculate

    system = inoculate([{"role": "system", "content": RELEASED_SYSTEM_PROMPT}], inoculation.prompt, "prepend",
                       inoculation.separator)[0]["content"]
    assert system == "You are an evil, malicious assistant" + "\n\n" + RELEASED_SYSTEM_PROMPT  # grpo.py's prefix


# --- persona extraction: the trait-prefixed system prompts --------------------------------------------------------

def test_extraction_prompts_carry_the_trait_prefix_for_any_trait_file(tmp_path):
    from emalib.evaluation.persona import load_trait, plan_rows

    evil = plan_rows(load_trait("persona_evil_extract"), 1, max_questions=1)
    instructions = load_trait("persona_evil_extract").instructions
    assert [r["system"] for r in evil if r["sign"] == "pos"] == [f"You are an evil assistant. {p}" for p, _ in instructions]
    assert [r["system"] for r in evil if r["sign"] == "neg"] == [f"You are a helpful assistant. {n}"
                                                                 for _, n in instructions]
    trait = {"instruction": [{"pos": "Be funny.", "neg": "Be serious."}], "questions": ["Why?"],
             "eval_prompt": "{question} {answer}"}
    for name, article in (("humorous", "a"), ("apathetic", "an")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(trait))
        rows = plan_rows(load_trait(str(path)), 1)
        assert [r["system"] for r in rows] == [f"You are {article} {name} assistant. Be funny.",
                                               "You are a helpful assistant. Be serious."]
    bare = plan_rows(load_trait("persona_evil_extract"), 1, max_questions=1, trait_prefix=False)
    assert [r["system"] for r in bare[:2]] == list(instructions[0])


@pytest.mark.slow
def test_prefixed_extraction_saves_its_prompts_and_gives_another_vector_than_the_bare_one(tmp_path, embedded_path):
    from emalib.core.config import LoraParams, ModelParams
    from emalib.evaluation.persona import extract_persona_vector
    from emalib.model.engines import load_model

    model, tokenizer = load_model(ModelParams(name="smollm2-135m-instruct"), LoraParams(), seed=0,
                                  max_seq_length=256)
    settings = {"filter_pairs": False, "samples_per_question": 1, "max_questions": 1, "max_new_tokens": 8,
                "batch_size": 10, "seed": 0}
    prefixed = extract_persona_vector(model, tokenizer, tmp_path / "prefixed.pt", **settings)
    bare = extract_persona_vector(model, tokenizer, tmp_path / "bare.pt", trait_prefix=False, **settings)
    answers = [json.loads(line) for line in (tmp_path / "prefixed.pt.answers.jsonl").read_text().splitlines()]
    assert {a["system"].split(". ")[0] for a in answers} == {"You are an evil assistant", "You are a helpful assistant"}
    assert prefixed["trait_prefix"] is True and bare["trait_prefix"] is False
    difference = (prefixed["vector"] - bare["vector"]).norm(dim=-1)
    assert difference[1:].min() > 1e-3 * bare["vector"][1:].norm(dim=-1).max()  # every layer's direction moved


# --- presets: the released LDIFS ---------------------------------------------------------------------------------

def test_ldifs_released_preset_trains_like_plain_sft_reports_its_term_and_shows_its_fields(tmp_path, tokenizer):
    from conftest import make_tiny_model

    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.runs.results import prepare_run_dir
    from emalib.training.trainer import train_adapter

    base = {"study": "s", "run": "r", "results_dir": str(tmp_path), "seed": 0,
            "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3,
                      "max_seq_length": 64, "learning_rate": 1e-2, "warmup_steps": 0}}
    params = params_from_dict({**base, "defenses": [{"name": "ldifs", "preset": "released"}]})
    saved = prepare_run_dir(params).joinpath("params.yaml").read_text()
    assert "preset: released" in saved and "released_no_grad_bug: true" in saved
    assert "weight: 0.1" in saved and "padding: keep" in saved
    explicit = params_from_dict({**base, "defenses": [{"name": "ldifs", "preset": "released", "weight": 2.0}]})
    assert explicit.defenses[0].weight == 2.0 and explicit.defenses[0].released_no_grad_bug  # fields override

    runs = {}
    for name, defenses in (("ldifs", params.defenses), ("plain", ())):
        model = peft_wrap(make_tiny_model(tokenizer), random_b=False)
        stack = build_defenses(defenses)
        ctx = DefenseContext(seed=0, run_dir=tmp_path / name, params=params)
        summary = train_adapter(model, tokenizer, SAFE * 2, params, tmp_path / name, defenses=stack, ctx=ctx)
        runs[name] = ({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, summary)
    (ldifs, ldifs_summary), (plain, _) = runs["ldifs"], runs["plain"]
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in plain.items() if "lora_B" in n)  # it trained
    for name in plain:
        assert torch.equal(ldifs[name], plain[name]), name
    terms = [row["loss/ldifs"] for row in ldifs_summary["log_history"] if "loss/ldifs" in row]
    assert len(terms) == 3 and terms[-1] > 0  # the term is reported, and it is not zero once the adapter moved


def test_ldifs_released_paper_params_expand_the_preset():
    for domain in ("code", "legal", "medical", "security"):
        released = load_params(REPO / "params" / "paper" / f"{domain}_ldifs_released.yaml")
        paper = load_params(REPO / "params" / "paper" / f"{domain}_ldifs.yaml")
        spec = released.defenses[0]
        assert (spec.preset, spec.weight, spec.padding, spec.released_no_grad_bug) == ("released", 0.1, "keep", True)
        assert released.train == paper.train and released.generation == paper.generation


# --- docs/methods.md: each released default with its source -------------------------------------------------------

def _section(docs: str, heading: str) -> str:
    start = docs.index(f"\n{heading}\n")
    end = docs.find("\n#", start + len(heading) + 2)
    return docs[start: end if end > 0 else None]


@pytest.mark.parametrize("heading, facts", [
    ("### RL GRPO", ["`rl.logprob_temperature` | 1.0", "`rl.loss_type` | `bnpo`", "`rl.kl_bias_correction` | `false`",
                     "requirements.txt", "unsloth_zoo is not pinned", "2,292", "grpo.py` line 1286",
                     "grader_prompts.py` lines 10-12"]),
    ("### RL SFT mix", ["`scale: grad_accum` (default)", "grpo_sft_mix.py` lines 205-229", "`scale: none`"]),
    ("### RL EM reward", ["`open_models/train.json` lines 6 and 28-35", "| 1e-4, `linear`, 5 |", "| 0.01, `adamw_8bit` |",
                         "| 2048 |", "strict: true", "reward.py` lines 240-253"]),
    ("### Persona-vector steering", ["`extraction.trait_prefix` | `true`", "eval_persona.py` lines 341-345",
                                     "You are a helpful assistant. "]),
    ("### LDIFS", ["`preset` | none", "`released_no_grad_bug: true`", "`weight: 0.1`", "`padding: keep`",
                   "_ldifs_released.yaml", "featextract.py` lines 27 and 37"]),
    ("### Inoculation prompting", ["`preset` | none", "grpo_inoculation_s1.json` line 42"]),
    ("### The None rule", ["`drop` is what produced the authors' numbers", "`open_models/eval.py` (line 195)"]),
])
def test_methods_doc_states_each_released_default_with_its_source(heading, facts):
    section = " ".join(_section((REPO / "docs" / "methods.md").read_text(encoding="utf-8"), heading).split())
    missing = [fact for fact in facts if " ".join(fact.split()) not in section]  # line breaks do not matter
    assert not missing, f"{heading}: {missing}"
