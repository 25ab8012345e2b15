"""Every computation over the vocabulary, chunked, equals the plain one (values and gradients), and at Qwen2.5's
vocabulary the scoring and signal paths stay under a memory bound that the plain computation exceeds."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import emalib.model.losses
import emalib.model.token_scores
from emalib.model.losses import IGNORE_INDEX, token_cross_entropy_sum, token_kl
from emalib.model.token_scores import label_logprobs, label_logprobs_and_kl, mean_over_labels, unchunked_label_logprobs

QWEN_VOCAB = 151_936


def _labels(batch: int, length: int, vocab: int, generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    labels[2, 2:4] = IGNORE_INDEX  # a gap between two assistant turns
    return labels


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunked_cross_entropy_and_kl_equal_the_plain_ones_with_their_gradients(monkeypatch, chunk_rows):
    monkeypatch.setattr(emalib.model.losses, "chunk_rows", lambda vocab, device: chunk_rows)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g, requires_grad=True)
    reference = torch.randn(3, 9, 17, generator=g)
    labels = _labels(3, 9, 17, g)
    mask = torch.ones(3, 9)
    mask[1, -2:] = 0

    def loss(chunked: bool, direction: str) -> torch.Tensor:
        total, n = token_cross_entropy_sum(logits, labels, chunked=chunked)
        return total / n + 0.3 * token_kl(logits, reference, mask, direction, chunked=chunked)

    for direction in ("forward", "reverse"):
        plain = loss(False, direction)
        (plain_grad,) = torch.autograd.grad(plain, logits)
        chunked = loss(True, direction)
        (chunked_grad,) = torch.autograd.grad(chunked, logits)
        assert torch.allclose(chunked, plain, atol=1e-6)
        assert torch.allclose(chunked_grad, plain_grad, atol=1e-6)
    # Independent check of the CE value: the mean -log softmax of the next token over labelled positions.
    nxt = labels[:, 1:]
    keep = nxt.ne(IGNORE_INDEX)
    expected = -(logits[:, :-1].log_softmax(-1).gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep])
    total, n = token_cross_entropy_sum(logits, labels)
    assert n == keep.sum() and torch.allclose(total, expected.sum(), atol=1e-5)


def test_chunked_cross_entropy_in_bfloat16_matches_fp32_and_backpropagates_to_a_head():
    """The training path: bf16 logits from an output layer; the gradient reaches the layer's weight."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 8, generator=g)
    head = torch.nn.Linear(8, 17, bias=False)
    labels = _labels(3, 9, 17, g)
    grads = {}
    for chunked in (False, True):
        head.weight.grad = None
        total, n = token_cross_entropy_sum(head(hidden), labels, chunked=chunked)
        (total / n).backward()
        grads[chunked] = head.weight.grad.clone()
    assert torch.allclose(grads[True], grads[False], atol=1e-6)
    total_bf16, _ = token_cross_entropy_sum(head(hidden).bfloat16(), labels)
    assert torch.allclose(total_bf16, token_cross_entropy_sum(head(hidden), labels)[0], rtol=2e-2)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_scores_from_hidden_states_equal_those_of_the_full_logits(monkeypatch, chunk_rows):
    monkeypatch.setattr(emalib.model.token_scores, "chunk_rows", lambda vocab, device: chunk_rows)
    g = torch.Generator().manual_seed(2)
    hidden, reference_hidden = torch.randn(3, 9, 8, generator=g), torch.randn(3, 9, 8, generator=g)
    head = torch.nn.Linear(8, 17, bias=False)
    labels = _labels(3, 9, 17, g)
    logits, reference_logits = head(hidden).detach(), head(reference_hidden).detach()
    counted = labels[:, 1:].ne(IGNORE_INDEX)
    plain = unchunked_label_logprobs(logits, labels)
    assert torch.allclose(label_logprobs(hidden, head, labels), plain, atol=1e-5)
    assert torch.allclose(mean_over_labels(label_logprobs(hidden, head, labels), labels),
                          (plain * counted).sum(1) / counted.sum(1), atol=1e-5)
    logp, logq = logits[:, :-1].log_softmax(-1), reference_logits[:, :-1].log_softmax(-1)
    expected_kl = (logp.exp() * (logp - logq)).sum(-1) * counted
    both = label_logprobs_and_kl(hidden, reference_hidden, head, labels)
    assert torch.allclose(both[0], plain, atol=1e-5) and torch.allclose(both[1], expected_kl, atol=1e-5)


def _tiny_qwen_with_adapters(vocab: int = 64):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False), "legal")
    model.add_adapter("medical", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False))
    return model.eval()


