"""OnnxRuntimeBackend: sessions, thresholds, gather, and ORT errors turned into ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from eecompile.bundle import Bundle
from eecompile.errors import BackendError, BundleError, DataError
from eecompile.runtimes.onnxruntime import OnnxRuntimeBackend, default_threads
from tests.runtimes.handmade import Handmade, make_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hm(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    return make_bundle(tmp_path_factory.mktemp("ort") / "b.eebundle")


@pytest.fixture(scope="module")
def backend(hm: Handmade) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(Bundle.load(hm.path), threads=1)


def test_run_segment_returns_every_output(hm: Handmade, backend: OnnxRuntimeBackend) -> None:
    feeds = hm.inputs(5)
    outs = backend.run_segment(0, {"x": feeds["x"]}, 0.6)
    assert set(outs) == {"h0", "hT", "pos", "ee0.out.logits", "ee0.gate"}
    assert outs["hT"].shape == (2, 5, 4) and outs["pos"].shape == (1, 2)
    assert outs["ee0.gate"].dtype == bool and outs["ee0.gate"].shape == (5,)
    ref = hm.exits(feeds["x"], feeds["ids"])[0]
    np.testing.assert_allclose(outs["ee0.out.logits"], ref, rtol=1e-5, atol=1e-6)
    # The threshold is really fed: 0 fires everywhere, above 1 nowhere.
    assert backend.run_segment(0, {"x": feeds["x"]}, 0.0)["ee0.gate"].all()
    assert not backend.run_segment(0, {"x": feeds["x"]}, 1.01)["ee0.gate"].any()
    final = backend.run_segment(2, {"h1": np.zeros((5, 8), np.float32), "ids": feeds["ids"]}, None)
    assert list(final) == ["logits"]


def test_gather_and_host_roundtrip(backend: OnnxRuntimeBackend) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(backend.gather(x, np.array([2, 0]), 1), x[:, [2, 0]])
    assert backend.to_host(backend.from_host(x)) is x  # CPU: no copies


def test_wrong_shape_names_tensor(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(DataError, match=r"segment 1 .*input 'hT' has shape \[3, 5, 4\], expected \[2, B, 4\]"):
        backend.run_segment(1, {"hT": np.zeros((3, 5, 4), np.float32), "pos": np.zeros((1, 2), np.float32)}, 0.5)
    with pytest.raises(DataError, match=r"input 'x' has shape \[5\]"):
        backend.run_segment(0, {"x": np.zeros(5, np.float32)}, 0.5)


def test_wrong_dtype_names_tensor(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(DataError, match="input 'ids' has dtype int32, expected int64"):
        backend.run_segment(2, {"h1": np.zeros((2, 8), np.float32), "ids": np.zeros((2, 2), np.int32)}, None)


def test_missing_input_names_it(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(DataError, match="input 'pos' was not fed"):
        backend.run_segment(1, {"hT": np.zeros((2, 5, 4), np.float32)}, 0.5)


def test_errors_are_ours_not_ort(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(DataError) as info:
        backend.run_segment(0, {"x": np.zeros((2, 7), np.float32)}, 0.5)
    assert "onnxruntime" not in type(info.value).__module__


def test_options_are_checked(hm: Handmade) -> None:
    bundle = Bundle.load(hm.path)
    with pytest.raises(BackendError, match="device 'tpu'"):
        OnnxRuntimeBackend(bundle, device="tpu")
    with pytest.raises(BackendError, match="threads must be >= 1"):
        OnnxRuntimeBackend(bundle, threads=0)
    with pytest.raises(BackendError, match="tensorrt=True needs device='cuda'"):
        OnnxRuntimeBackend(bundle, tensorrt=True)
    with pytest.raises(BackendError, match="thread_pool"):
        OnnxRuntimeBackend(bundle, thread_pool="global")
    assert default_threads() >= 1


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP present")
def test_cuda_unavailable_is_clear(hm: Handmade) -> None:
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeBackend(Bundle.load(hm.path), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA EP")
def test_cuda_matches_cpu(hm: Handmade) -> None:  # pragma: no cover - needs a GPU
    from eecompile.runtimes.chain import EarlyExitRunner

    feeds = hm.inputs(32)
    cpu = EarlyExitRunner(hm.path).run(feeds)
    gpu = EarlyExitRunner(hm.path, device="cuda").run(feeds)
    np.testing.assert_array_equal(gpu.exit_index, cpu.exit_index)
    np.testing.assert_allclose(gpu.outputs["logits"], cpu.outputs["logits"], rtol=1e-4, atol=1e-4)


def test_manifest_inputs_must_match_graph(tmp_path: Path) -> None:
    from eecompile.bundle import update_bundle

    hm = make_bundle(tmp_path / "m.eebundle")

    def rename(_root: Path, m) -> None:  # noqa: ANN001
        m.segments[1].inputs[0].name = "x"  # a name the manifest can resolve (a model input), not the graph's

    update_bundle(hm.path, rename)
    with pytest.raises(BundleError, match="seg1.onnx: graph inputs"):
        OnnxRuntimeBackend(Bundle.load(hm.path))


def test_shared_thread_pool_matches(hm: Handmade) -> None:
    # A fresh process: the shared pool must be the process's first ORT use.
    code = (
        "import numpy as np\n"
        "from eecompile.runtimes.chain import EarlyExitRunner\n"
        f"r = EarlyExitRunner({str(hm.path)!r}, thread_pool='shared', threads=2)\n"
        "x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)\n"
        "ids = np.ones((16, 2), np.int64)\n"
        "res = r.run({'x': x, 'ids': ids}, thresholds='never')\n"
        "print(res.outputs['logits'].sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    from eecompile.runtimes.chain import EarlyExitRunner

    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    ref = EarlyExitRunner(hm.path, threads=1).run({"x": x, "ids": np.ones((16, 2), np.int64)}, thresholds="never")
    assert float(out.stdout.strip()) == pytest.approx(float(ref.outputs["logits"].sum()), rel=1e-5)


def test_shared_pool_after_per_session_is_refused(backend: OnnxRuntimeBackend, hm: Handmade) -> None:
    with pytest.raises(BackendError, match="first ONNX Runtime use"):
        OnnxRuntimeBackend(Bundle.load(hm.path), thread_pool="shared")


def test_tensorrt_ep_cache_lives_in_the_user_cache_not_the_bundle(hm: Handmade, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's TensorRT EP writes engines into its cache directory: by default that is the user's cache, keyed by the
    bundle's segments, so running a (signed) bundle never writes into it."""
    from eecompile.runtimes import onnxruntime as ortrt

    monkeypatch.setenv("EECOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    bundle = Bundle.load(hm.path)
    where = ortrt.default_trt_cache_dir(bundle)
    assert where.parent == tmp_path / "cache" / "ort-trt" and hm.path not in where.parents
    # Another bundle content, another directory.
    other = Bundle.load(hm.path)
    other.manifest.files = {**other.manifest.files, other.manifest.segments[0].file: "0" * 64}
    assert ortrt.default_trt_cache_dir(other) != where
    be = OnnxRuntimeBackend(bundle, threads=1)
    be.device = "cuda"
    monkeypatch.setattr(ortrt.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    trt = be._providers(True, None, False)[0]
    assert trt[0] == "TensorrtExecutionProvider"
    assert trt[1]["trt_engine_cache_path"] == str(where) == trt[1]["trt_timing_cache_path"] and where.is_dir()
    assert not (hm.path / "engines" / "ort-trt-cache").exists()
