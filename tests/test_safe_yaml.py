"""The guarded YAML loader (emalib.core.safe_yaml): its budgets at their edges, duplicate keys, and what it still reads."""

from __future__ import annotations

import pytest
import yaml

from emalib.core.errors import DataError
from emalib.core.safe_yaml import MAX_ALIASES, MAX_DEPTH, MAX_EXPANDED_NODES, load_yaml, parse_yaml


def nested(levels: int) -> str:
    """A document of `levels` nested nodes: levels - 1 flow sequences around a scalar."""
    return "[" * (levels - 1) + "x" + "]" * (levels - 1)


def refusal(text: str) -> str:
    with pytest.raises(DataError) as raised:
        load_yaml(text, "f.yaml", DataError)
    return str(raised.value)


def test_nesting_is_read_up_to_the_depth_and_refused_one_level_deeper():
    value = parse_yaml(nested(MAX_DEPTH))
    for _ in range(MAX_DEPTH - 1):
        value = value[0]
    assert value == "x"
    assert refusal(nested(MAX_DEPTH + 1)) == f"f.yaml: line 1 invalid YAML: nested more than {MAX_DEPTH} levels deep"


def test_aliases_are_read_up_to_the_budget_and_refused_beyond_it():
    text = "a: &a x\nb: [" + ", ".join(["*a"] * MAX_ALIASES) + "]\n"
    assert parse_yaml(text)["b"] == ["x"] * MAX_ALIASES
    assert refusal(text.replace("]\n", ", *a]\n")).startswith(f"f.yaml: line 2 invalid YAML: more than {MAX_ALIASES} "
                                                               "aliases")


def test_expansion_is_counted_through_nested_aliases_before_any_object_is_built():
    # 10 aliases to a list of 10 aliases to a 1,000-item list: 100 aliases, ~100,000 nodes once expanded.
    leaf = "leaf: &l [" + ", ".join(["0"] * 1000) + "]\n"
    mid = "mid: &m [" + ", ".join(["*l"] * 10) + "]\n"
    top = "top: [" + ", ".join(["*m"] * 10) + "]\n"
    document = parse_yaml(leaf + mid + top)
    assert len(document["top"]) == 10 and document["top"][0][0] is document["leaf"]  # shared, not copied
    bigger = top.replace("top: [", "top: [" + "*m, " * (MAX_EXPANDED_NODES // 10_000 + 1))
    assert "aliases expand to more than 200,000 nodes" in refusal(leaf + mid + bigger)


@pytest.mark.parametrize("text, line, key, first", [
    ("a: 1\nb: 2\na: 3\n", 3, "a", 1),
    ("outer:\n  x: 1\n  y: 2\n  x: 3\n", 4, "x", 2),
    ("- {id: q, id: r}\n", 1, "id", 1),
    ("1: a\n1.0: b\n", 2, "1.0", 1),  # equal keys once read: the second would silently replace the first
])
def test_a_key_written_twice_in_one_mapping_is_refused_naming_line_and_key(text, line, key, first):
    assert refusal(text) == f"f.yaml: line {line} invalid YAML: duplicate key '{key}' (first on line {first})"


def test_merge_keys_may_be_overridden_and_equal_keys_in_different_mappings_are_fine():
    assert parse_yaml("d: &d {a: 1, b: 2}\ne: {<<: *d, b: 3}\nf: {a: 4}\n") == {
        "d": {"a": 1, "b": 2}, "e": {"a": 1, "b": 3}, "f": {"a": 4}}


def test_a_recursive_alias_and_malformed_yaml_are_one_line():
    assert refusal("a: &a [1, *a]\n") == ("f.yaml: line 1 invalid YAML: an alias refers to a node that contains it "
                                          "(a recursive document)")
    assert refusal("a: [1\n") == "f.yaml: line 2 invalid YAML: expected ',' or ']', but got '<stream end>'"
    with pytest.raises(yaml.YAMLError):
        parse_yaml("a: !!python/object:os.system x\n")  # the safe loader's tags only
