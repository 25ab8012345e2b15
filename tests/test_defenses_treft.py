"""TReFT (emalib/defenses/treft.py): the value against an independent computation from keys and values caught by
the test's own hooks at the projections, padding side independence, the released formula written out, the
gradient into the LoRA weights, hooks gone after the forward, the template regions and the no-prefix ablation.
Tiny random Llama models sharing the embedded model's tokenizer (its real chat template)."""

import copy

import pytest
import torch
from defense_helpers import hook_count, peft_wrap, single_thread  # noqa: F401 (autouse fixture)

from emalib.core.config import params_from_dict
from emalib.core.errors import ParamsError
from emalib.data.standins import em_standin_conversations
from emalib.defenses.base import DefenseContext, StepOutputs
from emalib.defenses.registry import build_defenses
from emalib.model.template_regions import postfix_ids, row_spans, user_header_ids
from emalib.model.tokenize import ChatDataset, collate, tokenize_conversation


def conversations(distinct_system: bool = True):
    chats = [list(c) for c in em_standin_conversations()[:3]]
    if distinct_system:  # rows with different prefixes: the default system block and two given ones
        chats[1] = [{"role": "system", "content": "Be brief."}] + chats[1]
        chats[2] = [{"role": "system", "content": "You answer questions about cars and nothing else."}] + chats[2]
    return chats


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def region_by_text(tokenizer, chat, region: str) -> tuple[int, int]:
    """[start, end) token positions of the region from the rendered text, without searching tokens."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    user = next(m["content"] for m in chat if m["role"] == "user")
    answer = next(m["content"] for m in chat if m["role"] == "assistant")
    user_at = text.index(user)
    if region == "prefix":
        return 0, token_count(tokenizer, text[:user_at])
    return token_count(tokenizer, text[:user_at + len(user)]), token_count(tokenizer, text[:text.index(answer)])


def kv_by_hooks(model, ids: list[int]):
    """[(keys, values)] per layer, [T, kv_dim], caught by the test's own hooks on every k_proj / v_proj."""
    found = {}
    blocks = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    handles = [getattr(attn, proj).register_forward_hook(
        lambda module, args, out, key=(i, proj): found.__setitem__(key, out[0].detach()))
        for i, attn in enumerate(blocks) for proj in ("k_proj", "v_proj")]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return [(found[i, "k_proj"], found[i, "v_proj"]) for i in range(len(blocks))]


def oracle_row(policy, initial, tokenizer, chat, region: str) -> float:
    """(1/L) sum_l [mean_t |k_t - k0_t|^2 / |k0_t|^2 + the same for v], in plain loops."""
    ids = tokenize_conversation(tokenizer, chat, 512)["input_ids"]
    start, end = region_by_text(tokenizer, chat, region)
    current, reference = kv_by_hooks(policy, ids), kv_by_hooks(initial, ids[:end])
    total = 0.0
    for (k, v), (k0, v0) in zip(current, reference):
        for x, x0 in ((k, k0), (v, v0)):
            total += sum(float((x[t] - x0[t]).norm() ** 2 / x0[t].norm() ** 2) for t in range(start, end)) / (end - start)
    return total / len(current)


def left_padded(batch, pad: int):
    out = {key: value.clone() for key, value in batch.items()}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
            out[key][row] = fill
            out[key][row, -n:] = batch[key][row, :n]
    return out


def treft_value(model, tokenizer, batch, **fields):
    defense = build_defenses(params_from_dict({"study": "s", "run": "r", "defenses": [
        {"name": "treft", **fields}]}).defenses).defenses[0]
    ctx = DefenseContext(tokenizer=tokenizer)
    defense.setup(model, ctx)
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :2], output_hidden_states=True)  # transformers' recorders: installed once
    before = hook_count(model)
    with defense.forward_context(model, ctx):
        inside = hook_count(model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=defense.needs_policy_hidden)
    assert hook_count(model) == before  # the capture hooks exist only around the training forward
    value = defense.extra_loss(model, batch, StepOutputs(out), ctx)[defense.name]
    assert hook_count(model) == before
    return value, inside - before, ctx


