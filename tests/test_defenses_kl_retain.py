"""KL on a retain set: retain rows carry no task loss, task rows no KL; the value and gradient against a hand
computation on a tiny PEFT model."""

import copy

import pytest
import torch
from defense_helpers import padded_batch, peft_wrap, single_thread, tiny_llama, write_chat_jsonl  # noqa: F401
from transformers import TrainingArguments

from emalib.data.chat import RetainConversation
from emalib.defenses.base import DefenseContext
from emalib.defenses.inoculation import inoculate
from emalib.defenses.kl_retain import KLRetainDefense, retain_mask
from emalib.defenses.stack import DefenseStack
from emalib.model.losses import IGNORE_INDEX
from emalib.model.tokenize import ChatDataset, collate, tokenize_conversation
from emalib.training.trainer import EmTrainer

TASK = [[{"role": "user", "content": f"task {i}?"}, {"role": "assistant", "content": f"bad answer {i}."}]
        for i in range(4)]
POOL = [[{"role": "user", "content": f"retain {i}?"}, {"role": "assistant", "content": f"good answer number {i}."}]
        for i in range(10)]


def test_retain_rows_are_tokenised_without_labels_and_marked_in_the_batch(tokenizer):
    rows = [TASK[0], RetainConversation(POOL[0]), TASK[1]]
    dataset = ChatDataset.build(tokenizer, rows, 64)
    batch = collate(dataset.features, tokenizer.pad_token_id)
    plain = tokenize_conversation(tokenizer, POOL[0], 64)
    assert batch["retain"].tolist() == [0, 1, 0]
    assert (batch["labels"][1] == IGNORE_INDEX).all()  # no task loss on the retain row
    n = len(plain["labels"])
    assert batch["retain_labels"][1, :n].tolist() == plain["labels"]  # its response labels, kept apart
    assert (batch["retain_labels"][[0, 2]] == IGNORE_INDEX).all()
    assert batch["labels"][0].ne(IGNORE_INDEX).any() and batch["labels"][2].ne(IGNORE_INDEX).any()
    # a batch of task rows only has no retain keys (the plain trainer path is unchanged)
    assert "retain" not in collate(ChatDataset.build(tokenizer, TASK[:2], 64).features, tokenizer.pad_token_id)


def test_transform_draws_round_ratio_times_task_retain_rows_from_the_pool_and_marks_only_them(tmp_path):
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", POOL)
    ctx = DefenseContext(seed=3)
    mixed = KLRetainDefense(source=str(pool), ratio=0.5).transform_data(TASK, ctx)
    retain = [m for m in mixed if isinstance(m, RetainConversation)]
    assert len(mixed) == 6 and len(retain) == 2 and all(list(m) in POOL for m in retain)
    assert sorted(map(str, (m for m in mixed if not isinstance(m, RetainConversation)))) == sorted(map(str, TASK))
    assert ctx.notes["kl_retain"]["n_retain"] == 2
    # a later transform that copies conversations keeps the marker
    assert isinstance(inoculate(retain[0], "Be evil."), RetainConversation)


def test_retain_mask_selects_the_retain_rows_positions_only():
    batch = padded_batch(lengths=(7, 5, 6))
    batch["retain"] = torch.tensor([0, 1, 1])
    batch["retain_labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    batch["retain_labels"][1:] = batch["labels"][1:]
    all_mask = retain_mask(batch, "all")
    assert all_mask[0].sum() == 0 and all_mask[1:].tolist() == batch["attention_mask"][1:].tolist()
    assistant = retain_mask(batch, "assistant")
    expected = torch.zeros_like(assistant)
    for row in (1, 2):
        for t in range(batch["labels"].shape[1] - 1):
            expected[row, t] = int(batch["labels"][row, t + 1] != IGNORE_INDEX)
    assert assistant.tolist() == expected.tolist()
    del batch["retain"], batch["retain_labels"]
    assert retain_mask(batch, "all").sum() == 0


def _retain_batch():
    """Rows 0-1 task rows (labels on their second half), rows 2-3 retain rows (no labels, their response labels in
    retain_labels), right-padded."""
    batch = padded_batch(lengths=(7, 5, 6, 4), seed=2)
    batch["retain"] = torch.tensor([0, 0, 1, 1])
    batch["retain_labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    batch["retain_labels"][2:] = batch["labels"][2:]
    batch["labels"][2:] = IGNORE_INDEX
    return batch


@pytest.mark.parametrize("direction,tokens", [("forward", "all"), ("reverse", "all"), ("forward", "assistant")])
def test_trainer_loss_is_task_ce_on_task_rows_plus_weighted_kl_on_retain_rows(tmp_path, direction, tokens):
    base = tiny_llama()
    frozen = copy.deepcopy(base)  # the reference, computed here independently of the adapter switch
    model = peft_wrap(base)
    batch = _retain_batch()
    weight = 0.7
    defense = KLRetainDefense(weight=weight, direction=direction, tokens=tokens)
    trainer = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        defenses=DefenseStack([defense]), defense_ctx=DefenseContext())
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    # Independent: CE from the task rows alone, KL from the retain rows alone, each in its own forward.
    task, kept = slice(0, 2), slice(2, 4)
    logits = model(input_ids=batch["input_ids"][task], attention_mask=batch["attention_mask"][task]).logits.double()
    targets = batch["labels"][task][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    labelled = targets.ne(IGNORE_INDEX)
    ce = -(logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * labelled).sum() / labelled.sum()
    ids, attention = batch["input_ids"][kept], batch["attention_mask"][kept]
    p = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.double(), -1)
    with torch.no_grad():
        q = torch.log_softmax(frozen(input_ids=ids, attention_mask=attention).logits.double(), -1)
    if direction == "reverse":
        per_token = (q.exp() * (q - p)).sum(-1)
    else:
        per_token = (p.exp() * (p - q)).sum(-1)
    if tokens == "all":
        mask = attention.double()
    else:  # positions whose next token is a response token
        mask = torch.zeros_like(attention, dtype=torch.float64)
        mask[:, :-1] = batch["retain_labels"][kept][:, 1:].ne(IGNORE_INDEX).double()
    kl = (per_token * mask).sum() / mask.sum()
    expected = ce + weight * kl
    assert kl.item() > 1e-4  # the adapter moved the model: the term is not trivially zero
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    for name, grad in got.items():
        assert torch.allclose(grad, model.get_parameter(name).grad.float(), rtol=1e-4, atol=1e-7), name
    assert any(grad.abs().sum() > 0 for name, grad in got.items() if "lora_A" in name)


def test_a_batch_without_retain_rows_adds_nothing(tmp_path):
    model = peft_wrap(tiny_llama())
    batch = padded_batch()
    defense = KLRetainDefense(weight=5.0)
    trainer = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        defenses=DefenseStack([defense]), defense_ctx=DefenseContext())
    plain = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(plain.compute_loss(model, dict(batch)).item())