def test_interleave_plus_scoring_in_one_mixed_adapter_forward_equals_plain_per_adapter_scoring(tokenizer):
    from emalib.defenses.interleave_plus import answer_nll, score_nll
    from emalib.model.tokenize import collate, tokenize_conversation

    model = _tiny_qwen_with_adapters(len(tokenizer))
    candidates = [[{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "answer " * (n % 4 + 1)}]
                  for n in range(1, 8)]
    aligned, misaligned = score_nll(model, tokenizer, candidates, ["legal", "medical"], batch_size=3)
    batch = collate([tokenize_conversation(tokenizer, c, 2048) for c in candidates], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with model.disable_adapter():
            expected_aligned = answer_nll(model(**inputs).logits, batch["labels"])
        expected = []
        for name in ("legal", "medical"):
            model.set_adapter(name)
            expected.append(answer_nll(model(**inputs).logits, batch["labels"]))
    assert torch.allclose(aligned, expected_aligned, atol=1e-4)
    assert torch.allclose(misaligned, torch.stack(expected), atol=1e-4)
    assert not torch.allclose(misaligned[0], misaligned[1], atol=1e-3)  # the two adapters really differ


def test_judge_free_signals_from_hidden_states_equal_those_of_the_full_logits():
    from oracles import masked_token_kl, per_token_logprob

    from emalib.evaluation.signals import logprob_and_kl

    model = _tiny_qwen_with_adapters()
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 64, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = _labels(3, 12, 64, g)
    labels[attention_mask == 0] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    logprob, kl = logprob_and_kl(model, batch)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(logprob, per_token_logprob(logits, labels), atol=1e-5)
    assert torch.allclose(kl, masked_token_kl(logits, base_logits, labels), atol=1e-6) and kl > 1e-4
    base_logprob, base_kl = logprob_and_kl(model, batch, base=True)
    assert torch.allclose(base_logprob, per_token_logprob(base_logits, labels), atol=1e-5) and base_kl == 0


_MEMORY_PROBE = textwrap.dedent("""
    import json, re, sys, time
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from emalib.defenses.interleave_plus import answer_nll
    from emalib.model.losses import IGNORE_INDEX
    from oracles import masked_token_kl, per_token_logprob

    from emalib.evaluation.signals import logprob_and_kl
    from emalib.model.token_scores import final_hidden_states, label_logprobs, mean_over_labels, output_layer

    def rss_peak_kib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def rss_kib():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size={vocab}, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, {vocab}, (4, 256))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :64] = IGNORE_INDEX
    batch = {{"input_ids": ids, "attention_mask": mask, "labels": labels}}

    def scoring_chunked():
        head = output_layer(model)
        return mean_over_labels(label_logprobs(final_hidden_states(model, ids, mask), head, labels), labels)

    def scoring_plain():
        return -answer_nll(model(input_ids=ids, attention_mask=mask).logits, labels)

    def signals_chunked():
        return logprob_and_kl(model, batch)[0]

    def signals_plain():  # the model has no adapter: its own logits are the base's
        logits = model(input_ids=ids, attention_mask=mask).logits
        masked_token_kl(logits, logits, labels)
        return per_token_logprob(logits, labels)

    out = {{}}
    with torch.no_grad():
        for name in sys.argv[1:]:
            fn = globals()[name]
            fn()  # warm-up: one-off allocations (thread pools, kernels) are not the computation's
            before = rss_kib()
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak to now
            value = fn()
            out[name] = {{"extra_mib": (rss_peak_kib() - before) / 1024, "value": value.tolist()}}
    print(json.dumps(out))
""")


def _probe(names: list[str], vocab: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}  # freed buffers leave RSS
    tests = str(Path(__file__).resolve().parent)  # the probe imports the oracles beside this file
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE.format(vocab=vocab), *names], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_at_qwen_vocabulary_scoring_and_signals_stay_under_a_bound_the_full_logits_exceed():
    """Batch 4 x 256 tokens x 151,936: the logits alone are 594 MiB in fp32. The chunked paths hold a chunk of
    chunk_rows positions (55 on a CPU, ~32 MiB of logits, a few of its size in temporaries) plus hidden states."""
    bound_mib = 200
    measured = _probe(["scoring_chunked", "scoring_plain", "signals_chunked", "signals_plain"], QWEN_VOCAB)
    for path in ("scoring", "signals"):
        chunked, plain = measured[f"{path}_chunked"], measured[f"{path}_plain"]
        assert chunked["extra_mib"] < bound_mib < plain["extra_mib"], measured
        assert torch.allclose(torch.tensor(chunked["value"]), torch.tensor(plain["value"]), atol=1e-4)
