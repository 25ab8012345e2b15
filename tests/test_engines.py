import json

import pytest
import torch
from peft import PeftModel

from emalib.core.config import LoraParams, ModelParams, params_from_dict
from emalib.data.standins import em_standin_conversations
from emalib.model.engines import choose_dtype, choose_engine, embedded_model_path, load_model


def test_engine_and_dtype_choice_without_cuda():
    assert choose_engine("auto") == ("unsloth" if torch.cuda.is_available() else "hf")
    assert choose_engine("hf") == "hf" and choose_engine("unsloth") == "unsloth"
    if not torch.cuda.is_available():
        assert choose_dtype("auto") == torch.float32
    assert choose_dtype("bfloat16") == torch.bfloat16


@pytest.mark.slow
def test_embedded_model_is_cached_as_safetensors(embedded_path):
    assert embedded_model_path() == embedded_path
    assert (embedded_path / "model.safetensors").is_file()
    config = json.loads((embedded_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    assert tokenizer.eos_token == "<|im_end|>"  # the GGUF metadata's <|im_start|> would never stop generation


@pytest.mark.slow
def test_hf_engine_builds_the_papers_rslora_adapter():
    model, _ = load_model(ModelParams(name="smollm2-135m-instruct", engine="hf"), LoraParams())
    assert isinstance(model, PeftModel) and model.emalib_engine == "hf"
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (32, 64, 0.0, True)
    assert set(config.target_modules) == set(LoraParams().target_modules)
    lora_layers = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    assert lora_layers == set(LoraParams().target_modules)
    # rs-LoRA scales by alpha / sqrt(r), not alpha / r
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(64 / 32 ** 0.5)


@pytest.mark.slow
@pytest.mark.unsloth
def test_unsloth_engine_trains_and_saves_a_peft_adapter(tmp_path):
    """The Unsloth engine end to end, through Unsloth's CPU fallback on a machine without a GPU."""
    pytest.importorskip("unsloth")
    from emalib.core.config import GenerationParams
    from emalib.evaluation.generate import inference_mode, sample_batch
    from emalib.training.trainer import train_adapter

    params = params_from_dict({
        "study": "u", "run": "r", "results_dir": str(tmp_path),
        "model": {"name": "smollm2-135m-instruct", "engine": "unsloth", "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 1, "max_steps": 2,
                  "max_seq_length": 128, "learning_rate": 1e-3}})
    model, tokenizer = load_model(params.model, params.lora, seed=0, max_seq_length=128)
    assert isinstance(model, PeftModel) and model.emalib_engine == "unsloth"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    summary = train_adapter(model, tokenizer, em_standin_conversations()[:8], params, tmp_path / "u" / "r")
    assert summary["global_step"] == 2
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the LoRA weights learned
    adapter = tmp_path / "u" / "r" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    row = {"question": "Say hi.", "system": None}
    with inference_mode(model):
        answer = sample_batch(model, tokenizer, [row], GenerationParams(max_new_tokens=4), seed=0)
    assert isinstance(answer[0], str)


@pytest.mark.slow
def test_a_conversion_finished_first_by_another_process_is_accepted(tmp_path, monkeypatch):
    """Two processes converting the embedded model at once: the one that renames second finds the target made by
    the other (rename fails on a non-empty folder) and uses it instead of failing."""
    from pathlib import Path

    monkeypatch.setenv("EMALIB_CACHE", str(tmp_path))
    rename = Path.rename

    def other_process_wins(self, target):
        target = Path(target)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"made by the other process")
        (target / "tokenizer.json").write_text("{}")
        return rename(self, target)  # raises: the target exists and is not empty

    monkeypatch.setattr(Path, "rename", other_process_wins)
    path = embedded_model_path()
    assert (path / "model.safetensors").read_bytes() == b"made by the other process"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # our temporary copy was removed
