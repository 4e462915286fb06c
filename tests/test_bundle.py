"""Bundle writing is atomic; loading checks every file's hash and the format version."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eecompile.bundle import FORMAT_VERSION, Bundle, Manifest, staged_bundle, write_manifest
from eecompile.errors import BundleError


def _manifest() -> Manifest:
    return Manifest(source_model={"file": "m.onnx", "sha256": "0"}, inputs=[], outputs=[], segments=[])


def _write(dest: Path, payload: bytes) -> None:
    with staged_bundle(dest) as tmp:
        (tmp / "segments").mkdir()
        (tmp / "segments" / "seg0.onnx").write_bytes(payload)
        write_manifest(tmp, _manifest())


def test_write_then_load_checks_hashes(tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    _write(dest, b"one")
    b = Bundle.load(dest)
    assert set(b.manifest.files) == {"segments/seg0.onnx"}
    (dest / "segments" / "seg0.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256 does not match"):
        Bundle.load(dest)


def test_replace_is_atomic_and_failure_keeps_old(tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    _write(dest, b"one")
    with pytest.raises(RuntimeError):
        with staged_bundle(dest) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("killed half way")
    assert (dest / "segments" / "seg0.onnx").read_bytes() == b"one"
    assert not list(tmp_path.glob(".eebundle-tmp-*"))  # the staging directory is cleaned up
    _write(dest, b"two")
    assert (dest / "segments" / "seg0.onnx").read_bytes() == b"two"
    assert not list(tmp_path.glob(".eebundle-*"))


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    _write(dest, b"one")
    data = yaml.safe_load((dest / "manifest.yaml").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (dest / "manifest.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="newer than this eecompile reads"):
        Bundle.load(dest)


def test_missing_file_and_not_a_bundle(tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    _write(dest, b"one")
    (dest / "segments" / "seg0.onnx").unlink()
    with pytest.raises(BundleError, match="file missing"):
        Bundle.load(dest)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.load(tmp_path / "nothing")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(BundleError, match="not an eecompile bundle"):
        _write(other, b"one")
    assert (other / "cat.jpg").exists()
