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
