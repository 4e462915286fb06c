"""Initializers used by several segments (an ALBERT-style layer shared across depth) are stored once in the
bundle's ``segments/weights.bin``: the bundle stays about the model's size, and the chain still equals the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_head, write_spec

import eecompile
from benchmarks.shared_weights import export_albert, layer_output
from eecompile.write import SHARED_WEIGHTS

CUTS = [layer_output(k) for k in (0, 2, 4)]


def bundle_bytes(path: Path, under: str = "") -> int:
    return sum(p.stat().st_size for p in (path / under).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def albert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("albert")
    pytest.importorskip("torch")
    model = export_albert(d / "albert.onnx", width=256, layers=6)
    exits = [{"at": t, "head": str(make_head(d / f"h{i}.onnx", [1, 16, 256], 5, seed=i, scale=0.5)),
              "gate": {"kind": "max_prob", "threshold": 0.5}} for i, t in enumerate(CUTS)]
    spec = write_spec(d, model, exits)
    return model, d, eecompile.compile_model(spec, d / "b.eebundle").path


def test_shared_layer_is_stored_once(albert: tuple[Path, Path, Path]) -> None:
    model, d, bundle = albert
    heads = sum((d / f"h{i}.onnx").stat().st_size for i in range(len(CUTS)))
    segments = bundle_bytes(bundle, "segments")
    assert (bundle / "segments" / SHARED_WEIGHTS).is_file()
    # Four segments each use the shared layer; without sharing they would hold ~3x the model.
    assert segments <= 1.05 * model.stat().st_size + heads, (segments, model.stat().st_size, heads)
    # Every large shared initializer of every segment references weights.bin; the file is listed and hashed.
    b = eecompile.Bundle.load(bundle)
    assert f"segments/{SHARED_WEIGHTS}" in b.manifest.files
    for seg in b.manifest.segments:
        proto = onnx.load(str(bundle / seg.file), load_external_data=False)
        ext = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext, f"{seg.file} references no shared weight"
        assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} \
            == {SHARED_WEIGHTS}


def test_shared_weights_chain_equals_model_and_compacts(albert: tuple[Path, Path, Path]) -> None:
    import onnxruntime as ort

    model, _, bundle = albert
    x = np.random.default_rng(1).standard_normal((16, 16, 64)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    runner = eecompile.load(bundle)
    got = runner.run({"x": x}, thresholds="never").outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    never = runner.run({"x": x}, thresholds="never", policy="never")
    thr = [float(np.quantile(s, 0.5)) for s in never.gate_scores]
    compact = runner.run({"x": x}, thresholds=thr, policy="compact")
    wait = runner.run({"x": x}, thresholds=thr, policy="wait-all")
    np.testing.assert_array_equal(compact.exit_index, wait.exit_index)
    # Rows of a smaller batch may take another GEMM kernel: equal to float rounding.
    np.testing.assert_allclose(compact.outputs["logits"], wait.outputs["logits"], rtol=1e-5, atol=1e-5)
    assert len(set(compact.exit_index.tolist())) > 1, "thresholds should split the batch"
    for i in range(len(x)):
        k = int(compact.exit_index[i])
        forced = ["never"] * len(CUTS)
        if k < len(CUTS):
            forced[k] = "always"
        one = runner.run({"x": x[i:i + 1]}, thresholds=forced)
        np.testing.assert_allclose(compact.outputs["logits"][i], one.outputs["logits"][0], rtol=1e-5, atol=1e-5)


def test_damaged_shared_weights_are_refused(albert: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    from eecompile.errors import BundleError

    _, _, bundle = albert
    copy = shutil.copytree(bundle, tmp_path / "copy.eebundle")
    w = copy / "segments" / SHARED_WEIGHTS
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.bin: sha256 does not match"):
        eecompile.Bundle.load(copy)


def test_train_heads_keeps_the_shared_weights_once(tmp_path: Path) -> None:
    """Segments rewritten by train-heads keep referencing weights.bin (they used to get their own copy each)."""
    import yaml

    from benchmarks.shared_weights import FEATURES, TOKENS
    from eecompile.train import train_heads

    model = export_albert(tmp_path / "a.onnx", width=128, layers=4)
    exits = [{"at": layer_output(i), "head": {"kind": "linear", "options": {"pool": "first"}},
              "gate": {"kind": "max_prob", "threshold": 0.9}} for i in (0, 2)]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits}))
    bundle = eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "b.eebundle").path
    before = bundle_bytes(bundle, "segments")
    x = np.random.default_rng(0).standard_normal((64, TOKENS, FEATURES)).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x)
    train_heads(bundle, tmp_path / "t.npz", epochs=1, quiet=True)
    assert bundle_bytes(bundle, "segments") <= 1.02 * before
    b = eecompile.Bundle.load(bundle)  # hashes checked
    for seg in b.manifest.segments:
        proto = onnx.load(str(bundle / seg.file), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), seg.file
    never = eecompile.load(bundle).run({"x": x}, thresholds="never")
    import onnxruntime as ort

    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(never.outputs["logits"], want, rtol=1e-4, atol=1e-4)


_PSS_OF_LOAD = """
import sys, numpy as np
def pss():  # proportional set size: a page mapped by two sessions counts once
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/smaps_rollup") if l.startswith("Pss:")][0]
import eecompile
base = pss()
runner = eecompile.load(sys.argv[1], prepack=sys.argv[2] == "1", threads=1)
runner.run({"x": np.zeros((8, 16, 64), np.float32)}, thresholds="never", no_exit_path=False)
print(pss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Pss from /proc")
def test_no_prepack_holds_each_shared_weight_once(albert: tuple[Path, Path, Path]) -> None:
    """prepack=False: the sessions keep no packed copy of the shared layer per MatMul node and per session, so the
    loaded runner holds several model sizes less (measured: 21 vs 14 MB for this 2.2 MB model), and computes the
    same outputs; the option reaches ONNX Runtime."""
    import subprocess
    import sys

    model, _, bundle = albert
    pss = {}
    for on in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _PSS_OF_LOAD, str(bundle), on], capture_output=True,
                             text=True, check=True)
        pss[on] = int(out.stdout.split()[-1])
    assert pss["1"] - pss["0"] > 1.5 * model.stat().st_size, (pss, model.stat().st_size)
    x = np.random.default_rng(2).standard_normal((4, 16, 64)).astype(np.float32)
    off = eecompile.load(bundle, prepack=False)
    on = eecompile.load(bundle)
    np.testing.assert_allclose(off.run({"x": x}, thresholds="never").outputs["logits"],
                               on.run({"x": x}, thresholds="never").outputs["logits"], rtol=1e-5, atol=1e-5)
    sess = off.backend._sessions[0]
    assert sess.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
