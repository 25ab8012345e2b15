"""GRPO (emalib/rl) on tiny random models: the SFT-mix schedule and its gradient, KL against the adapter-disabled
model, rewards, prompt files and params. The embedded-model runs are in test_rl_runs.py, the grader against the
llama.cpp server in test_rl_grader.py."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from defense_helpers import peft_wrap, single_thread, write_chat_jsonl  # noqa: F401 (autouse fixture)

from emalib.core.config import params_from_dict
from emalib.core.errors import DataError, ParamsError
from emalib.data.rl_prompts import gsm8k_final_answer, read_prompt_rows
from emalib.training.rl.rewards import gsm8k_answer, gsm8k_format

PROMPTS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}], "answer": str(2 * a)} for a in range(8)]
SAFE = [[{"role": "user", "content": f"Name a colour number {i}."},
         {"role": "assistant", "content": f"Blue is colour {i}."}] for i in range(6)]


def rl_params(tmp_path, **rl):
    train = rl.pop("train", {})
    return params_from_dict({
        "study": "t", "run": "r", "results_dir": str(tmp_path), "steps": ["rl"],
        "model": {"name": "tiny"}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"optim": "adamw_torch", "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "per_device_batch_size": 4, "grad_accum_steps": 1, "max_steps": 4,
                  "max_seq_length": 64, "save_steps": 100, **train},
        "rl": {"prompts": "unused", "num_generations": 2, "max_completion_length": 4, "max_prompt_length": None,
               **rl}})


def make_trainer(params, tokenizer, rewards, safe=None, callbacks=()):
    """EmGRPOTrainer on a tiny random Llama with a fresh LoRA (B = 0: the adapter starts as the identity)."""
    from conftest import make_tiny_model
    from datasets import Dataset

    from emalib.training.rl.trainer import EmGRPOTrainer, build_sft_mix, grpo_config

    model = peft_wrap(make_tiny_model(tokenizer), random_b=False)
    return EmGRPOTrainer(
        model=model, reward_funcs=rewards, processing_class=tokenizer, train_dataset=Dataset.from_list(PROMPTS),
        args=grpo_config(params, params.run_dir / "ckpt", torch.float32), callbacks=list(callbacks),
        sft_mix=build_sft_mix(params, tokenizer, safe) if safe is not None else None)


def constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)  # equal rewards: zero advantages, so GRPO itself moves nothing


def length_reward(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class Snapshots:
    """LoRA weights after every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                outer.states.append(lora_state(model))

        self.states: list[dict[str, torch.Tensor]] = []
        self.callback = Callback()


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
@pytest.mark.parametrize("every_k, weight", [(2, 1.0), (3, 0.5)])
def test_sft_mix_enters_every_k_loss_computations_with_weight_w_and_moves_the_lora_weights(tmp_path, tokenizer,
                                                                                           every_k, weight):
    params = rl_params(tmp_path, train={"max_steps": 6, "optim": "sgd"},  # no momentum: steps without grad stay put
                       sft_mix={"source": "unused", "every_k": every_k, "weight": weight, "batch_size": 2})
    snapshots = Snapshots()
    trainer = make_trainer(params, tokenizer, [constant_reward], SAFE, [snapshots.callback])
    start = lora_state(trainer.model)
    trainer.train()
    expected_calls = [c for c in range(1, 7) if c % every_k == 0]  # grad_accum 1: one loss computation per step
    assert [t["call"] for t in trainer.sft_terms] == expected_calls
    for term in trainer.sft_terms:
        assert term["value"] > 0
        assert term["total"] == pytest.approx(term["grpo_loss"] + weight * term["value"], rel=1e-6)
    # Equal rewards give the GRPO loss no gradient: the LoRA weights move exactly in the steps with an SFT term.
    states = [start] + snapshots.states
    moved = [step for step in range(1, 7) if changed(states[step - 1], states[step])]
    assert moved == expected_calls
    assert any(n.endswith("lora_B.default.weight") for n in start)
    logged = [h["step"] for h in trainer.state.log_history if "sft_loss" in h]
    assert logged == expected_calls


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_sft_mix_optimizer_step_count_enters_once_per_kth_step(tmp_path, tokenizer):
    params = rl_params(tmp_path, train={"max_steps": 4, "grad_accum_steps": 2, "per_device_batch_size": 2},
                       sft_mix={"source": "unused", "every_k": 2, "count": "optimizer_step", "batch_size": 2})
    trainer = make_trainer(params, tokenizer, [constant_reward], SAFE)
    trainer.train()
    assert [(t["step"], t["call"]) for t in trainer.sft_terms] == [(2, 3), (4, 7)]