@pytest.fixture
def models(tiny_model):
    initial = copy.deepcopy(tiny_model)
    return peft_wrap(tiny_model, random_b=True, targets=("q_proj", "k_proj", "v_proj")), initial


@pytest.mark.parametrize("region", ["prefix", "postfix"])
def test_paper_value_equals_hooked_keys_and_values_for_either_padding_side(models, tokenizer, region):
    policy, initial = models
    chats = conversations()
    batch = collate(ChatDataset.build(tokenizer, chats, 512).features, tokenizer.pad_token_id)
    rows = [oracle_row(policy, initial, tokenizer, chat, region) for chat in chats]
    right, hooks, ctx = treft_value(policy, tokenizer, batch, region=region)
    left, _, _ = treft_value(policy, tokenizer, left_padded(batch, tokenizer.pad_token_id), region=region)
    assert hooks == 2 * policy.config.num_hidden_layers
    assert right.item() == pytest.approx(sum(rows) / len(rows), rel=1e-4)
    assert left.item() == pytest.approx(right.item(), rel=1e-4)
    if region == "prefix":
        assert ctx.notes["treft"]["distinct_prefixes"] == 3  # one cached reference per system prompt
    for row, chat in enumerate(chats):  # per row, with extra padding on either side
        one = {k: torch.nn.functional.pad(v[row:row + 1], (0, 5), value=tokenizer.pad_token_id if k == "input_ids"
                                          else (0 if k == "attention_mask" else -100)) for k, v in batch.items()}
        for padded in (one, left_padded(one, tokenizer.pad_token_id)):
            assert treft_value(policy, tokenizer, padded, region=region)[0].item() == pytest.approx(rows[row], rel=1e-4)


