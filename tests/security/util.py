"""Helpers for the bundle security tests: edit a bundle's manifest (re-hashing what it lists), and watch
which files a call opens."""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from eecompile.bundle import MANIFEST, sha256_file


def manifest_doc(bundle: Path) -> dict[str, Any]:
    return yaml.safe_load((bundle / MANIFEST).read_text())


def write_doc(bundle: Path, doc: dict[str, Any]) -> None:
    (bundle / MANIFEST).write_text(yaml.safe_dump(doc, sort_keys=False))


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = manifest_doc(bundle)
    change(doc)
    write_doc(bundle, doc)


def rehash(bundle: Path, rel: str) -> None:
    """Record ``rel``'s current sha256 in the manifest, as someone tampering with the bundle would."""
    edit_manifest(bundle, lambda d: d["files"].__setitem__(rel, sha256_file(bundle / rel)))


@contextmanager
def opened_files() -> Iterator[list[Path]]:
    """Every path opened through Python (open, io.open, os.open) while the block runs, resolved."""
    seen: list[Path] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(file: Any) -> None:
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(Path(os.fsdecode(file)).resolve())

    def fake_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    def fake_os_open(path: Any, *a: Any, **k: Any) -> Any:
        note(path)
        return real_os_open(path, *a, **k)

    builtins.open = io.open = fake_open  # type: ignore[assignment]
    os.open = fake_os_open  # type: ignore[assignment]
    try:
        yield seen
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open  # type: ignore[assignment]


def outside(seen: list[Path], root: Path) -> list[Path]:
    """The paths of ``seen`` that are not under ``root``."""
    root = root.resolve()
    return [p for p in seen if p != root and root not in p.parents]