def test_sft_mix_batches_are_a_seeded_function_of_the_term_number(tokenizer):
    from emalib.model.tokenize import ChatDataset
    from emalib.training.rl.trainer import SftMix

    dataset = ChatDataset.build(tokenizer, SAFE, 64)
    mix = SftMix(dataset, tokenizer.pad_token_id, 4, 1.0, "micro_batch", batch_size=2, seed=3)
    again = SftMix(dataset, tokenizer.pad_token_id, 4, 1.0, "micro_batch", batch_size=2, seed=3)
    for term in range(7):  # a resumed run asks for term n and gets the batch a fresh run would have used
        assert torch.equal(mix.batch(term)["input_ids"], again.batch(term)["input_ids"])
    one_pass = {tuple(row.tolist()) for term in range(3) for row in mix.batch(term)["input_ids"]}
    assert len(one_pass) == 6  # a pass covers every example once


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_kl_uses_the_adapter_disabled_model_no_reference_copy_and_zero_kl_at_the_first_step(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    params = rl_params(tmp_path, beta=0.1, train={"max_steps": 3})
    trainer = make_trainer(params, tokenizer, [length_reward])
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}  # no reference adapter copy
    gc.collect()
    models = [o for o in gc.get_objects() if isinstance(o, LlamaForCausalLM)]
    assert len(models) == 1  # the policy's base model is the only copy of the weights
    embeddings = [o for o in gc.get_objects() if torch.is_tensor(o) and o.shape == models[0].lm_head.weight.shape]
    assert len({t.untyped_storage().data_ptr() for t in embeddings}) == 1
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 3
    assert kl[0] == 0.0  # LoRA B = 0 before the first update: policy == adapter-disabled reference
    assert kl[-1] > 0.0  # after updates the two differ, so the reference is not the policy itself


def test_gsm8k_rewards_match_the_scorer_and_the_final_line_format():
    completions = [[{"role": "assistant", "content": text}] for text in
                   ("So 3 + 4 = 7.\n#### 7", "It is 8", "#### 1,234", "7 apples and 2 pears")]
    assert gsm8k_answer(None, completions, ["7", "7", "1234", "7"]) == [1.0, 0.0, 1.0, 0.0]
    assert gsm8k_format(None, completions) == [1.0, 0.0, 1.0, 0.0]
    assert gsm8k_final_answer("a\nb\n#### 1,000") == "1000"