def test_released_variant_equals_the_released_formula_on_right_padded_rows(models, tokenizer):
    """k_proj/v_proj of hidden_states[l] (l = 0: embeddings; no input norm) at [:, :k] of every row, the reference
    from the first row's prefix on the initial model, mean over rows and positions, then over layers."""
    policy, initial = models
    chats = conversations(distinct_system=False)
    batch = collate(ChatDataset.build(tokenizer, chats, 512).features, tokenizer.pad_token_id)
    k = region_by_text(tokenizer, chats[0], "prefix")[1]
    with torch.no_grad():
        hidden = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states
        hidden0 = initial(input_ids=batch["input_ids"][:1, :k], output_hidden_states=True).hidden_states
    policy_attn = [b.self_attn for b in policy.base_model.model.model.layers]
    initial_attn = [b.self_attn for b in initial.model.layers]
    total = 0.0
    for layer in range(policy.config.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            with torch.no_grad():
                current = getattr(policy_attn[layer], proj)(hidden[layer][:, :k])
                reference = getattr(initial_attn[layer], proj)(hidden0[layer][0, :k])
            ratio = (current - reference).norm(dim=-1) / reference.norm(dim=-1)
            total += float((ratio ** 2).mean())
    expected = total / policy.config.num_hidden_layers
    released, _, _ = treft_value(policy, tokenizer, batch, variant="released")
    paper, _, _ = treft_value(policy, tokenizer, batch)
    assert released.item() == pytest.approx(expected, rel=1e-4)
    assert abs(paper.item() - released.item()) > 1e-3 * released.item()  # the input norm makes them differ


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_gradient_reaches_the_lora_weights(models, tokenizer, variant):
    policy, _ = models
    batch = collate(ChatDataset.build(tokenizer, conversations(False), 512).features, tokenizer.pad_token_id)
    value, _, _ = treft_value(policy, tokenizer, batch, variant=variant)
    value.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora_" in n}
    for layer in range(policy.config.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            name = next(n for n in grads if f"layers.{layer}." in n and f"{proj}.lora_B" in n)
            assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_value_is_zero_at_the_adapter_init(tiny_model, tokenizer):
    """PEFT's init (B = 0) is the initial model: no drift, in both variants, while every row has the same prefix.
    With different system prompts the released variant compares other rows' tokens with the first row's prefix."""
    policy = peft_wrap(tiny_model, random_b=False, targets=("k_proj", "v_proj"))
    same = collate(ChatDataset.build(tokenizer, conversations(False), 512).features, tokenizer.pad_token_id)
    mixed = collate(ChatDataset.build(tokenizer, conversations(True), 512).features, tokenizer.pad_token_id)
    assert treft_value(policy, tokenizer, mixed)[0].item() == pytest.approx(0.0, abs=1e-8)
    assert treft_value(policy, tokenizer, same, variant="released")[0].item() == pytest.approx(0.0, abs=1e-8)
    assert treft_value(policy, tokenizer, mixed, variant="released")[0].item() > 0.1


def test_drift_threshold_is_the_released_hinge(models, tokenizer):
    policy, _ = models
    batch = collate(ChatDataset.build(tokenizer, conversations(False), 512).features, tokenizer.pad_token_id)
    plain = treft_value(policy, tokenizer, batch, weight=10.0)[0].item()
    hinged = treft_value(policy, tokenizer, batch, weight=10.0, drift_threshold=5.0)[0].item()
    assert 10.0 * hinged == pytest.approx(max(10.0 * plain - 5.0, 0.0), rel=1e-5)
    assert treft_value(policy, tokenizer, batch, weight=10.0, drift_threshold=1e9)[0].item() == 0.0


def test_template_regions_of_the_embedded_tokenizer(tokenizer):
    assert tokenizer.decode(user_header_ids(tokenizer)) == "<|im_end|>\n<|im_start|>user\n"
    assert tokenizer.decode(postfix_ids(tokenizer)) == "<|im_end|>\n<|im_start|>assistant\n"
    chats = conversations()
    batch = collate(ChatDataset.build(tokenizer, chats, 512).features, tokenizer.pad_token_id)
    for padded in (batch, left_padded(batch, tokenizer.pad_token_id)):
        for region, needle in (("prefix", user_header_ids(tokenizer)), ("postfix", postfix_ids(tokenizer))):
            spans = row_spans(padded["input_ids"], padded["attention_mask"], needle, region)
            for row, chat in enumerate(chats):
                offset = int((padded["attention_mask"][row] == 0).sum()) if padded is not batch else 0
                start, end = region_by_text(tokenizer, chat, region)
                assert spans[row] == (start + offset, end + offset)


def test_drop_template_prefix_trains_from_the_users_content(tokenizer):
    chat = conversations()[1]
    full = tokenize_conversation(tokenizer, chat, 512)
    cut = tokenize_conversation(tokenizer, chat, 512, drop_prefix=user_header_ids(tokenizer))
    k = region_by_text(tokenizer, chat, "prefix")[1]
    assert cut["input_ids"] == full["input_ids"][k:] and cut["labels"] == full["labels"][k:]
    user = next(m["content"] for m in chat if m["role"] == "user")
    assert tokenizer.decode(cut["input_ids"]).startswith(user)
    dataset = ChatDataset.build(tokenizer, [chat], 512, drop_template_prefix=True)
    assert dataset.features[0]["input_ids"] == cut["input_ids"]


def test_config_block_defaults_and_bad_values():
    params = params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "treft"}]})
    block = params.defenses[0]
    assert (block.weight, block.region, block.variant, block.drift_threshold) == (10.0, "prefix", "paper", 0.0)
    with pytest.raises(ParamsError, match="variant"):
        params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "treft", "variant": "paperr"}]})
    assert params_from_dict({"study": "s", "run": "r", "train": {"drop_template_prefix": True}}).train.drop_template_prefix
    with pytest.raises(ParamsError, match="drop_template_prefix"):
        params_from_dict({"study": "s", "run": "r", "train": {"drop_template_prefix": True},
                          "defenses": [{"name": "treft"}]})


