"""Bundle paths stay inside the bundle: manifest paths are relative and normalised, symbolic links are
refused, external data stays beside its ONNX file, and the recorded source model is found only under its
bare name with its sha256. Each case: the error type, a message naming the culprit and the fix, and
nothing read or written outside the bundle."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from eecompile.bundle import Bundle, external_data_locations, update_bundle
from eecompile.errors import BundleError
from tests.bad_inputs.util import expect_error, snapshot, tiny_mlp
from tests.security.util import edit_manifest, opened_files, outside, rehash


def _run(ws: Path, bundle: Path | None = None) -> list:
    return ["run", bundle or ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "out.npz"]


def _load_reads_nothing_outside(bundle: Path, *needles: str) -> str:
    """Bundle.load fails with a BundleError naming ``needles``; it opened no file outside the bundle."""
    with opened_files() as seen, pytest.raises(BundleError) as info:
        Bundle.load(bundle)
    msg = str(info.value)
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    assert outside(seen, bundle) == [], f"opened outside the bundle: {outside(seen, bundle)}"
    return msg


def _other_segment(ws: Path) -> Path:
    """A copy of segment 0 placed outside the bundle, with a different final answer baked in."""
    b = ws / "b.eebundle"
    elsewhere = ws / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(b / "segments" / "seg0.onnx", elsewhere / "seg0.onnx")
    return elsewhere / "seg0.onnx"


@pytest.mark.parametrize("path", ["../elsewhere/seg0.onnx", "ABSOLUTE", "segments/../../elsewhere/seg0.onnx",
                                  "./segments/seg0.onnx", "segments//seg0.onnx", "segments\\seg0.onnx"])
def test_segment_file_outside_the_bundle_is_refused(ws: Path, path: str) -> None:
    b = ws / "b.eebundle"
    target = _other_segment(ws)
    rel = str(target) if path == "ABSOLUTE" else path

    def change(d: dict) -> None:
        d["segments"][0]["file"] = rel
        d["files"][rel] = d["files"]["segments/seg0.onnx"]  # the hash of the file it points to

    edit_manifest(b, change)
    _load_reads_nothing_outside(b, "segments[0].file", "inside the bundle", "recompile")
    expect_error(_run(ws), BundleError, "segments[0].file", "inside the bundle", workspace=ws)


def test_files_listing_a_system_file_is_refused(ws: Path) -> None:
    """`files:` naming ../../../etc/passwd would make loading a yes/no test of its content."""
    b = ws / "b.eebundle"
    secret = ws / "secret.txt"
    secret.write_text("s3cret\n")
    import hashlib

    edit_manifest(b, lambda d: d["files"].__setitem__("../secret.txt", hashlib.sha256(b"s3cret\n").hexdigest()))
    _load_reads_nothing_outside(b, "files['../secret.txt']", "inside the bundle")
    expect_error(["inspect", b], BundleError, "../secret.txt", "recompile", workspace=ws)


def test_engine_record_pointing_outside_is_refused(ws: Path) -> None:
    b = ws / "b.eebundle"
    target = _other_segment(ws)
    rec = {"segment": 0, "backend": "onnxruntime", "target": "x", "file": str(target), "sha256": "0" * 64,
           "backend_version": "1"}
    edit_manifest(b, lambda d: d.__setitem__("engines", [rec]))
    _load_reads_nothing_outside(b, "engines[0].file", str(target))
    expect_error(_run(ws), BundleError, "engines[0].file", workspace=ws)


def test_symlinked_segment_file_is_refused(ws: Path) -> None:
    """The link's target has the very bytes the manifest hashes: only the link itself is wrong."""
    b = ws / "b.eebundle"
    target = _other_segment(ws)
    (b / "segments" / "seg0.onnx").unlink()
    os.symlink(target, b / "segments" / "seg0.onnx")
    _load_reads_nothing_outside(b, "seg0.onnx", "symbolic link", "cp -L")
    expect_error(_run(ws), BundleError, "seg0.onnx", "symbolic link", "cp -L", workspace=ws)


def test_symlinked_segments_directory_is_refused(ws: Path) -> None:
    b = ws / "b.eebundle"
    shutil.move(b / "segments", ws / "elsewhere")
    os.symlink(ws / "elsewhere", b / "segments")
    _load_reads_nothing_outside(b, "segments", "symbolic link")
    expect_error(_run(ws), BundleError, "segments", "symbolic link", workspace=ws)


