"""Damaged bundles: exit 1, one line naming the bundle file and what to do; nothing written or changed."""

from __future__ import annotations

from pathlib import Path

import yaml

from eecompile.errors import BundleError
from tests.bad_inputs.util import expect_error


def _run(ws: Path) -> list:
    return ["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "out.npz"]


def _manifest(ws: Path) -> dict:
    return yaml.safe_load((ws / "b.eebundle" / "manifest.yaml").read_text())


def _write_manifest(ws: Path, doc: dict) -> None:
    (ws / "b.eebundle" / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def test_bundle_with_a_segment_missing(ws: Path) -> None:
    (ws / "b.eebundle" / "segments" / "seg1.onnx").unlink()
    expect_error(_run(ws), BundleError, "seg1.onnx", "missing", "recompile", workspace=ws)


def test_bundle_with_a_hash_mismatch(ws: Path) -> None:
    seg = ws / "b.eebundle" / "segments" / "seg0.onnx"
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0x01
    seg.write_bytes(bytes(data))
    expect_error(_run(ws), BundleError, "seg0.onnx", "sha256", "recompile", workspace=ws)


def test_bundle_with_a_head_file_changed(ws: Path) -> None:
    (ws / "b.eebundle" / "heads" / "exit0.onnx").write_bytes(b"\x00")
    expect_error(_run(ws), BundleError, "exit0.onnx", "sha256", "copy the bundle again", workspace=ws)


def test_manifest_from_a_newer_format_version(ws: Path) -> None:
    doc = _manifest(ws)
    doc["format_version"] = 99
    _write_manifest(ws, doc)
    expect_error(_run(ws), BundleError, "manifest.yaml", "format version 99", "upgrade eecompile", workspace=ws)


def test_manifest_missing(ws: Path) -> None:
    (ws / "b.eebundle" / "manifest.yaml").unlink()
    expect_error(_run(ws), BundleError, "manifest.yaml", "manifest missing", "not an eecompile bundle",
                 workspace=ws)


def test_manifest_that_is_not_yaml(ws: Path) -> None:
    (ws / "b.eebundle" / "manifest.yaml").write_text("format_version: [1\n")
    expect_error(_run(ws), BundleError, "manifest.yaml", "not valid YAML at line 2", "recompile", workspace=ws)


def test_manifest_with_a_section_missing(ws: Path) -> None:
    doc = _manifest(ws)
    del doc["segments"]
    _write_manifest(ws, doc)
    expect_error(_run(ws), BundleError, "manifest.yaml", "segments", "recompile", workspace=ws)


def test_manifest_that_is_a_list(ws: Path) -> None:
    (ws / "b.eebundle" / "manifest.yaml").write_text("- 1\n- 2\n")
    expect_error(_run(ws), BundleError, "manifest.yaml", "not an eecompile manifest", workspace=ws)


def test_bundle_path_is_a_file(ws: Path) -> None:
    (ws / "file.eebundle").write_text("x")
    expect_error(["run", ws / "file.eebundle", "--data", ws / "data.npz", "-o", ws / "out.npz"], BundleError,
                 "file.eebundle", "directory", workspace=ws)


def test_bundle_missing(ws: Path) -> None:
    expect_error(["inspect", ws / "nope.eebundle"], BundleError, "nope.eebundle", "no such bundle",
                 "eecompile compile", workspace=ws)


def test_calibrate_on_a_damaged_bundle_changes_nothing(ws: Path) -> None:
    seg = ws / "b.eebundle" / "segments" / "seg2.onnx"
    seg.write_bytes(seg.read_bytes() + b"\x00")
    expect_error(["calibrate", ws / "b.eebundle", "--data", ws / "data.npz", "--max-drop", "0.05"], BundleError,
                 "seg2.onnx", "sha256", workspace=ws)