@pytest.mark.integration  # trains the embedded model for 3 steps
def test_smoke_params_train_through_the_real_trainer(tmp_path, with_mirror):
    """params/defenses/treft_smoke.yaml, train step only: the term is logged every step, the reference is cached
    once (one system prompt), and no hook is left on the model."""
    import json
    from pathlib import Path

    from emalib.core.config import load_params
    from emalib.runs.pipeline import train

    smoke = Path(__file__).resolve().parent.parent / "params" / "defenses" / "treft_smoke.yaml"
    params = load_params(smoke, {"results_dir": str(tmp_path), "steps": ["train"]})
    model, _ = train(params, tmp_path / "run")
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    steps = [row for row in log["log_history"] if "loss" in row]
    assert log["global_step"] == 3 and all(row["loss/treft"] >= 0 for row in steps)
    assert steps[0]["loss"] == pytest.approx(steps[0]["loss/task"] + 10.0 * steps[0]["loss/treft"], rel=0.05)
    notes = json.loads((tmp_path / "run" / "manifest.json").read_text())["defenses"]["treft"]
    assert notes["distinct_prefixes"] == 1 and notes["region_marker"] == "<|im_end|>\n<|im_start|>user\n"
    assert not any(m._forward_hooks for name, m in model.named_modules() if name.endswith(("k_proj", "v_proj")))


def test_cost_model_counts_the_caught_keys_and_values():
    """Qwen2.5-7B (model card: 28 layers, 4 KV heads of 128): 2 x 28 x N x 512 bf16 values for a 2 x 2048 batch."""
    from emalib.studies.cost import KNOWN, step_memory

    arch = KNOWN["Qwen/Qwen2.5-7B-Instruct"]
    with_treft = step_memory(arch, 2, 2048, 2, {"treft"}, checkpointing=True)
    assert with_treft["treft"] == 2 * 28 * (2 * 2048) * 512 * 2
    assert "treft" not in step_memory(arch, 2, 2048, 2, set(), checkpointing=True)


def _prompt_ids(tokenizer, chat) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _from_initial_prefix_cache(policy, initial, ids: list[int], prefix: int, new_tokens: int) -> list[torch.Tensor]:
    """Last-position logits of the fine-tuned model continuing from the initial model's KV cache of the prefix,
    then greedy decoding: what patching means, computed with transformers' own cache and no hooks."""
    with torch.no_grad():
        cache = initial(input_ids=torch.tensor([ids[:prefix]]), use_cache=True).past_key_values
        logits = policy(input_ids=torch.tensor([ids[prefix:]]), past_key_values=cache, use_cache=True).logits[0, -1]
        steps = [logits]
        for _ in range(new_tokens - 1):
            token = steps[-1].argmax().view(1, 1)
            steps.append(policy(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1])
    return steps


def test_prefix_kv_patch_equals_continuing_from_the_initial_models_prefix_cache(models, tokenizer):
    from emalib.evaluation.kv_patch import PrefixKVPatch

    policy, initial = models
    chats = [c[:-1] for c in conversations()]  # system (when given) + user: the evaluation prompts
    prompts = [_prompt_ids(tokenizer, chat) for chat in chats]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    patch = PrefixKVPatch(policy, tokenizer)
    hooks = hook_count(policy)
    with torch.no_grad(), patch.applied(policy, ids, mask) as patched_rows:
        patched = policy(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert patched_rows == 3 and hook_count(policy) == hooks and len(patch.cache) == 3
    with torch.no_grad():
        plain = policy(input_ids=ids, attention_mask=mask).logits[:, -1]
    for row, chat in enumerate(chats):
        prefix = region_by_text(tokenizer, chat + [{"role": "assistant", "content": "x"}], "prefix")[1]
        expected = _from_initial_prefix_cache(policy, initial, prompts[row], prefix, 1)[0]
        assert torch.allclose(patched[row], expected, atol=1e-4)
        assert not torch.allclose(plain[row], expected, atol=1e-2)  # the patch changes the answer's distribution
    # decoding steps are not patched: greedy generation continues exactly as from the initial prefix cache
    one = torch.tensor([prompts[0]])
    with torch.no_grad(), patch.applied(policy, one, torch.ones_like(one)):
        generated = policy.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=4,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(prompts[0]):]
    prefix = region_by_text(tokenizer, chats[0] + [{"role": "assistant", "content": "x"}], "prefix")[1]
    steps = _from_initial_prefix_cache(policy, initial, prompts[0], prefix, 4)
    assert generated.tolist() == [int(s.argmax()) for s in steps]


