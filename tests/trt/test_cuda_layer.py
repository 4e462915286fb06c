"""The CUDA half of the TensorRT runtime (cuda-python only, no TensorRT): device and pinned buffers, the row
copies behind gathers and scatters (``cudaMemcpyAsync`` / ``cudaMemcpy2DAsync``), events, stream handles.

The same checks run twice: on the CPU stand-in (``fakes.FakeCudart``, always) and on the real
``cuda.bindings.runtime`` with a GPU (marked ``gpu``; skipped without cuda-python or a GPU). The GPU run needs no
TensorRT, so it also runs where only cuda-python is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fakes import FakeCudart

from eecompile.runtimes.tensorrt import (
    DeviceBuffer,
    PinnedBuffer,
    _cuda,
    copy_row_runs,
    native_handle,
    paired_runs,
)


def _real_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout (removed in 13.0)
        except ImportError:
            return None
    try:
        err, n = cudart.cudaGetDeviceCount()
    except Exception:
        return None
    return cudart if int(err) == 0 and int(n) > 0 else None


def check_row_copies(cudart: Any, stream: Any) -> None:
    """Upload, gather rows on the device along axis 0 and 1, scatter rows into pinned memory, compare with numpy."""
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    rng = np.random.default_rng(0)
    keep = np.array([0, 1, 2, 5, 6, 9])  # three runs
    for axis, shape in ((0, (10, 3, 4)), (1, (2, 10, 5))):
        x = np.ascontiguousarray(rng.standard_normal(shape).astype(np.float32))
        src = DeviceBuffer(cudart, x.nbytes)
        dst = DeviceBuffer(cudart, x.nbytes)
        out = PinnedBuffer(cudart, x.nbytes)
        try:
            _cuda(cudart.cudaMemcpyAsync(src.ptr, x.ctypes.data, x.nbytes, h2d, stream), "upload")
            runs = paired_runs(keep, np.arange(keep.size))
            copy_row_runs(cudart, stream, dst.ptr, keep.size, src.ptr, shape[axis], runs, shape, axis, 4, d2d)
            want = np.take(x, keep, axis=axis)
            _cuda(cudart.cudaMemcpyAsync(out.ptr, dst.ptr, want.nbytes, d2h, stream), "download")
            _cuda(cudart.cudaStreamSynchronize(stream), "sync")
            np.testing.assert_array_equal(out.view(np.float32, want.shape), want)
            # Scatter: rows 1 and 2 of the gathered tensor into rows 7 and 8 of a pinned [10, ...] result (axis 0).
            if axis == 0:
                res = PinnedBuffer(cudart, x.nbytes)
                res.view(np.float32, shape)[:] = 0
                copy_row_runs(cudart, stream, res.ptr, shape[0], dst.ptr, keep.size,
                              paired_runs(np.array([1, 2]), np.array([7, 8])), want.shape, 0, 4, d2h)
                _cuda(cudart.cudaStreamSynchronize(stream), "sync")
                got = res.view(np.float32, shape)
                np.testing.assert_array_equal(got[7:9], want[1:3])
                assert not got[:7].any() and not got[9:].any()
                res.free()
        finally:
            src.free()
            dst.free()
            out.free()


def check_events(cudart: Any, stream: Any) -> None:
    start = _cuda(cudart.cudaEventCreate(), "cudaEventCreate")
    end = _cuda(cudart.cudaEventCreate(), "cudaEventCreate")
    _cuda(cudart.cudaEventRecord(start, stream), "cudaEventRecord")
    _cuda(cudart.cudaEventRecord(end, stream), "cudaEventRecord")
    _cuda(cudart.cudaStreamSynchronize(stream), "sync")
    ms = float(_cuda(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))
    assert ms >= 0.0
    cudart.cudaEventDestroy(start)
    cudart.cudaEventDestroy(end)


def test_cuda_layer_on_the_stand_in() -> None:
    cudart = FakeCudart()
    stream = _cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
    assert isinstance(native_handle(stream), int)
    check_row_copies(cudart, stream)
    check_events(cudart, stream)


@pytest.mark.gpu
def test_cuda_layer_on_the_gpu() -> None:  # pragma: no cover - needs a GPU
    cudart = _real_cudart()
    if cudart is None:
        pytest.skip("cuda-python or a CUDA GPU is missing")
    from eecompile.runtimes.tensorrt import query_gpu

    gpu = query_gpu(0)
    print(f"GPU: {gpu}")
    assert gpu.name and gpu.compute_capability.count(".") == 1 and gpu.total_memory > 0
    _cuda(cudart.cudaSetDevice(0), "cudaSetDevice")
    stream = _cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
    try:
        assert native_handle(stream) != 0  # a non-default stream, as TensorRT's execute_async_v3 takes it
        check_row_copies(cudart, stream)
        check_events(cudart, stream)
    finally:
        cudart.cudaStreamDestroy(stream)
