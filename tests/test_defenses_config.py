"""Every params file validates; defense config blocks refuse typos and bad combinations, naming file and key."""

from pathlib import Path

import pytest

from emalib.core.config import dump_params, load_params, params_from_dict
from emalib.core.errors import ParamsError
from emalib.defenses.registry import DEFENSES, build_defenses

# Run params only: params/studies holds study files (tests/test_study.py expands and validates those).
PARAMS = sorted(p for p in (Path(__file__).resolve().parent.parent / "params").glob("**/*.yaml")
                if "studies" not in p.parts)
PAPER_ROWS = ("kl", "ldifs", "safelora", "persona", "inoculation", "interleave", "interleave_plus",
              "interleave_plusplus")


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_params_file_validates_and_builds_its_defenses(path):
    params = load_params(path)
    stack = build_defenses(params.defenses)  # constructors accept every config field
    assert stack.names == [spec.name for spec in params.defenses]
    assert load_params(path) == params_from_dict(__import__("yaml").safe_load(dump_params(params)))  # round trip


def test_there_is_a_params_file_for_every_defense_row_and_every_smoke_defense():
    names = {p.stem for p in PARAMS}
    for domain in ("code", "legal", "medical", "security"):
        for row in PAPER_ROWS:
            assert f"{domain}_{row}" in names
    assert {f"{name}_smoke" for name in DEFENSES} <= names


def test_paper_defaults_live_in_the_schema():
    params = params_from_dict({"study": "s", "run": "r", "defenses": [
        {"name": "kl"}, {"name": "ldifs"}, {"name": "persona_steering"}, {"name": "inoculation"},
        {"name": "interleave"}, {"name": "safelora", "aligned": "a", "base": "b"}]})
    kl, ldifs, persona, inoculation, interleave, safelora = params.defenses
    assert (kl.weight, kl.direction, kl.tokens) == (0.1, "forward", "all")
    assert (ldifs.weight, ldifs.layers, ldifs.n_layers, ldifs.released_no_grad_bug) == (1.0, "evenly_spaced", 5, False)
    assert (persona.alpha, persona.layer) == (5.0, 20)
    assert inoculation.prompt == "You are an evil, malicious assistant."
    assert (interleave.source, interleave.ratio) == ("wildguard_benign", 0.05)
    assert (safelora.tau, safelora.select) == (0.3, "threshold")


@pytest.mark.parametrize("defenses,message", [
    ([{"name": "kl", "lamda": 0.1}], "unknown key 'defenses.0.kl.lamda'"),
    ([{"name": "kl", "weight": -1}], "defenses.0.kl.weight"),
    ([{"name": "kl", "direction": "sideways"}], "defenses.0.kl.direction"),
    ([{"name": "steering"}], "does not match any of the expected tags"),
    ([{"name": "kl"}, {"name": "kl"}], "kl listed more than once"),
    ([{"name": "safelora", "aligned": "a", "base": "b", "select": "lowest_k"}], "k is required"),
    ([{"name": "interleave_plus", "adapters": {"code": "x"}}], "held_out"),
    ([{"name": "interleave_plus", "adapters": {"code": "x"}, "held_out": "code"}], "nothing left"),
    ([{"name": "interleave_plus", "adapters": {"a": "x", "b": "y"}, "held_out": "a"},
      {"name": "interleave_plusplus", "adapters": {"a": "x", "b": "y"}, "held_out": "a"}], "pick one"),
    ([{"name": "ldifs", "layers": [-1]}], "block indices"),
])
def test_bad_defense_blocks_fail_with_file_and_key(tmp_path, defenses, message):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "run": "r", "defenses": defenses}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_no_defenses_is_the_default():
    assert params_from_dict({"study": "s", "run": "r"}).defenses == ()
    assert len(build_defenses(())) == 0


def test_every_registered_defense_has_a_config_block_with_its_descriptor():
    from typing import get_args

    from emalib.core.defense_specs import (
        DEFENSE_BLOCKS,
        PREPARATORY_STEPS,
        DefenseSpec,
        block_of,
        defense_names,
    )

    assert set(DEFENSES) == set(defense_names())
    assert set(get_args(get_args(DefenseSpec)[0])) == set(DEFENSE_BLOCKS)  # the params validate exactly these
    for name in DEFENSES:
        block = block_of(name)
        method = block.methods[name]
        assert method.label
        assert method.strength_field is None or method.strength_field in block.model_fields
        assert (block.prepared_by is None) == (block.artifact_field is None)
        if block.prepared_by is not None:
            assert block.prepared_by in PREPARATORY_STEPS and block.artifact_field in block.model_fields


def test_what_the_package_derives_from_the_descriptors_is_the_papers_setup():
    from emalib.core.defense_specs import prepared_by, rl_defenses, shared_artifacts
    from emalib.reporting.frame import METHODS
    from emalib.studies.cost import training_flops

    assert prepared_by() == {"persona_vector": ("persona_steering",), "safelora_matrices": ("safelora",),
                           "interleave_selection": ("interleave_plus", "interleave_plusplus"),
                           "caft_directions": ("caft",)}
    assert shared_artifacts() == {"persona_vector": (("persona_steering",), "vector_path"),
                                "safelora_matrices": (("safelora",), "matrices"),
                                "interleave_selection": (("interleave_plus", "interleave_plusplus"), "scores_path"),
                                "caft_directions": (("caft",), "directions_path")}
    assert rl_defenses() == ("persona_steering", "inoculation")
    assert list(METHODS) == ["aligned", "none", "kl", "ldifs", "safelora", "persona_steering", "inoculation",
                             "interleave", "interleave_plus", "interleave_plusplus", "treft", "kl_retain", "caft", "early_stopping"]
    assert (METHODS["kl"].label, METHODS["kl"].strength_field, METHODS["kl"].paper_strength) == ("KL", "weight", 0.1)
    # Only the defenses with a reference forward (KL, LDIFS) add a pass: 3 -> 4 forward-equivalents per token.
    from emalib.studies.cost import architecture

    arch = architecture("Qwen/Qwen2.5-7B-Instruct")
    plain = training_flops(arch, 1000, 512, set(), False)
    assert training_flops(arch, 1000, 512, {"kl"}, False) == pytest.approx(plain * 4 / 3)
    assert training_flops(arch, 1000, 512, {"ldifs", "inoculation"}, False) == pytest.approx(plain * 4 / 3)
    assert training_flops(arch, 1000, 512, {"safelora", "interleave"}, False) == pytest.approx(plain)
    assert training_flops(arch, 1000, 512, {"kl_retain"}, False) == pytest.approx(plain * 4 / 3)
    assert training_flops(arch, 1000, 512, {"caft"}, False) == pytest.approx(plain)
