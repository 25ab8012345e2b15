"""The defenses do what they are for, on the embedded model: after the same short fine-tune on the EM stand-in,
KL (lambda > 0) ends closer to the base model's next-token distributions on held-out general prompts than plain
SFT, and LDIFS ends with a smaller feature distance to the base model than plain SFT."""

from __future__ import annotations

import pytest
import torch

from emalib.core.config import params_from_dict

pytestmark = pytest.mark.slow


def _fine_tune(tmp_path, name: str, defenses: list[dict]):
    from emalib.runs import pipeline

    params = params_from_dict({
        "study": "effect", "run": name, "results_dir": str(tmp_path), "seed": 0,
        "model": {"name": "smollm2-135m-instruct"}, "lora": {"r": 8, "alpha": 16},
        "train": {"dataset": "standin_em_train", "optim": "adamw_torch", "per_device_batch_size": 8,
                  "grad_accum_steps": 1, "max_steps": 8, "learning_rate": 5e-4, "warmup_steps": 1,
                  "max_seq_length": 160},
        "generation": {"question_sets": ["standin_general"]},
        "defenses": defenses})
    return pipeline.train(params)


def _held_out_general_batch(tokenizer):
    """The general questions (never trained on) with their aligned reference answers."""
    from emalib.data.questions import load_questions
    from emalib.evaluation.signals import _batch, reference_pairs

    return _batch(tokenizer, reference_pairs(load_questions("standin_general")), "aligned", "cpu")


@torch.no_grad()
def _distances_to_base(model, tokenizer) -> tuple[float, float]:
    """(mean per-token KL(p_model || p_base) over all tokens, LDIFS feature distance), adapter on vs off."""
    from emalib.defenses.ldifs import select_layers
    from emalib.model.losses import ldifs_distance, ldifs_features, token_kl
    from emalib.model.modeling import block_outputs, last_block_output

    batch = _held_out_general_batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with last_block_output(model) as last:
        tuned = model(**inputs, output_hidden_states=True)
        tuned_blocks = block_outputs(tuned.hidden_states, last["output"])
        with model.disable_adapter():
            base = model(**inputs, output_hidden_states=True)
        base_blocks = block_outputs(base.hidden_states, last["output"])
    chosen = select_layers(model.config.num_hidden_layers)
    features = [ldifs_features([blocks[i] for i in chosen], batch["attention_mask"])
                for blocks in (tuned_blocks, base_blocks)]
    kl = token_kl(tuned.logits, base.logits, batch["attention_mask"])
    return float(kl), float(ldifs_distance(*features))


def test_kl_and_ldifs_keep_the_model_closer_to_base_than_plain_sft(tmp_path):
    plain_kl, plain_ldifs = _distances_to_base(*_fine_tune(tmp_path, "plain", []))
    kl_kl, _ = _distances_to_base(*_fine_tune(tmp_path, "kl", [{"name": "kl", "weight": 0.1}]))
    _, ldifs_ldifs = _distances_to_base(*_fine_tune(tmp_path, "ldifs", [{"name": "ldifs", "weight": 1.0}]))
    assert plain_kl > 0 and plain_ldifs > 0
    assert kl_kl < plain_kl, (kl_kl, plain_kl)
    assert ldifs_ldifs < plain_ldifs, (ldifs_ldifs, plain_ldifs)
