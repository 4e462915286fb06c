"""The one YAML loader for specs and manifests: libyaml's safe loader where installed, no aliases, a size cap.

Neither a spec nor a manifest needs anchors (``&name``) or aliases (``*name``), and aliases are how a few
hundred bytes of YAML expand into gigabytes (each alias of an alias multiplies the document: an "alias
bomb"), or into a document that contains itself. The document is composed (libyaml's C parser where
available: ``yaml.CSafeLoader``; its composer shares one node per anchor, so composing stays linear in the
text), then every node is visited once: a node reached twice came from an alias and is refused before
anything expands it. The text is capped at :data:`MAX_YAML_BYTES` (raise it with the
``EECOMPILE_MAX_YAML_BYTES`` environment variable).

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


class NoAliasSafeLoader(_Base):
    """``yaml.CSafeLoader`` (or ``yaml.SafeLoader`` without libyaml) that refuses aliases.

    ``get_single_data`` composes the document, checks that no node is reached twice (an alias, or a
    recursive alias), then constructs it. Raises :class:`AliasRefused` (a ``yaml.YAMLError``).
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        check_no_aliases(node)
        return self.construct_document(node)


class AliasRefused(yaml.YAMLError):
    """An alias (``*name``) in a document that does not allow them; ``line`` is 1-based (or None)."""

    def __init__(self, line: int | None) -> None:
        self.line = line
        at = f"line {line}: " if line is not None else ""
        super().__init__(f"{at}a value anchored here (&name) is used again through an alias (*name); YAML "
                         f"anchors and aliases are not allowed: write the value out in full")


def check_no_aliases(root: yaml.Node) -> None:
    """Raise :class:`AliasRefused` when any node of the composed document is reached twice.

    Iterative (no recursion limit on deep documents) and linear in the number of distinct nodes."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            mark = node.start_mark
            raise AliasRefused(mark.line + 1 if mark is not None else None)
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append(k)
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


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


def compose(text: str, error: type[EECompileError], where: str, what: str) -> yaml.Node | None:
    """The document's node tree (for callers that need line numbers), aliases refused.

    Raises ``error`` for a document over the size cap or with an alias (naming ``where`` and the line),
    ``yaml.YAMLError`` for a syntax error (callers word those)."""
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
            check_no_aliases(node)
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
