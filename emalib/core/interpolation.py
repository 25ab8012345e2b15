"""Resolving the `${...}` strings of a study cell's params tree, with OmegaConf's meaning, at the speed of a grid.

OmegaConf parses every interpolation with an ANTLR grammar (milliseconds each, measured: 4 ms for
`${run_dir:seed.${axis.seed}}`) and wraps every value of the tree it is given, so a 10,000-cell study spent
minutes there. The plain forms a study file uses are resolved here directly: a reference to a scalar key
(`${axis.domain}`, `${seed}`) and a call of one of the given resolvers with plain arguments
(`${run_dir:domain.code,defense.none}`, `${study_dir:}`), innermost first. Anything else (quotes, escapes,
other resolvers such as `oc.env`, relative `${.key}`, values with characters the grammar reads) goes to OmegaConf,
given only the top-level sections the remaining interpolations live in or refer to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from emalib.core.errors import ParamsError

INNERMOST = re.compile(r"\$\{([^${}\\'\"]*)\}")  # no nested ${, no quotes or escapes inside
PLAIN_TEXT = re.compile(r"[\w.\-/+]*")  # what can be spliced into an enclosing interpolation unchanged
KEY_PATH = re.compile(r"[\w\-]+(?:\.[\w\-]+|\[\d+\])*")
NODE_REFERENCE = re.compile(r"\$\{\s*([^${}:\s]+)\s*\}")  # ${a.b}: a resolver call ${name:...} has a colon
_UNRESOLVED = object()


def resolve_interpolations(tree: dict, resolvers: dict[str, Callable[..., Any]], where: str) -> None:
    """Resolve every `${...}` string of `tree` in place; an error is one ParamsError line starting with `where`."""
    left = _resolve_plain_forms(tree, tree, resolvers, where)
    if left:
        _resolve_with_omegaconf(tree, left, resolvers, where)


def _resolve_plain_forms(node: Any, tree: dict, resolvers: dict, where: str, root: str | None = None) -> set[str]:
    """Resolve the plain forms under `node` in place; returns the top-level keys whose strings still hold `${`."""
    left = set()
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        section = key if root is None else root
        if isinstance(value, (dict, list)):
            left |= _resolve_plain_forms(value, tree, resolvers, where, section)
        elif isinstance(value, str) and "${" in value:
            node[key] = resolved = _resolve_string(value, tree, resolvers, where)
            if isinstance(resolved, str) and "${" in resolved:
                left.add(section)
    return left


def _resolve_string(text: str, tree: dict, resolvers: dict, where: str) -> Any:
    """The string with its interpolations resolved (a lone interpolation keeps its value's type), or the string
    unchanged when any part of it is not a plain form."""
    if "\\" in text:
        return text
    current = text
    while (match := INNERMOST.search(current)) is not None:
        value = _plain_value(match.group(1).strip(), tree, resolvers, where)
        if value is _UNRESOLVED:
            return text
        if match.span() == (0, len(current)):
            return value
        if not PLAIN_TEXT.fullmatch(str(value)):
            return text
        current = current[: match.start()] + str(value) + current[match.end():]
    return current if "$" not in current else text


def _plain_value(content: str, tree: dict, resolvers: dict, where: str) -> Any:
    name, colon, arguments = content.partition(":")
    if colon:
        args = [arg.strip() for arg in arguments.split(",")] if arguments.strip() else []
        if name.strip() not in resolvers or not all(arg and PLAIN_TEXT.fullmatch(arg) for arg in args):
            return _UNRESOLVED
        try:
            return resolvers[name.strip()](*args)
        except ValueError as err:
            raise ParamsError(f"{where}: {err}") from None
    if not KEY_PATH.fullmatch(content):
        return _UNRESOLVED
    node: Any = tree
    for part in re.findall(r"[\w\-]+", content):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _UNRESOLVED  # OmegaConf names the missing key
    if isinstance(node, (dict, list)) or (isinstance(node, str) and "${" in node):
        return _UNRESOLVED
    return node


def _resolve_with_omegaconf(tree: dict, sections: set[str], resolvers: dict, where: str) -> None:
    """Resolve what is left with OmegaConf, on the sections holding it plus those it refers to (the whole tree
    when a reference cannot be followed by name: a relative key, another resolver)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for name, function in resolvers.items():
        OmegaConf.register_resolver(name, function, replace=True)
    wanted = set(sections)
    for section in sections:
        for text in _strings(tree[section]):
            references = NODE_REFERENCE.findall(text)
            calls = re.findall(r"\$\{\s*([^${}:\s]+)\s*:", text)
            if any(ref.startswith(".") for ref in references) or set(calls) - set(resolvers):
                wanted = set(tree)
            wanted |= {re.split(r"[.\[]", ref, maxsplit=1)[0] for ref in references}
    part = {key: tree[key] for key in wanted if key in tree}
    try:
        tree.update(OmegaConf.to_container(OmegaConf.create(part), resolve=True))
    except OmegaConfBaseException as err:
        raise ParamsError(f"{where}: {str(err).splitlines()[0]}") from None


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