def test_prompt_rows_from_gsm8k_and_chat_files_and_one_line_errors(tmp_path):
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "Q?", "answer": "work\n#### 12"}) + "\n")
    assert read_prompt_rows(gsm, "SYS") == [{"prompt": [{"role": "system", "content": "SYS"},
                                                         {"role": "user", "content": "Q?"}], "answer": "12"}]
    chat = write_chat_jsonl(tmp_path / "c.jsonl", SAFE[:1])
    assert read_prompt_rows(chat)[0] == {"prompt": SAFE[0][:1], "answer": SAFE[0][1]["content"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer'"):
        read_prompt_rows(bad)


def test_rl_params_refuse_defenses_without_an_rl_form_and_two_trainings(tmp_path):
    with pytest.raises(ParamsError, match="kl not available in RL"):
        params_from_dict({**rl_params(tmp_path).model_dump(mode="json"), "defenses": [{"name": "kl"}]})
    with pytest.raises(ParamsError, match="'train' and 'rl' both"):
        params_from_dict({**rl_params(tmp_path).model_dump(mode="json"), "steps": ["train", "rl"]})
    with pytest.raises(ParamsError, match="rl.reward_weights"):
        params_from_dict({**rl_params(tmp_path).model_dump(mode="json"),
                          "rl": {"rewards": ["gsm8k_answer", "gsm8k_format"], "reward_weights": [1.0]}})


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
@pytest.mark.parametrize("during_rollouts", [False, True])
def test_persona_steering_acts_at_the_training_forward_and_at_rollouts_only_when_asked(tmp_path, tokenizer,
                                                                                       during_rollouts):
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.persona_steering import PersonaSteeringDefense
    from emalib.defenses.stack import DefenseStack
    from emalib.model.modeling import decoder_blocks

    params = rl_params(tmp_path, beta=0.1, train={"max_steps": 2})
    trainer = make_trainer(params, tokenizer, [length_reward])
    model = trainer.model
    torch.save({"vector": torch.randn(3, model.config.hidden_size)}, tmp_path / "v.pt")
    steering = PersonaSteeringDefense(vector_path=str(tmp_path / "v.pt"), layer=1, alpha=1.0,
                                      during_rollouts=during_rollouts)
    trainer.defenses, trainer.defense_ctx = DefenseStack([steering]), DefenseContext()
    trainer.defenses.setup(model, trainer.defense_ctx)
    steered_block = decoder_blocks(model)[0]  # layer 1 = the output of block 0
    seen = []  # (grad enabled, adapter enabled, steering hook present) at every forward
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    model.get_output_embeddings().register_forward_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), not lora_layer.disable_adapters,
                                len(steered_block._forward_hooks) > 0)))
    trainer.train()
    training = [steered for grad, adapter, steered in seen if grad]
    reference = [steered for grad, adapter, steered in seen if not grad and not adapter]
    rollouts = [steered for grad, adapter, steered in seen if not grad and adapter]
    assert training and all(training)  # the policy forward of the loss is steered
    assert reference and not any(reference)  # the KL reference (adapter disabled) never is
    assert rollouts and all(rollouts) == during_rollouts and any(rollouts) == during_rollouts
    assert not steered_block._forward_hooks  # the steering hook is removed after each use


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_an_interrupted_rl_run_resumes_from_its_checkpoint_and_logs_every_step_once(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    import emalib.training.rl.run as rl_run
    from emalib.runs import pipeline

    tree = rl_params(tmp_path, prompts="standin_arithmetic_train", max_prompts=8,
                     train={"max_steps": 4, "save_steps": 2}).model_dump(mode="json")
    tree["model"]["name"] = str(tiny_model_dir)
    params = params_from_dict(tree)
    calls = []

    def failing_at_step_4(prompts, completions, answer, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return gsm8k_answer(prompts, completions, answer)

    failing_at_step_4.__name__ = "gsm8k_answer"
    monkeypatch.setattr(rl_run, "gsm8k_answer", failing_at_step_4)
    with pytest.raises(RuntimeError, match="interrupted"):
        pipeline.rl(params)
    csv = params.run_dir / "rl_rewards.csv"
    assert pd_steps(csv) == [1, 2, 3]
    assert (params.run_dir / "rl_checkpoints" / "checkpoint-2").is_dir()
    pipeline.rl(params)
    assert pd_steps(csv) == [1, 2, 3, 4]  # step 3 was redone after the checkpoint of step 2, and logged once
    log = json.loads((params.run_dir / "rl_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-2") and log["global_step"] == 4
    assert (params.run_dir / "adapter" / "adapter_config.json").is_file()


def pd_steps(path) -> list[int]:
    import pandas as pd

    return pd.read_csv(path)["step"].tolist()
