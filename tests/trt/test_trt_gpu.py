"""Real TensorRT on a real GPU (marked ``gpu``; skipped where TensorRT, cuda-python or a GPU is missing).

Run with ``bash scripts/gpu_check.sh`` (or ``pytest -m gpu tests/trt``). These are the only tests that
check the TensorRT and CUDA calls themselves; everything else in tests/trt runs on CPU stand-ins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'eecompile[gpu]')")
if not hasattr(trt, "__version__"):  # tests/ on sys.path could make a tests folder named tensorrt importable as it
    pytest.skip("TensorRT is not installed (pip install 'eecompile[gpu]')", allow_module_level=True)
try:
    from cuda.bindings import runtime as _cudart
except ImportError:
    _cudart = pytest.importorskip("cuda.cudart", reason="cuda-python is not installed (pip install 'eecompile[gpu]')")


def _gpu_count() -> int:
    try:
        err, n = _cudart.cudaGetDeviceCount()
    except Exception:
        return 0
    return int(n) if int(err) == 0 else 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpu_count() == 0, reason="no CUDA GPU visible"),
]

from handmade import random_inputs, write_bundle  # noqa: E402

from eecompile.build import build_engines, verify_backend  # noqa: E402
from eecompile.bundle import Bundle  # noqa: E402
from eecompile.runtimes.records import engine_records  # noqa: E402


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "m.eebundle"
    write_bundle(path)
    return path


@pytest.mark.parametrize("fp16", [False, True])
def test_build_and_verify(bundle: Path, tmp_path: Path, fp16: bool) -> None:
    cache = tmp_path / "timing.cache"
    report = build_engines(bundle, "tensorrt", fp16=fp16, max_batch=16, opt_batch=8, timing_cache=cache)
    assert cache.stat().st_size > 0
    recs = engine_records(Bundle.load(bundle).manifest, "tensorrt", report.target)
    assert len(recs) == 2 and all(r.flags["fp16"] is fp16 for r in recs)
    result = verify_backend(bundle, "tensorrt", batch=16)
    result.print()
    assert result.ok


def test_chain_matches_onnxruntime(bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from eecompile.runtimes.tensorrt import TensorRTChain

    build_engines(bundle, "tensorrt", max_batch=8, timing_cache=tmp_path / "c")
    x = random_inputs(21, seed=3)["x"]
    s0 = ort.InferenceSession(str(bundle / "segments/seg0.onnx"), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(str(bundle / "segments/seg1.onnx"), providers=["CPUExecutionProvider"])
    act, l0, score = s0.run(["act", "ee0.out.logits", "ee0.score"], {"x": x, "ee0.threshold": np.array(0.76, np.float32)})
    (l1,) = s1.run(["logits"], {"act": act})
    with TensorRTChain(bundle) as chain:
        for _ in range(2):  # the second run reuses every buffer
            res = chain.run({"x": x}, thresholds=[0.76])
    clear = np.abs(score - 0.76) > 2e-3  # TF32 may flip samples sitting on the threshold
    want_exit = np.where(score >= 0.76, 0, 1)
    np.testing.assert_array_equal(res.exit_index[clear], want_exit[clear])
    want = np.where((res.exit_index == 0)[:, None], l0, l1)
    np.testing.assert_allclose(res.outputs["logits"], want, rtol=5e-3, atol=5e-3 * np.abs(want).max())
    assert int(res.exit_counts.sum()) == 21
    assert (res.timings >= 0).all()


def test_wrong_version_record_is_refused(bundle: Path, tmp_path: Path) -> None:
    from eecompile.bundle import update_bundle
    from eecompile.errors import BackendError
    from eecompile.runtimes.tensorrt import TensorRTBackend

    build_engines(bundle, "tensorrt", max_batch=4, timing_cache=tmp_path / "c")

    def age(_tmp: Path, m: object) -> None:
        for d in m.engines:  # type: ignore[attr-defined]
            d["backend_version"] = "10.0.0.1"

    update_bundle(bundle, age)
    with pytest.raises(BackendError, match="eecompile build"):
        TensorRTBackend(Bundle.load(bundle))