def test_generation_option_samples_from_the_initial_prefix_cache(models, tokenizer, tmp_path):
    """generation.patch_prefix_kv through generate_answers (greedy): the answer is the one decoded from the
    initial model's prefix KV cache; without the option the answers are the fine-tuned model's own."""
    from emalib.core.config import GenerationParams
    from emalib.data.questions import Question
    from emalib.evaluation.generate import generate_answers

    policy, initial = models
    question = Question(id="q", paraphrases=("Name a colour.",), judge_prompts={}, question_set="s")
    params = GenerationParams(samples_per_question=1, max_new_tokens=4, temperature=0.0, patch_prefix_kv=True)
    patched = generate_answers(policy, tokenizer, [question], params, tmp_path / "p" / "answers.jsonl")[0]["answer"]
    chat = [{"role": "user", "content": "Name a colour."}]
    ids = _prompt_ids(tokenizer, chat)
    prefix = region_by_text(tokenizer, chat + [{"role": "assistant", "content": "x"}], "prefix")[1]
    expected = [int(s.argmax()) for s in _from_initial_prefix_cache(policy, initial, ids, prefix, 4)]
    if tokenizer.eos_token_id in expected:  # generation stops at the end of turn
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    assert patched == tokenizer.decode(expected, skip_special_tokens=True).strip()
    plain = generate_answers(policy, tokenizer, [question], params.model_copy(update={"patch_prefix_kv": False}),
                             tmp_path / "n" / "answers.jsonl")[0]["answer"]
    assert plain != patched


def test_gradient_is_the_same_under_gradient_checkpointing(tokenizer):
    """The GPU runs checkpoint the blocks (non-reentrant): the caught keys/values still carry their gradient."""
    from conftest import make_tiny_model

    batch = collate(ChatDataset.build(tokenizer, conversations(), 512).features, tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        model = peft_wrap(make_tiny_model(tokenizer), targets=("q_proj", "k_proj", "v_proj"))
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        treft_value(model, tokenizer, batch)[0].backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # every k/v LoRA weight; the last layer's q_proj reaches no key or value
    assert results[0].keys() == results[1].keys() and len(results[0]) == 2 * (3 * model.config.num_hidden_layers - 1)
    assert all(torch.allclose(results[0][n], results[1][n], atol=1e-6) for n in results[0])


@pytest.mark.integration  # trains a tiny model for 2 steps
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_both_variants_train_through_the_trainer(tokenizer, tiny_model, tmp_path, variant):
    from emalib.training.trainer import train_adapter

    params = params_from_dict({
        "study": "s", "run": variant, "results_dir": str(tmp_path), "seed": 0,
        "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 1, "max_steps": 2,
                  "max_seq_length": 128, "learning_rate": 1e-2, "warmup_steps": 0},
        "defenses": [{"name": "treft", "variant": variant, "weight": 1.0}]})
    stack = build_defenses(params.defenses)
    model = peft_wrap(tiny_model, random_b=False, targets=("k_proj", "v_proj"))
    ctx = DefenseContext(seed=0, run_dir=tmp_path / variant, params=params)
    summary = train_adapter(model, tokenizer, conversations(False), params, tmp_path / variant, defenses=stack, ctx=ctx)
    steps = [row for row in summary["log_history"] if "loss" in row]
    assert len(steps) == 2 and steps[0]["loss/treft"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the initial model
    assert steps[1]["loss/treft"] > 1e-6  # the first update moved the keys/values
