"""Build, load and chain with CPU stand-ins for TensorRT and CUDA (see fakes.py: stubs, not emulators).

What this checks is ours: records written and checked, hashes before deserializing, profiles handed to the
builder, the timing cache threaded through segments and kept, fp16 dispatch per TensorRT major, pointer
arithmetic of gathers and scatters, and the chain's policies against a plain ONNX Runtime reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakes import FAKE_STATE, fake_gpu
from handmade import random_inputs, write_bundle

from eecompile.build import build_engines
from eecompile.bundle import Bundle
from eecompile.errors import BackendError, BundleError
from eecompile.runtimes.records import engine_records


def _reference(bundle: Path, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The chain by hand on ORT CPU: every sample through both segments, first firing exit wins."""
    s0 = ort.InferenceSession(str(bundle / "segments/seg0.onnx"), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(str(bundle / "segments/seg1.onnx"), providers=["CPUExecutionProvider"])
    act, logits0, gate = s0.run(["act", "ee0.out.logits", "ee0.gate"],
                                {"x": x, "ee0.threshold": np.array(threshold, np.float32)})
    (logits1,) = s1.run(["logits"], {"act": act})
    return np.where(gate[:, None], logits0, logits1), np.where(gate, 0, 1)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "m.eebundle"
    write_bundle(path)
    return path


def test_build_records_engines_and_keeps_timing_cache(bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "tc.bin"
    with fake_gpu(monkeypatch):
        report = build_engines(bundle, "tensorrt", max_batch=8, opt_batch=4, workspace_mb=64, timing_cache=cache)
    assert report.target == "sm90-trt10.13"
    b = Bundle.load(bundle)  # hashes of the new engine files are in the manifest
    recs = engine_records(b.manifest, "tensorrt", "sm90-trt10.13")
    assert [r.file for r in recs] == [f"engines/seg{k}.tensorrt.sm90-trt10.13.plan" for k in (0, 1)]
    assert all(r.gpu_name == "NVIDIA H200" and r.compute_capability == "9.0" and r.backend_version == "10.13.0.35"
               for r in recs)
    assert recs[0].flags["max_batch"] == 8 and recs[0].flags["precision"] == "fp32"
    assert recs[0].profiles["x"] == [[1, 3, 8, 8], [4, 3, 8, 8], [8, 3, 8, 8]]
    cfg0, cfg1 = FAKE_STATE["configs"]
    assert cfg0.pool == {"WORKSPACE": 64 << 20}
    assert set(cfg0.profiles[0].shapes) == {"x"}  # the static threshold scalar gets no profile
    # one cache threads through the segments: segment 1 starts from segment 0's, and the file keeps it
    assert cfg1.cache.blob == b"+" and cache.read_bytes() == b"++"
    with fake_gpu(monkeypatch):
        build_engines(bundle, "tensorrt", max_batch=8, timing_cache=cache)
    assert FAKE_STATE["configs"][0].cache.blob == b"++"  # reused by the next build
    assert len(Bundle.load(bundle).manifest.engines) == 2  # rebuilt engines replace their target's records


@pytest.mark.parametrize("blob", [b"BAD cache", b"OTHERGPU cache"])
def test_unusable_timing_cache_starts_afresh(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture, blob: bytes) -> None:
    cache = tmp_path / "tc.bin"
    cache.write_bytes(blob)
    with fake_gpu(monkeypatch):
        build_engines(bundle, "tensorrt", max_batch=4, timing_cache=cache)
    assert FAKE_STATE["configs"][0].cache.blob == b""  # an empty cache replaced the unusable one
    assert cache.read_bytes() == b"++" and "timing cache" in caplog.text


def test_fp16_on_trt10_uses_builder_flag(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_gpu(monkeypatch, "10.3.0.30", b"Orin", (8, 7)):
        report = build_engines(bundle, "tensorrt", fp16=True, max_batch=4, timing_cache=bundle.parent / "c")
    assert report.target == "sm87-trt10.3"
    assert "FP16" in FAKE_STATE["configs"][0].flags
    assert all(i.type.tensor_type.elem_type == 1 for m in FAKE_STATE["parsed"] for i in m.graph.input)
    assert {o.op_type for m in FAKE_STATE["parsed"] for o in m.graph.node} >= {"Conv"}
    assert report.records[0].flags["precision"] == "fp16-flag"


def test_fp16_on_trt11_converts_the_onnx(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_gpu(monkeypatch, "11.4.1"):
        report = build_engines(bundle, "tensorrt", fp16=True, max_batch=4, timing_cache=bundle.parent / "c")
    assert FAKE_STATE["configs"][0].flags == []  # no precision flags exist on 11.x
    parsed = FAKE_STATE["parsed"][0]
    assert any(t.data_type == 10 for t in parsed.graph.initializer)  # fp16 weights reached the parser
    assert report.records[0].flags["precision"] == "fp16-onnx"


def test_unsupported_tensorrt(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_gpu(monkeypatch, "8.6.1"), pytest.raises(BackendError, match="not supported"):
        build_engines(bundle, "tensorrt")


def test_missing_tensorrt_says_how_to_install(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendError, match=r"pip install 'eecompile\[gpu\]'.*python3-libnvinfer"):
        build_engines(bundle, "tensorrt")


def test_onnxruntime_build_records_a_check(bundle: Path) -> None:
    from eecompile.runtimes.onnxruntime import cpu_target

    report = build_engines(bundle, "onnxruntime", max_batch=4)
    recs = engine_records(Bundle.load(bundle).manifest, "onnxruntime")
    # ORT CPU engines: ONNX Runtime's own optimised graph per segment, tied to this CPU's layout target.
    assert report.target == cpu_target()
    assert [r.file for r in recs] == [f"engines/seg{k}.onnxruntime.{cpu_target()}.onnx" for k in range(2)]


def test_load_refuses_other_version_and_tampered_plan(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eecompile.runtimes.tensorrt import TensorRTBackend

    with fake_gpu(monkeypatch):
        build_engines(bundle, "tensorrt", max_batch=4, timing_cache=bundle.parent / "c")
    with fake_gpu(monkeypatch, "10.14.1.48"), pytest.raises(BackendError) as e:
        TensorRTBackend(Bundle.load(bundle))
    assert "built with TensorRT 10.13.0.35" in str(e.value) and "eecompile build" in str(e.value)
    with fake_gpu(monkeypatch, gpu=b"NVIDIA A100", cc=(8, 0)), pytest.raises(BackendError, match="compute capab"):
        TensorRTBackend(Bundle.load(bundle))
    plan = bundle / "engines/seg1.tensorrt.sm90-trt10.13.plan"
    plan.write_bytes(plan.read_bytes()[:-1] + b"!")
    b = Bundle.load(bundle, verify=False)
    with fake_gpu(monkeypatch), pytest.raises(BundleError, match="sha256 does not match"):
        TensorRTBackend(b)
    assert len(FAKE_STATE.get("deserialized", [])) == 1  # segment 0 only: the tampered plan was never parsed


@pytest.mark.parametrize("threshold", [0.0, 0.72, 0.76, 0.8, 1.0])
@pytest.mark.parametrize("policy", ["compact", "wait-all"])
def test_chain_matches_reference(bundle: Path, monkeypatch: pytest.MonkeyPatch, threshold: float,
                                 policy: str) -> None:
    from eecompile.runtimes.tensorrt import TensorRTChain

    x = random_inputs(19, seed=3)["x"]  # 19 rows, max batch 8: three chunks, the last one short
    want, want_exit = _reference(bundle, x, threshold)
    with fake_gpu(monkeypatch) as cudart:
        build_engines(bundle, "tensorrt", max_batch=8, timing_cache=bundle.parent / "c")
        with TensorRTChain(bundle) as chain:
            syncs0 = cudart.syncs
            res = chain.run({"x": x}, thresholds=[threshold], policy=policy)
            syncs = cudart.syncs - syncs0
    np.testing.assert_allclose(res.outputs["logits"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res.exit_index, want_exit)
    assert res.exit_counts.tolist() == [int((want_exit == 0).sum()), int((want_exit == 1).sum())]
    assert syncs <= 2 * 3  # per chunk: the gate mask, then the end of the chunk


def test_chain_compaction_shrinks_the_batch(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eecompile.runtimes.tensorrt import TensorRTChain

    x = random_inputs(8, seed=3)["x"]
    _, want_exit = _reference(bundle, x, 0.78)
    assert 0 < (want_exit == 0).sum() < 8, "test data should exit some rows early"
    with fake_gpu(monkeypatch):
        build_engines(bundle, "tensorrt", max_batch=8, timing_cache=bundle.parent / "c")
        with TensorRTChain(bundle) as chain:
            chain.run({"x": x}, thresholds=[0.78])
            assert chain.last_batch_sizes == [[8, int((want_exit == 1).sum())]]
            res_all = chain.run({"x": x}, thresholds="always")
            assert chain.last_batch_sizes == [[8]] and (res_all.exit_index == 0).all()
            res_never = chain.run({"x": x}, thresholds=[0.78], policy="never")
            assert chain.last_batch_sizes == [[8, 8]]
    np.testing.assert_array_equal(res_never.exit_index, want_exit)
    assert res_never.all_exits is not None and len(res_never.all_exits) == 2
    assert res_never.gate_masks is not None and res_never.gate_masks.shape == (1, 8)
    np.testing.assert_array_equal(res_never.gate_masks[0], want_exit == 0)
    assert res_never.gate_scores is not None and np.isfinite(res_never.gate_scores).all()


def test_gather_along_a_non_leading_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaMemcpy2DAsync pitches: rows kept along axis 1 of a [2, B, 3] tensor."""
    from eecompile.runtimes.tensorrt import DeviceBuffer, DeviceTensor, TensorRTBackend

    with fake_gpu(monkeypatch) as cudart:
        be = object.__new__(TensorRTBackend)
        be.cudart, be.stream, be._slots = cudart, 1, {}
        src = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
        buf = DeviceBuffer(cudart, src.nbytes)
        cudart.cudaMemcpyAsync(buf.ptr, src.ctypes.data, src.nbytes, 1, 1)
        rows = np.array([0, 2, 3, 5])
        out = be.gather(DeviceTensor(buf, src.shape, src.dtype), rows, axis=1)
        host = np.empty(out.shape, np.float32)
        cudart.cudaMemcpyAsync(host.ctypes.data, out.ptr, host.nbytes, 2, 1)
    np.testing.assert_array_equal(host, src[:, rows])
    assert cudart.calls.count("memcpy2d") == 3  # runs [0], [2, 3], [5]


def test_generic_runner_and_verify_drive_the_backend(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chain.EarlyExitRunner (run_segment/to_host/gather) and verify_backend on the TensorRT backend."""
    from eecompile.build import verify_backend
    from eecompile.runtimes.chain import EarlyExitRunner

    x = random_inputs(8, seed=3)["x"]
    want, want_exit = _reference(bundle, x, 0.78)
    with fake_gpu(monkeypatch):
        build_engines(bundle, "tensorrt", max_batch=8, timing_cache=bundle.parent / "c")
        with EarlyExitRunner(bundle, backend="tensorrt") as runner:
            res = runner.run({"x": x}, thresholds=[0.78])
        report = verify_backend(bundle, "tensorrt", batch=8)
    np.testing.assert_allclose(res.outputs["logits"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res.exit_index, want_exit)
    assert report.ok and {r.tensor for r in report.rows} >= {"act", "ee0.gate", "logits"}
    report.print()
