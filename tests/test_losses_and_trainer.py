import json

import pytest
import torch
from peft import PeftModel

from emalib.core.config import params_from_dict
from emalib.core.errors import ParamsError
from emalib.data.standins import em_standin_conversations
from emalib.model.losses import IGNORE_INDEX, token_cross_entropy_sum
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.trainer import EmTrainer, train_adapter


def test_cross_entropy_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    total, n = token_cross_entropy_sum(logits, labels)
    # Only position 0 predicts a labelled token (label 1 at position 1): -log softmax([2, 0, 0])[1].
    expected = -(0.0 - torch.logsumexp(torch.tensor([2.0, 0.0, 0.0]), 0))
    assert n == 1 and torch.allclose(total, expected)


def peft_tiny(model, r=4):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, config)


def tiny_params(tmp_path, **train):
    return params_from_dict({"study": "t", "run": "r", "results_dir": str(tmp_path), "seed": 0,
                             "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 2,
                                       "max_seq_length": 128, "logging_steps": 1, **train}})


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_loss_is_independent_of_the_micro_batch_split(tokenizer, tiny_model, tmp_path):
    """The trainer normalises by the labelled tokens of the whole accumulated batch."""
    model = peft_tiny(tiny_model)
    features = ChatDataset.build(tokenizer, em_standin_conversations()[:4], 128).features
    full = collate(features, tokenizer.pad_token_id)
    trainer = EmTrainer(model=model, args=__import__("transformers").TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True))
    n_items = full["labels"][:, 1:].ne(IGNORE_INDEX).sum()
    whole = trainer.compute_loss(model, dict(full), num_items_in_batch=n_items)
    halves = sum(trainer.compute_loss(model, collate(features[i:i + 2], tokenizer.pad_token_id), num_items_in_batch=n_items)
                 for i in (0, 2))
    # Independent computation: mean token NLL over all labelled tokens of the four examples.
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                            full["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(whole, nll, atol=1e-5) and torch.allclose(halves, nll, atol=1e-5)


def test_gradient_reaches_the_lora_weights_only(tokenizer, tiny_model, tmp_path):
    model = peft_tiny(tiny_model)
    batch = collate(ChatDataset.build(tokenizer, em_standin_conversations()[:2], 128).features, tokenizer.pad_token_id)
    trainer = EmTrainer(model=model, args=__import__("transformers").TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True))
    trainer.compute_loss(model, batch).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def _adapter_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_train_saves_a_standard_peft_adapter(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from emalib.core.config import LoraParams, ModelParams
    from emalib.model.engines import load_model

    lora = LoraParams(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model_params = ModelParams(name=str(tiny_model_dir), engine="hf")
    model, tok = load_model(model_params, lora, seed=0, max_seq_length=128)
    run_dir = tmp_path / "t" / "r"
    summary = train_adapter(model, tok, em_standin_conversations()[:16], tiny_params(tmp_path, max_steps=2), run_dir)
    assert summary["global_step"] == 2 and not (run_dir / "checkpoints").exists()
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is True
    # Standard PEFT format: plain peft loads it and reproduces the trained model's outputs.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    ids = torch.tensor([[1, 5, 9, 13]])
    model.eval()
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(base(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_an_interrupted_training_resumes_to_the_same_adapter(tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    from emalib.core.config import LoraParams, ModelParams
    from emalib.model.engines import load_model

    conversations = em_standin_conversations()[:16]
    lora = LoraParams(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model_params = ModelParams(name=str(tiny_model_dir), engine="hf")
    params = tiny_params(tmp_path, max_steps=4, save_steps=2)

    model, tok = load_model(model_params, lora, seed=0, max_seq_length=128)
    straight = train_adapter(model, tok, conversations, params, tmp_path / "straight")

    # Kill the second run in optimizer step 3 (micro-batch 5 with 2 accumulation steps): checkpoint-2 is on disk.
    original = EmTrainer.compute_loss
    calls = {"n": 0}

    def dying_compute_loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmTrainer, "compute_loss", dying_compute_loss)
    model, tok = load_model(model_params, lora, seed=0, max_seq_length=128)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tok, conversations, params, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed" / "adapter").exists()

    monkeypatch.setattr(EmTrainer, "compute_loss", original)
    model, tok = load_model(model_params, lora, seed=0, max_seq_length=128)
    resumed = train_adapter(model, tok, conversations, params, tmp_path / "resumed")
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == straight["global_step"] == 4
    a, b = _adapter_weights(tmp_path / "straight" / "adapter"), _adapter_weights(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_train_report_to_is_passed_to_the_trainers_or_refused_in_one_line_when_missing(tmp_path, monkeypatch):
    from transformers.integrations import is_tensorboard_available

    from emalib.core.errors import EmalibError
    from emalib.training.trainer import trainer_arguments

    plain = params_from_dict({"study": "s", "run": "r"})
    assert trainer_arguments(plain, tmp_path, torch.float32)["report_to"] == "none"  # the default: no logger
    logged = params_from_dict({"study": "s", "run": "r", "train": {"report_to": ["tensorboard"]}})
    if is_tensorboard_available():
        assert trainer_arguments(logged, tmp_path, torch.float32)["report_to"] == ["tensorboard"]
    monkeypatch.setattr("transformers.integrations.is_tensorboard_available", lambda: False)
    with pytest.raises(EmalibError, match=r"^train\.report_to: tensorboard is not installed here"):
        trainer_arguments(logged, tmp_path, torch.float32)
    with pytest.raises(ParamsError, match="report_to"):
        params_from_dict({"study": "s", "run": "r", "train": {"report_to": ["mlflow"]}})
