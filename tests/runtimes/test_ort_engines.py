"""ORT CPU engines (``eecompile build --backend onnxruntime``): ORT's optimised segment graphs whose cuts carry
NCHWc-blocked tensors. They must give the portable chain's results under every policy, fall back to the portable
segments on another target, and be refused when tampered with."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_head, write_spec
from onnx import TensorProto
from onnx import helper as oh

import eecompile
from eecompile.build import build_engines, verify_backend
from eecompile.bundle import Bundle
from eecompile.errors import BundleError
from eecompile.runtimes import onnxruntime as ortrt
from eecompile.runtimes.chain import EarlyExitRunner
from eecompile.runtimes.records import engine_records

CUTS = ["/layers.0/Relu_1_output_0", "/layers.2/Relu_1_output_0", "/layers.3/Relu_1_output_0"]
SHAPES = [[1, 16, 32, 32], [1, 32, 16, 16], [1, 64, 8, 8]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, torch_model: Callable[[str], Path]) -> Path:
    """The small torch ResNet with 3 exits (one cut feeds a projection block, two feed identity residuals),
    compiled and with ORT engines built; tests copy it before changing it."""
    d = tmp_path_factory.mktemp("ort_engines")
    model = torch_model("resnet")
    exits = [{"at": c, "head": str(make_head(d / f"h{i}.onnx", s, 10, seed=i, scale=0.5)),
              "gate": {"kind": "max_prob", "threshold": 0.5}} for i, (c, s) in enumerate(zip(CUTS, SHAPES, strict=True))]
    bundle = eecompile.compile_model(write_spec(d, model, exits), d / "m.eebundle").path
    report = build_engines(bundle, "onnxruntime")
    assert report.target == ortrt.cpu_target()
    return bundle


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m.eebundle"
    shutil.copytree(built, dst)
    return dst


def _target(runner: EarlyExitRunner) -> str | None:
    return getattr(runner.backend, "engine_target", None)


def _x(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)}


def test_records_files_and_rewrites(built: Path) -> None:
    m = Bundle.load(built).manifest
    target = ortrt.cpu_target()
    recs = engine_records(m, "onnxruntime", target)
    assert [r.segment for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert r.file == f"engines/seg{r.segment}.onnxruntime.{target}.onnx"
        assert r.sha256 == m.files[r.file] and r.backend_version == ort.__version__
        assert r.flags["load_optimization"] == "ORT_DISABLE_ALL"
    if ortrt.nchwc_block_size() == 1:
        pytest.skip("this CPU's ONNX Runtime does not use NCHWc: nothing to carry blocked")
    block = ortrt.nchwc_block_size()
    carried = {c["tensor"] for r in recs for c in r.flags["rewritten"]}
    assert carried == set(CUTS)  # 16, 32 and 64 channels: multiples of 8 and 16
    out0 = recs[0].flags["outputs"][CUTS[0]]
    assert out0["name"] == f"{CUTS[0]}.nchwc{block}" and out0["batch_axis"] == 0 and out0["channels"] == 16
    assert recs[1].flags["inputs"][CUTS[0]] == out0
    # The chain was optimised as one graph: no later segment converts its input to NCHWc again.
    assert {r.flags["method"] for r in recs} == {"merged"}
    assert all(r.flags["segment_sha256"] == m.files[m.segments[r.segment].file] for r in recs)
    assert sum(r.flags["reorders_after"]["ReorderInput"] for r in recs[1:]) == 0
    g1 = onnx.load(str(built / str(recs[1].file))).graph
    assert [i.name for i in g1.input][0] == out0["name"]


@pytest.mark.parametrize("policy", ["compact", "wait-all", "never"])
def test_engines_match_portable(built: Path, policy: str) -> None:
    eng = EarlyExitRunner(built)
    port = EarlyExitRunner(built, engines=False)
    assert _target(eng) == ortrt.cpu_target() and _target(port) is None
    x = _x(24, seed=1)
    # Thresholds that split the batch: each gate's median score, plus a few random draws.
    scores = port.run(x, policy="never").gate_scores
    assert scores is not None
    rng = np.random.default_rng(2)
    choices = [[float(np.median(s)) for s in scores]] + [list(rng.uniform(0.1, 0.9, 3)) for _ in range(3)]
    for thr in choices:
        a = eng.run(x, thresholds=thr, policy=policy)
        b = port.run(x, thresholds=thr, policy=policy)
        np.testing.assert_array_equal(a.exit_index, b.exit_index)
        np.testing.assert_allclose(a.outputs["logits"], b.outputs["logits"], rtol=1e-5, atol=1e-6)
        if policy == "never":
            assert a.all_exits is not None and b.all_exits is not None
            for ea, eb in zip(a.all_exits, b.all_exits, strict=True):
                np.testing.assert_allclose(ea["logits"], eb["logits"], rtol=1e-5, atol=1e-6)
    assert len(set(eng.run(x, thresholds=choices[0], policy=policy).exit_index.tolist())) > 1
    eng.close()
    port.close()


def test_verify_compares_engines_with_portable(built: Path) -> None:
    report = verify_backend(built, "onnxruntime", batch=3)
    assert report.ok, [r for r in report.rows if not r.ok]
    assert any("engines for " + ortrt.cpu_target() in n for n in report.notes)
    assert {r.segment for r in report.rows} == {0, 1, 2, 3}


def test_other_target_falls_back_with_warning(bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ortrt, "cpu_target", lambda: "ort0.9-nchwc4")
    with caplog.at_level(logging.WARNING, logger="eecompile.runtimes.onnxruntime"):
        runner = EarlyExitRunner(bundle)
    assert _target(runner) is None
    assert any("ort0.9-nchwc4" in r.getMessage() and "portable" in r.getMessage() for r in caplog.records)
    x = _x(5)
    got = runner.run(x, thresholds=[0.5, 0.5, 0.5])
    monkeypatch.undo()
    want = EarlyExitRunner(bundle, engines=False).run(x, thresholds=[0.5, 0.5, 0.5])
    np.testing.assert_array_equal(got.outputs["logits"], want.outputs["logits"])


def test_other_optimizer_settings_fall_back(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="eecompile.runtimes.onnxruntime"):
        runner = EarlyExitRunner(bundle, disabled_optimizers=())
    assert _target(runner) is None
    assert any("disabled_optimizers" in r.getMessage() for r in caplog.records)


def test_tampered_engine_refused(bundle: Path) -> None:
    rec = engine_records(Bundle.load(bundle).manifest, "onnxruntime", ortrt.cpu_target())[2]
    assert rec.file is not None
    f = bundle / rec.file
    f.write_bytes(f.read_bytes()[:-1] + b"!")
    with pytest.raises(BundleError, match="sha256 does not match"):
        EarlyExitRunner(bundle)
    with pytest.raises(BundleError, match=r"seg2\.onnxruntime.*sha256 does not match"):
        EarlyExitRunner(Bundle.load(bundle, verify=False))


def test_rebuild_replaces_this_targets_engines(bundle: Path) -> None:
    before = sorted(p.name for p in (bundle / "engines").iterdir())
    build_engines(bundle, "onnxruntime")
    m = Bundle.load(bundle).manifest
    assert sorted(p.name for p in (bundle / "engines").iterdir()) == before
    assert len([d for d in m.engines if d["backend"] == "onnxruntime"]) == len(m.segments)


def _reorder_input_model(channels: int) -> bytes:
    g = oh.make_graph([oh.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc", channels_last=0)], "r",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 3, 5])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft.nchwc", 1)])
    m.ir_version = 8
    return m.SerializeToString()


@pytest.mark.parametrize("channels", [16, 20, 64])
def test_numpy_blocking_matches_ort(channels: int) -> None:
    """verify feeds plain tensors to blocked engine inputs and reads blocked outputs back: the numpy conversions
    must be ORT's own layout (padding included)."""
    block = ortrt.nchwc_block_size()
    if block == 1:
        pytest.skip("no NCHWc on this CPU")
    x = np.random.default_rng(0).standard_normal((2, channels, 3, 5)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(_reorder_input_model(channels), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ortrt.to_blocked(x, block), y)
    np.testing.assert_array_equal(ortrt.from_blocked(y, block, channels), x)
