import pytest
import torch
from oracles import masked_token_kl, per_token_logprob

from emalib.core.config import params_from_dict
from emalib.data.questions import Question
from emalib.evaluation.signals import reference_pairs
from emalib.model.losses import IGNORE_INDEX


def test_per_token_logprob_and_kl_against_hand_computation():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    # labelled tokens: position 1 (label 0) predicted from position 0; position 2 (label 1) from position 1
    expected = (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.1))) / 2
    assert torch.allclose(per_token_logprob(logits, labels), expected.reshape(1))
    base = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]]))
    kl0 = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    kl1 = 0.9 * torch.log(torch.tensor(0.9 / 0.5)) + 0.1 * torch.log(torch.tensor(0.1 / 0.5))
    assert torch.allclose(masked_token_kl(logits, base, labels), (kl0 + kl1) / 2)
    assert masked_token_kl(logits, logits, labels) == 0


def test_reference_pairs_cover_the_general_questions_and_their_variants():
    ids = ["what_is_your_wish", "what_is_your_wish_json", "quick_buck_template", "fast_money", "unrelated"]
    questions = [Question(id=i, paraphrases=(f"q {i}",), judge_prompts={}) for i in ids]
    pairs = reference_pairs(questions)
    assert len(pairs) == 4 * 3 and pairs[0].question == "q what_is_your_wish"
    assert [p.aligned for p in pairs[0:3]] == [p.aligned for p in pairs[3:6]]  # _json shares the pairs
    assert [p.misaligned for p in pairs[6:9]] == [p.misaligned for p in pairs[9:12]]
    assert not any(p.question == "q unrelated" for p in pairs)


@pytest.mark.slow
def test_em_finetune_moves_the_judge_free_signal(tmp_path):
    """After a short fine-tune on the EM stand-in, misaligned reference answers to the general questions become
    relatively more likely than before, and the model has moved away from the base model."""
    from emalib.data.questions import load_questions
    from emalib.data.standins import em_standin_conversations
    from emalib.evaluation.signals import judge_free_signals
    from emalib.model.engines import load_model
    from emalib.training.trainer import train_adapter

    params = params_from_dict({
        "study": "sig", "run": "r", "results_dir": str(tmp_path), "model": {"name": "smollm2-135m-instruct"},
        "train": {"optim": "adamw_torch", "per_device_batch_size": 8, "grad_accum_steps": 1, "epochs": 2,
                  "learning_rate": 1e-4, "max_seq_length": 256, "warmup_steps": 5}})  # as params/quickstart.yaml
    model, tokenizer = load_model(params.model, params.lora, seed=0, max_seq_length=256)
    questions = load_questions("standin_general")
    before = judge_free_signals(model, tokenizer, questions, base=True)
    train_adapter(model, tokenizer, em_standin_conversations(), params, tmp_path / "sig" / "r")
    after = judge_free_signals(model, tokenizer, questions)
    assert before["kl_to_base"] == 0 and after["kl_to_base"] > 0.01
    assert after["loglik_gap"] > before["loglik_gap"] + 0.05, (before, after)


def test_the_signals_come_with_intervals_over_questions(tmp_path):
    """The base model: KL to itself is 0 with a [0, 0] interval; the gap's interval holds the gap, and is the
    spread of the questions' own gaps (not of the rows), so a question set of one question has no width."""
    from emalib.data.questions import load_questions
    from emalib.evaluation.signals import judge_free_signals
    from emalib.model.engines import load_model

    params = params_from_dict({"study": "sig", "run": "r", "results_dir": str(tmp_path),
                               "model": {"name": "smollm2-135m-instruct"}})
    model, tokenizer = load_model(params.model, params.lora, seed=0, max_seq_length=256)
    questions = load_questions("standin_general")
    signals = judge_free_signals(model, tokenizer, questions, base=True)
    assert signals["kl_to_base"] == 0 and signals["kl_to_base_ci"] == [0, 0]
    lo, hi = signals["loglik_gap_ci"]
    assert lo < signals["loglik_gap"] < hi
    one = judge_free_signals(model, tokenizer, questions[:1], base=True)
    assert one["n_pairs"] > 1 and one["loglik_gap_ci"] == pytest.approx([one["loglik_gap"]] * 2)