def test_symlinked_bundle_root_is_allowed(ws: Path) -> None:
    """A link *to* a bundle (latest -> v3) is the user's choice; only links inside a bundle are refused."""
    os.symlink(ws / "b.eebundle", ws / "latest.eebundle")
    assert len(Bundle.load(ws / "latest.eebundle").manifest.segments) == 3


def test_rewrite_refuses_an_unlisted_symlinked_directory(ws: Path) -> None:
    """calibrate/build/train-heads rewrite a bundle through update_bundle: an unlisted link to a directory
    outside must not be followed, copied in and hashed."""
    b = ws / "b.eebundle"
    outside_dir = ws / "outside-heads"
    outside_dir.mkdir()
    (outside_dir / "stolen.onnx").write_bytes(b"not yours")
    os.symlink(outside_dir, b / "extra-heads")
    before = snapshot(ws)
    with pytest.raises(BundleError, match="symbolic link"):
        update_bundle(b, lambda tmp, m: None)
    assert snapshot(ws) == before
    expect_error(["build", b, "--backend", "onnxruntime"], BundleError, "extra-heads", "symbolic link",
                 workspace=ws)


def test_rewrite_carries_listed_files_only(ws: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = ws / "b.eebundle"
    (b / "notes.txt").write_text("left by hand\n")
    with caplog.at_level(logging.WARNING):
        new = update_bundle(b, lambda tmp, m: m.notes.append("rewritten"))
    assert not (b / "notes.txt").exists()
    assert "notes.txt" not in new.manifest.files and "rewritten" in new.manifest.notes
    assert any("notes.txt" in r.getMessage() and "not listed" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ external data


def _with_external_data(ws: Path, location: str) -> Path:
    """Replace segment 0 by a model whose weights are external at ``location`` (hash re-recorded)."""
    b = ws / "b.eebundle"
    seg = b / "segments" / "seg0.onnx"
    m = onnx.load(str(seg))
    for t in m.graph.initializer:
        if t.raw_data or t.float_data:
            arr = nh.to_array(t)
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", "0"), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            break
    seg.write_bytes(m.SerializeToString())
    rehash(b, "segments/seg0.onnx")
    return b


@pytest.mark.parametrize("location", ["../../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_leaving_the_segment_folder_is_refused(ws: Path, location: str) -> None:
    b = _with_external_data(ws, location)
    msg = _load_reads_nothing_outside(b, "seg0.onnx", "external data", location)
    assert "recompile" in msg
    expect_error(_run(ws), BundleError, "external data", location, workspace=ws)


def test_external_data_through_a_link_or_unlisted_is_refused(ws: Path) -> None:
    b = _with_external_data(ws, "seg0.onnx.data")
    (ws / "weights.bin").write_bytes(b"\0" * 4096)
    os.symlink(ws / "weights.bin", b / "segments" / "seg0.onnx.data")
    _load_reads_nothing_outside(b, "seg0.onnx.data", "symbolic link")
    (b / "segments" / "seg0.onnx.data").unlink()
    (b / "segments" / "seg0.onnx.data").write_bytes(b"\0" * 4096)
    _load_reads_nothing_outside(b, "seg0.onnx.data", "not listed")


def test_external_data_scanner_matches_onnx(tmp_path: Path) -> None:
    """The pure-Python protobuf walk finds the locations onnx itself records, in subgraphs too."""
    model = tiny_mlp(tmp_path / "m.onnx", external=True)
    proto = onnx.load(str(model), load_external_data=False)
    want = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert want == {"m.onnx.data"}
    assert set(external_data_locations(model.read_bytes())) == want
    # An If whose branch holds a Constant with external data: found through node -> attribute -> graph.
    const = oh.make_tensor("c", TensorProto.FLOAT, [2], [1.0, 2.0])
    const.ClearField("float_data")
    const.data_location = TensorProto.EXTERNAL
    const.external_data.add(key="location", value="branch.bin")
    then_g = oh.make_graph([oh.make_node("Constant", [], ["y"], value=const)], "then", [],
                           [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    else_g = oh.make_graph([oh.make_node("Constant", [], ["y"], value=nh.from_array(np.zeros(2, np.float32)))],
                           "else", [], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    g = oh.make_graph([oh.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                      [oh.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    data = oh.make_model(g).SerializeToString()
    assert external_data_locations(data) == ["branch.bin"]
    with pytest.raises(ValueError):
        external_data_locations(b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end
