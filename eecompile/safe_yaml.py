"""The one YAML loader for specs and manifests: libyaml's safe loader where installed, bounded aliases, a
size cap.

Aliases (``*name``) are how a few hundred bytes of YAML expand into gigabytes (each alias of an alias
multiplies the document: an "alias bomb"), or into a document that contains itself. The document is
composed first (libyaml's C parser where available: ``yaml.CSafeLoader``; its composer shares one node per
anchor, so composing stays linear in the text); then, before anything expands it, the composed graph is
measured in one pass over its distinct nodes: a recursive alias is refused, and so is a document whose
expanded size passes a limit. A manifest allows no aliases at all (eecompile writes none); a spec allows the
few that ``yaml.safe_dump`` writes for a Python object used twice (up to :data:`SPEC_MAX_NODES` nodes once
expanded). The text is capped at :data:`MAX_YAML_BYTES` (raise it with the ``EECOMPILE_MAX_YAML_BYTES``
environment variable).

Imports pyyaml only (the runtime reads manifests with it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from eecompile.errors import EECompileError

MAX_YAML_BYTES = 16 * 1024 * 1024  # 16 MiB: a manifest of a 1000-segment model is ~2 MB
ENV_MAX_YAML_BYTES = "EECOMPILE_MAX_YAML_BYTES"

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


SPEC_MAX_NODES = 100_000  # a spec with a thousand exits has about 20 000 nodes


class NoAliasSafeLoader(_Base):
    """``yaml.CSafeLoader`` (or ``yaml.SafeLoader`` without libyaml) that refuses aliases.

    ``get_single_data`` composes the document, checks that no node is reached twice (an alias, or a
    recursive alias), then constructs it. Raises :class:`AliasRefused` (a ``yaml.YAMLError``).
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        check_aliases(node, max_nodes=0)
        return self.construct_document(node)


class AliasRefused(yaml.YAMLError):
    """An alias (``*name``) a document does not allow; ``line`` is 1-based (or None)."""

    def __init__(self, line: int | None, problem: str) -> None:
        self.line = line
        at = f"line {line}: " if line is not None else ""
        super().__init__(f"{at}{problem}")


def _line(node: yaml.Node) -> int | None:
    return node.start_mark.line + 1 if node.start_mark is not None else None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_aliases(root: yaml.Node, max_nodes: int) -> int:
    """The number of nodes of the composed document once every alias is expanded, measured without
    expanding (one pass over the distinct nodes, iterative: no recursion limit on deep documents).

    ``max_nodes=0``: no alias at all (a node reached twice is refused). Otherwise a recursive alias, or an
    expanded size over ``max_nodes``, raises :class:`AliasRefused` naming the line of the anchored value."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if max_nodes and size[key] > max_nodes:
                raise AliasRefused(_line(node), f"the value here expands, through YAML aliases (*name), to more "
                                                f"than {max_nodes} nodes (an alias bomb?); write it out without "
                                                f"anchors and aliases")
            continue
        if key in on_path:
            raise AliasRefused(_line(node), "the value anchored here (&name) contains itself through an alias "
                                            "(*name); write it out without anchors and aliases")
        if key in size:
            if not max_nodes:
                raise AliasRefused(_line(node), "a value anchored here (&name) is used again through an alias "
                                                "(*name); anchors and aliases are not allowed here: write the "
                                                "value out in full")
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in reversed(_children(node)):
            if id(child) in on_path:
                raise AliasRefused(_line(child), "the value anchored here (&name) contains itself through an "
                                                 "alias (*name); write it out without anchors and aliases")
            if id(child) in size and not max_nodes:
                raise AliasRefused(_line(child), "a value anchored here (&name) is used again through an alias "
                                                 "(*name); anchors and aliases are not allowed here: write the "
                                                 "value out in full")
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def max_yaml_bytes() -> int:
    """The size cap in bytes: ``EECOMPILE_MAX_YAML_BYTES`` when set to a positive integer, else 16 MiB."""
    raw = os.environ.get(ENV_MAX_YAML_BYTES, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return MAX_YAML_BYTES


def _size_error(error: type[EECompileError], where: str, size: int, what: str) -> EECompileError:
    cap = max_yaml_bytes()
    return error(f"{where}: the {what} is {size} bytes, more than the {cap}-byte limit for YAML documents; "
                 f"if it is genuine, raise the limit with {ENV_MAX_YAML_BYTES}={size}")


def read_yaml_text(path: Path, error: type[EECompileError], what: str) -> str:
    """The text of a YAML file, refused (``error``) before it is read when larger than the cap.

    Raises OSError / UnicodeDecodeError as ``Path.read_text`` does (callers word those)."""
    size = path.stat().st_size
    if size > max_yaml_bytes():
        raise _size_error(error, str(path), size, what)
    return path.read_text()


def compose(text: str, error: type[EECompileError], where: str, what: str,
            max_nodes: int = 0) -> yaml.Node | None:
    """The document's node tree (for callers that need line numbers), aliases checked by
    :func:`check_aliases` (``max_nodes=0``: none allowed).

    Raises ``error`` for a document over the size cap or with a refused alias (naming ``where`` and the
    line), ``yaml.YAMLError`` for a syntax error (callers word those)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_yaml_bytes():
        raise _size_error(error, where, size, what)
    loader = NoAliasSafeLoader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None:
        try:
            check_aliases(node, max_nodes)
        except AliasRefused as e:
            raise error(f"{where}: {e} (in the {what})") from e
    return node


def load(text: str, error: type[EECompileError], where: str, what: str) -> Any:
    """Parse a YAML document into Python values with the safe constructor, aliases refused.

    Raises as :func:`compose` does."""
    node = compose(text, error, where, what)
    if node is None:
        return None
    loader = NoAliasSafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()
