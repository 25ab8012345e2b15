"""SafeLoRA: the projection against an explicitly formed C = V V^T / ||V||_F, read from safetensors files."""

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import peft_wrap, save_weight_pair, single_thread, tiny_llama  # noqa: F401 (autouse fixture)

from emalib.defenses.base import DefenseContext
from emalib.defenses.safelora import SafeLoraDefense, apply_safelora, iter_alignment_matrices, project_update


def _explicit(V, B, A, scaling):
    """C dW and cos(C dW, dW) with C formed explicitly (the formula as written)."""
    C = V @ V.T / torch.linalg.matrix_norm(V)
    delta = scaling * B @ A
    projected = C @ delta
    return projected, F.cosine_similarity(projected.flatten(), delta.flatten(), dim=0).item()


def test_project_update_equals_c_times_the_update_below_tau_and_leaves_it_above():
    torch.manual_seed(0)
    V, B, A = (torch.randn(*shape, dtype=torch.float64) for shape in ((12, 10), (12, 3), (3, 10)))
    projected, cosine = _explicit(V, B, A, 1.7)
    new_b, got_cos, done = project_update(V, B, A, 1.7, tau=cosine + 0.01)
    assert done and got_cos == pytest.approx(cosine, rel=1e-5)
    assert torch.allclose(1.7 * new_b.double() @ A, projected, rtol=1e-4, atol=1e-5)
    kept_b, _, done = project_update(V, B, A, 1.7, tau=cosine - 0.01)
    assert not done and kept_b is B


@pytest.fixture
def weight_pair(tmp_path):
    return save_weight_pair(tmp_path)[2:]


def _expected(model, aligned_dir, base_dir):
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    expected = {}
    for name, V in iter_alignment_matrices(str(aligned_dir), str(base_dir), list(modules)):
        layer = modules[name]
        B, A = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
        expected[name] = (_explicit(V.double(), B, A, layer.scaling["default"]), layer.scaling["default"], B.clone(), A)
    return modules, expected


def test_apply_safelora_projects_only_sub_threshold_modules(weight_pair):
    aligned_dir, base_dir = weight_pair
    from transformers import AutoModelForCausalLM

    model = peft_wrap(AutoModelForCausalLM.from_pretrained(aligned_dir), random_b=True)
    modules, expected = _expected(model, aligned_dir, base_dir)
    # V really is W_aligned - W_base of the matching module:
    name = next(iter(modules))
    V = next(iter_alignment_matrices(str(aligned_dir), str(base_dir), [name]))[1]
    stem = name.removeprefix("base_model.model.")
    aligned_w = dict(AutoModelForCausalLM.from_pretrained(aligned_dir).named_parameters())[f"{stem}.weight"]
    base_w = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())[f"{stem}.weight"]
    assert torch.allclose(V, (aligned_w - base_w).float())

    cosines = sorted(cos for (_, cos), *_ in expected.values())
    tau = (cosines[len(cosines) // 2 - 1] + cosines[len(cosines) // 2]) / 2  # half the modules fall below
    report = apply_safelora(model, str(aligned_dir), str(base_dir), tau=tau)
    projected = {row["module"] for row in report if row["projected"]}
    assert 0 < len(projected) < len(modules)
    for name, ((c_delta, cosine), scaling, old_b, A) in expected.items():
        new_b = modules[name].lora_B["default"].weight.detach().double()
        row = next(r for r in report if r["module"] == name)
        assert row["cosine"] == pytest.approx(cosine, rel=1e-4)
        if cosine < tau:
            assert name in projected and torch.allclose(scaling * new_b @ A, c_delta, rtol=1e-4, atol=1e-6)
        else:
            assert name not in projected and torch.equal(new_b, old_b)


def test_lowest_k_projects_the_k_lowest_cosines_and_the_defense_writes_a_report(weight_pair, tmp_path):
    aligned_dir, base_dir = weight_pair
    from transformers import AutoModelForCausalLM

    model = peft_wrap(AutoModelForCausalLM.from_pretrained(aligned_dir), random_b=True)
    modules, expected = _expected(model, aligned_dir, base_dir)
    lowest = sorted(expected, key=lambda n: expected[n][0][1])[:2]
    ctx = DefenseContext(run_dir=tmp_path)
    SafeLoraDefense(aligned=str(aligned_dir), base=str(base_dir), select="lowest_k", k=2).after_train(model, ctx)
    changed = {n for n in modules
               if not torch.equal(modules[n].lora_B["default"].weight.detach().double(), expected[n][2])}
    assert changed == set(lowest)
    assert ctx.notes["safelora"]["after_train"] == {"modules": len(modules), "projected": 2}
    assert (tmp_path / "safelora.json").is_file()


def test_every_k_steps_projects_only_on_multiples_of_k(weight_pair):
    aligned_dir, base_dir = weight_pair
    from transformers import AutoModelForCausalLM

    model = peft_wrap(AutoModelForCausalLM.from_pretrained(aligned_dir), random_b=True)
    defense = SafeLoraDefense(aligned=str(aligned_dir), base=str(base_dir), tau=2.0, every_k_steps=3)
    ctx = DefenseContext()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    defense.on_step(model, 2, ctx)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    defense.on_step(model, 3, ctx)  # tau 2 > any cosine: every module is projected
    assert ctx.notes["safelora"]["step_3"]["projected"] == len(before)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
