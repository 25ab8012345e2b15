"""The one YAML reader of every file emalib reads: params, study, question and trigger files, package data.

PyYAML's safe loader, with four refusals that each end in one line naming the file and line:
- a key repeated in one mapping (PyYAML keeps the last one silently);
- more than MAX_ALIASES aliases, or aliases that expand the document beyond MAX_EXPANDED_NODES nodes: a few
  hundred bytes of nested anchors ("billion laughs") stand for billions of nodes once validation or a merge walks
  the tree, which ran the machine out of memory; an alias inside its own anchor (a cycle) is refused too;
- nesting deeper than MAX_DEPTH: PyYAML composes recursively, so a deep file ended in a RecursionError.
Anchors, aliases and merge keys (`<<: *defaults`) within those budgets work as before (the shipped studies use them).
The checks run on the composed node graph, before any Python object is built. Params and study files larger than
MAX_CONFIG_BYTES are refused before they are parsed (`refuse_oversized`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

MAX_ALIASES = 2_000  # the paper's question files use up to 148 (judge prompts written once)
MAX_EXPANDED_NODES = 200_000  # nodes of the document with every alias replaced by what it stands for
MAX_DEPTH = 64  # the shipped files nest 6 deep at most
# Params and study files: the shipped ones are under 3 KB. PyYAML parses about 0.25 MB a second on a loaded core, so
# a 50 MB file of unknown keys took minutes before its refusal; over this size it is refused before it is read.
MAX_CONFIG_BYTES = 256 * 1024
MERGE_TAG = "tag:yaml.org,2002:merge"


class _GuardedLoader(yaml.SafeLoader):
    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases (refused: aliases can expand a "
                                                "small file into billions of nodes)", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if self._aliases:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root) -> None:
    """Refuse a graph whose tree (aliases expanded) exceeds MAX_EXPANDED_NODES, or that holds a cycle. An alias is
    the anchored node object itself, so sizes are summed over the graph with a memo: linear in its distinct nodes.
    Iterative, because alias chains can make paths far longer than MAX_DEPTH."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, children_sized = stack.pop()
        key = id(node)
        if children_sized:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_EXPANDED_NODES:
                raise ComposerError(None, None, f"aliases expand to more than {MAX_EXPANDED_NODES:,} nodes "
                                                "(refused: a billion-laughs document)", node.start_mark)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ComposerError(None, None, "an alias refers to a node that contains it (a recursive document)",
                                node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """A key written twice in one mapping is an error (keys merged in by `<<` may be overridden, as YAML says)."""
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        try:
            seen = first_line.get(key)
        except TypeError:  # unhashable: the constructor reports it
            continue
        if seen is not None:
            raise ConstructorError(None, None, f"duplicate key '{key}' (first on line {seen})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1


def refuse_oversized(path: str | Path, what: str, error: type[Exception]) -> None:
    """Raise `error` in one line when the file at `path` is larger than MAX_CONFIG_BYTES (an unreadable one is left
    to the read that follows, which names its reason)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return
    if size > MAX_CONFIG_BYTES:
        raise error(f"{path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit of a {what} (refused before "
                    "parsing it)")


def parse_yaml(text: str) -> Any:
    """The document in `text`; a refusal or malformed YAML raises a yaml.MarkedYAMLError (problem, problem_mark)."""
    loader = _GuardedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError) -> str:
    """'line N invalid YAML: <problem>' (one line) for an error of parse_yaml."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1} " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}invalid YAML: {problem}"


def load_yaml(text: str, source: str | Path, error: type[Exception]) -> Any:
    """parse_yaml, with any problem raised as `error` in one line: '<source>: line N invalid YAML: <problem>'."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        raise error(f"{source}: {yaml_problem(err)}") from None
