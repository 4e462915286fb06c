"""TensorRT runtime: one engine per segment, chained on the device.

Design (what stays on the GPU and why):
  * one non-default CUDA stream carries everything: uploads, every segment, gathers, result copies;
  * device buffers are allocated once, for the engines' max batch, when the runtime is created (no
    allocation per call). Every tensor that lives across segments (model inputs, carried tensors, gate
    state) has two slots: a gather reads one and writes the other (``cudaMemcpy`` must not overlap);
  * segment k's outputs are bound *as* segment k+1's inputs (``set_tensor_address`` on the same pointer):
    no copy between segments;
  * the gate mask (B bools) is the only thing copied to the host before the next segment can be set up:
    one ``cudaStreamSynchronize`` per gated segment. Exited rows are scattered into pinned host result
    buffers with async copies, and the rows still running are gathered on the device;
  * all execution contexts share one scratch buffer (``USER_MANAGED`` allocation): they run one after
    another on one stream, which TensorRT allows (TensorRT #2040, #3276).

Gather without a custom kernel: samples are stacked along a batch axis, so the rows kept form runs of
consecutive indices; each run is one ``cudaMemcpy2DAsync`` (width = run length x the bytes of one sample
below the batch axis, height = the product of the dims above it; a batch axis 0 makes it a plain 1-D copy).
Early exit keeps most rows in a few long runs, so this is a handful of copies per tensor, each a DMA at
full bandwidth; the worst case (alternating rows) is B/2 copies, still microseconds at the batch sizes
engines are built for. A gather engine per tensor would cost an engine build and a context per carried
tensor for no measurable gain.

Imports: numpy, tensorrt and cuda-python (``cuda.bindings.runtime``) only; never onnx or torch, so it runs
on a Jetson with JetPack's TensorRT. Everything here that touches the GPU is written against the TensorRT 10/11
and cuda-python documentation and has not been run on a GPU in the session that wrote it (see docs/tensorrt.md).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BackendError, DataError
from eecompile.runtimes.base import SegmentBackend
from eecompile.runtimes.chain import EarlyExitRunner, RunResult
from eecompile.runtimes.records import (
    INSTALL_HINT,
    EngineRecord,
    check_engine_record,
    engine_records,
    engine_target,
    parse_trt_version,
    rebuild_command,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- imports

def import_tensorrt() -> Any:
    """``import tensorrt`` with an error that says how to install it; refuses unsupported versions."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from e
    if not hasattr(trt, "__version__"):
        # A directory named ``tensorrt`` on sys.path (e.g. tests/trt) imports as an empty namespace package.
        where = list(getattr(trt, "__path__", []))
        raise BackendError(f"TensorRT is not installed ('tensorrt' resolves to {where}, not the library); "
                           f"{INSTALL_HINT}")
    parse_trt_version(trt.__version__)
    return trt


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One ``trt.Logger`` per process (per tensorrt module): TensorRT routes every builder's and runtime's messages
    to the first logger it was given and warns when a later object brings a different one."""
    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


def import_cudart() -> Any:
    """cuda-python's runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendError(f"cuda-python is not installed ({e}); pip install 'eecompile[gpu]' "
                               f"(on a Jetson: pip install cuda-python matching JetPack's CUDA)") from e
    return cudart


def _cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise BackendError naming the call on failure.

    Every ``cuda.bindings.runtime`` call returns a tuple whose first element is a ``cudaError_t`` (an int enum,
    ``cudaError_t.cudaSuccess == 0``), followed by the call's outputs (``cudaMalloc`` -> ``(err, ptr)``)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python handle (``cudaStream_t``, ``cudaEvent_t``) as a plain int.

    TensorRT's Python API takes streams as ints (``execute_async_v3(stream_handle: int)``). cuda-bindings 13
    deprecates ``int(handle)`` in favour of ``cuda.bindings.utils.get_cuda_native_handle``; older versions only
    have ``int()``."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except (TypeError, ValueError):  # a handle type it does not know
        return int(obj)


@dataclass(frozen=True)
class GPUInfo:
    """A CUDA device: its name, compute capability (``"9.0"``) and memory in bytes."""

    name: str
    compute_capability: str  # "9.0"
    total_memory: int


def query_gpu(device: int = 0) -> GPUInfo:
    """Name and compute capability of CUDA device ``device``."""
    cudart = import_cudart()
    try:
        prop = _cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except BackendError as e:
        raise BackendError(f"no usable CUDA device {device} ({e}); TensorRT needs an NVIDIA GPU and driver") from e
    name = prop.name
    if isinstance(name, bytes | bytearray):
        name = name.split(b"\x00", 1)[0].decode(errors="replace")
    return GPUInfo(str(name).strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))


# ---------------------------------------------------------------------------------------- row runs

def paired_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """Split row pairs ``src[i] -> dst[i]`` into runs ``(src_start, dst_start, length)`` where both advance
    by one, so each run is a single contiguous copy. ``src`` and ``dst`` are int arrays of equal length."""
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [src.size]])
    return [(int(src[s]), int(dst[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def batch_layout(shape: Sequence[int], axis: int, itemsize: int) -> tuple[int, int]:
    """``(outer, inner_bytes)`` of a tensor stacked along ``axis``: copies move ``inner_bytes`` per sample
    ``outer`` times with a pitch of the batch size x ``inner_bytes``."""
    outer = int(np.prod(shape[:axis], dtype=np.int64)) if axis else 1
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) * itemsize
    return outer, inner


def copy_row_runs(cudart: Any, stream: Any, dst: int, dst_batch: int, src: int, src_batch: int,
                  runs: Sequence[tuple[int, int, int]], shape: Sequence[int], axis: int, itemsize: int,
                  kind: Any) -> None:
    """Enqueue one async copy per run ``(src_row, dst_row, length)`` between two tensors stacked along ``axis``.

    ``src`` holds ``src_batch`` samples, ``dst`` holds ``dst_batch``; ``shape`` is the source's shape (only the
    dims other than ``axis`` are used). With nothing above the batch axis a run is one contiguous
    ``cudaMemcpyAsync(dst, src, count, kind, stream)``; otherwise ``cudaMemcpy2DAsync(dst, dpitch, src, spitch,
    width, height, kind, stream)`` with width = run x bytes per sample, height = the product of the dims above
    the axis and the pitches = batch x bytes per sample. Pointers are plain ints (device or pinned host)."""
    outer, inner = batch_layout(shape, axis, itemsize)
    if inner == 0 or outer == 0:
        return
    for s, d, n in runs:
        if outer == 1:
            _cuda(cudart.cudaMemcpyAsync(dst + d * inner, src + s * inner, n * inner, kind, stream),
                  "cudaMemcpyAsync(rows)")
        else:
            _cuda(cudart.cudaMemcpy2DAsync(dst + d * inner, dst_batch * inner, src + s * inner, src_batch * inner,
                                           n * inner, outer, kind, stream),
                  "cudaMemcpy2DAsync(rows)")


# ---------------------------------------------------------------------------------- device memory

class DeviceBuffer:
    """``nbytes`` of device memory from ``cudaMalloc``; freed by :meth:`free` or when collected."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self._cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_cuda(cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # interpreter shutdown: cudart may be gone
            pass


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) viewed as numpy: async device-to-host copies land here."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self._cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_cuda(cudart.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)

    def view(self, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.array[:n].view(dtype).reshape(tuple(shape))

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0, np.uint8)
            self._cudart.cudaFreeHost(self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


@dataclass
class DeviceTensor:
    """A tensor on the device: a view of (part of) a buffer with a shape and dtype."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str = ""
    slot: int = -1  # which of the runtime's two slots for ``name`` holds it; -1: a buffer of its own

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# --------------------------------------------------------------------------------------- backend

def scratch_size(engine: Any) -> int:
    """Bytes of scratch (activation) memory a USER_MANAGED context of ``engine`` needs, over all its profiles.

    ``device_memory_size_v2`` (TensorRT >= 10.1; it may legitimately be 0); ``device_memory_size`` was deprecated in
    10.1 and is gone in 11, so it is only the fallback for 10.0."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)  # pragma: no cover - TensorRT 10.0


@dataclass
class _Segment:
    index: int
    engine: Any
    context: Any
    inputs: list[str]  # every engine input, the threshold included
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    max_shapes: dict[str, tuple[int, ...]]
    record: EngineRecord


class TensorRTBackend(SegmentBackend):
    """Loads the bundle's TensorRT engines for this GPU and runs segments on device-resident tensors.

    Options: ``device`` (CUDA ordinal, default 0), ``strict_gpu`` (refuse an engine built on another GPU
    model of the same compute capability; default True).
    """

    name = "tensorrt"
    reuses_result_buffers = True  # exited rows land in pinned buffers reused by the next call
    max_batch: int  # engines are built for a max batch: the smallest over the segments (never unlimited)

    def __init__(self, bundle: Bundle | str | Path, **options: Any) -> None:
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        super().__init__(bundle, **options)
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        device = int(options.get("device", 0))
        _cuda(self.cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        self.gpu = query_gpu(device)
        self.trt_version = parse_trt_version(self.trt.__version__)
        self.target = engine_target(self.gpu.compute_capability, self.trt_version.full)
        self.stream = _cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_ptr = native_handle(self.stream)  # TensorRT takes the stream as an int
        self._closed = False
        self._logger = trt_logger(self.trt)
        self._runtime = self.trt.Runtime(self._logger)
        records = self._records(bool(options.get("strict_gpu", True)))
        self.max_batch = min(int(r.flags.get("max_batch", 1)) for r in records)
        self.segments = [self._load(r) for r in records]
        self._share_scratch()
        self._allocate()

    # --- loading -------------------------------------------------------------------------------------
    def _records(self, strict_gpu: bool) -> list[EngineRecord]:
        m, path = self.manifest, self.bundle.path
        mine = engine_records(m, "tensorrt", self.target)
        if not mine:
            others = engine_records(m, "tensorrt")
            if others:  # explain why the engines present do not fit (names versions and the rebuild command)
                check_engine_record(others[0], self.trt_version.full, self.gpu.name, self.gpu.compute_capability,
                                    path, strict_gpu)
            raise BackendError(f"{path}: no TensorRT engines for {self.target} ({self.gpu.name}); build them "
                               f"with `{rebuild_command(path)}`")
        by_seg = {r.segment: r for r in mine}
        missing = [s.index for s in m.segments if s.index not in by_seg]
        if missing:
            raise BackendError(f"{path}: no TensorRT engine for segment(s) {missing} on {self.target}; "
                               f"rebuild with `{rebuild_command(path, mine[0].flags)}`")
        for r in mine:
            check_engine_record(r, self.trt_version.full, self.gpu.name, self.gpu.compute_capability, path, strict_gpu)
        return [by_seg[s.index] for s in m.segments]

    def _load(self, record: EngineRecord) -> _Segment:
        trt = self.trt
        assert record.file is not None
        plan_path = self.bundle.verify_file(record.file)  # sha256 before deserializing: no tampered plans
        engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise BackendError(f"{plan_path}: TensorRT could not deserialize this engine; rebuild it with "
                               f"`{rebuild_command(self.bundle.path, record.flags)}`")
        # TensorRT >= 10: create_execution_context(strategy); USER_MANAGED leaves the scratch memory to us
        # (set_device_memory below). create_execution_context_without_device_memory is deprecated since 10.0.
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(f"{plan_path}: TensorRT could not create an execution context (see the TensorRT log "
                               f"above; out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        location = getattr(trt, "TensorLocation", None)
        if location is not None:
            on_host = [n for n in names if engine.get_tensor_location(n) == location.HOST]
            if on_host:  # shape tensors live on the host: our buffers are all device memory
                raise BackendError(f"{plan_path}: tensor(s) {on_host} are host (shape) tensors in this engine; "
                                   f"eecompile binds device memory only, so segments must not take shape tensors")
        outputs = [n for n in names if n not in inputs]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        max_shapes: dict[str, tuple[int, ...]] = {}
        for n in inputs:
            shape = tuple(engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                shape = tuple(engine.get_tensor_profile_shape(n, 0)[2])
            max_shapes[n] = shape
            if not context.set_input_shape(n, shape):
                raise BackendError(f"{plan_path}: input '{n}' refuses its own max shape {shape}; rebuild the engine")
        for n in outputs:
            shape = tuple(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BackendError(f"{plan_path}: output '{n}' has a data-dependent shape {shape}; "
                                   f"eecompile segments must have outputs sized by their inputs")
            max_shapes[n] = shape
        return _Segment(record.segment, engine, context, inputs, outputs, dtypes, max_shapes, record)

    def _share_scratch(self) -> None:
        """One scratch buffer for every context: the segments run one after another on one stream."""
        sizes = [scratch_size(s.engine) for s in self.segments]
        self._scratch = DeviceBuffer(self.cudart, max(sizes, default=1))
        for s in self.segments:
            if hasattr(s.context, "set_device_memory"):  # TensorRT >= 10.1: set_device_memory(memory, size)
                s.context.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
            else:  # pragma: no cover - TensorRT 10.0: write-only property, no size
                s.context.device_memory = self._scratch.ptr

    def _allocate(self) -> None:
        """Two slots per tensor name at its max size (the largest over the segments that see it)."""
        need: dict[str, int] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for s in self.segments:
            for n, shape in s.max_shapes.items():
                nbytes = int(np.prod(shape, dtype=np.int64)) * s.dtypes[n].itemsize
                need[n] = max(need.get(n, 0), nbytes)
                self.dtypes[n] = s.dtypes[n]
        self._slots: dict[str, list[DeviceBuffer]] = {n: [DeviceBuffer(self.cudart, b), DeviceBuffer(self.cudart, b)]
                                                      for n, b in need.items()}
        # Threshold scalars: a pinned host float per segment, copied in when it changes.
        self._thr_host = PinnedBuffer(self.cudart, 4 * max(len(self.segments), 1))
        self._thr_value: dict[int, float | None] = {}
        self._mask_host = PinnedBuffer(self.cudart, self.max_batch)
        self.threshold_inputs = {s.index: s.exit.gate.threshold_input for s in self.manifest.segments if s.exit.gate}
        # Pinned host results, one per final output at its largest per-sample size: exited rows are copied there
        # asynchronously (one copy per run of consecutive rows), read once per call after the last sync.
        self._results: dict[str, PinnedBuffer] = {}
        for t in self.manifest.outputs:
            shape = self._exit_max_shape(t.name)
            nbytes = self.max_batch * int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(t.dtype).itemsize
            self._results[t.name] = PinnedBuffer(self.cudart, nbytes)

    def _exit_max_shape(self, final_name: str) -> tuple[int, ...]:
        for s in self.manifest.segments:
            tensor = s.exit.outputs.get(final_name)
            seg = self.segments[s.index]
            if tensor in seg.max_shapes:
                return seg.max_shapes[tensor]
        raise BackendError(f"final output '{final_name}' is produced by no segment engine; recompile the bundle")

    # --- SegmentBackend ------------------------------------------------------------------------------
    def enqueue_segment(self, index: int, feeds: Mapping[str, DeviceTensor], threshold: float | None,
                        out_slot: int = 0) -> dict[str, DeviceTensor]:
        """Bind ``feeds`` and this segment's output slots, and enqueue it on the stream; no synchronisation."""
        self.check_open()
        seg = self.segments[index]
        ctx = seg.context
        thr_name = self.threshold_inputs.get(index)
        for n in seg.inputs:
            if n == thr_name:
                self._set_threshold(index, 0.0 if threshold is None else float(threshold))
                ctx.set_tensor_address(n, self._slots[n][0].ptr)
                continue
            if n not in feeds:
                raise BackendError(f"segment {index}: input '{n}' was not given")
            t = feeds[n]
            if t.dtype != seg.dtypes[n]:
                raise DataError(f"segment {index}: input '{n}' is {t.dtype}, the engine takes {seg.dtypes[n]}")
            if not ctx.set_input_shape(n, t.shape):
                raise DataError(f"segment {index}: input '{n}' shape {t.shape} is outside the engine's profile "
                                f"(max {seg.max_shapes[n]}); rebuild with a larger --max-batch")
            ctx.set_tensor_address(n, t.ptr)
        outs: dict[str, DeviceTensor] = {}
        for n in seg.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            # Never write the slot a feed of the same name is read from (a pass-through output).
            slot = 1 - out_slot if n in feeds and feeds[n].slot == out_slot else out_slot
            buf = self._slots[n][slot]
            ctx.set_tensor_address(n, buf.ptr)
            outs[n] = DeviceTensor(buf, shape, seg.dtypes[n], n, slot)
        if not ctx.execute_async_v3(self._stream_ptr):
            raise BackendError(f"segment {index}: TensorRT execution failed (see the TensorRT log)")
        return outs

    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        dev = {k: v if isinstance(v, DeviceTensor) else self.from_host(np.asarray(v)) for k, v in feeds.items()}
        return self.enqueue_segment(index, dev, threshold)

    def _set_threshold(self, index: int, value: float) -> None:
        if self._thr_value.get(index) == value:
            return  # already on the device; no copy
        name = self.threshold_inputs[index]
        host = self._thr_host.view(np.float32, (len(self.segments),))
        host[index] = value
        src = self._thr_host.ptr + 4 * index
        _cuda(self.cudart.cudaMemcpyAsync(self._slots[name][0].ptr, src, 4,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
              "cudaMemcpyAsync(threshold)")
        self._thr_value[index] = value

    def upload(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The model inputs of one call, copied into their preallocated slots (no allocation)."""
        return {name: self.upload_input(name, a) for name, a in feeds.items()}

    def upload_input(self, name: str, x: np.ndarray, slot: int = 0) -> DeviceTensor:
        """Copy a host array into ``name``'s preallocated slot (model inputs; no allocation)."""
        self.check_open()
        if name not in self._slots:
            raise DataError(f"'{name}' is not an input of any segment; inputs: {sorted(self._slots)}")
        x = np.ascontiguousarray(x, dtype=self.dtypes[name])
        buf = self._slots[name][slot]
        if x.nbytes > buf.nbytes:
            raise DataError(f"input '{name}' {x.shape} is larger than the engines allow "
                            f"(max batch {self.max_batch})")
        _cuda(self.cudart.cudaMemcpyAsync(buf.ptr, x.ctypes.data, x.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
              f"cudaMemcpyAsync({name})")
        # No sync: from pageable memory, cudaMemcpyAsync returns once the source has been staged (CUDA runtime
        # "API synchronization behavior"), so ``x`` may be freed or reused as soon as we return.
        return DeviceTensor(buf, tuple(x.shape), x.dtype, name, slot)

    def from_host(self, x: np.ndarray) -> DeviceTensor:
        """A new device tensor holding ``x`` (allocates: for verify and feeds given as host arrays, not the hot loop)."""
        self.check_open()
        x = np.ascontiguousarray(x)
        buf = DeviceBuffer(self.cudart, x.nbytes)
        _cuda(self.cudart.cudaMemcpyAsync(buf.ptr, x.ctypes.data, x.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
              "cudaMemcpyAsync(from_host)")
        return DeviceTensor(buf, tuple(x.shape), x.dtype)

    def to_host(self, x: DeviceTensor) -> np.ndarray:
        out = np.empty(x.shape, x.dtype)
        if x.nbytes:
            _cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, x.ptr, x.nbytes,
                                              self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                  "cudaMemcpyAsync(to_host)")
            self.synchronize()
        return out

    def gather(self, x: DeviceTensor, rows: np.ndarray, axis: int) -> DeviceTensor:
        """Rows ``rows`` of ``x`` along ``axis`` into the other slot of its name (async, on the stream)."""
        rows = np.asarray(rows, np.int64)
        shape = list(x.shape)
        new_shape = tuple(shape[:axis] + [int(rows.size)] + shape[axis + 1:])
        if x.slot >= 0:
            dst_buf = self._slots[x.name][1 - x.slot]
            slot = 1 - x.slot
        else:
            dst_buf, slot = DeviceBuffer(self.cudart, max(x.nbytes, 1)), -1
        self.copy_rows(dst_buf.ptr, int(rows.size), x.ptr, shape[axis], paired_runs(rows, np.arange(rows.size)),
                       shape, axis, x.dtype.itemsize, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        return DeviceTensor(dst_buf, new_shape, x.dtype, x.name, slot)

    def copy_rows(self, dst: int, dst_batch: int, src: int, src_batch: int, runs: list[tuple[int, int, int]],
                  shape: Sequence[int], axis: int, itemsize: int, kind: Any) -> None:
        """Copy row runs between two tensors stacked along ``axis`` (one async copy per run)."""
        copy_row_runs(self.cudart, self.stream, dst, dst_batch, src, src_batch, runs, shape, axis, itemsize, kind)

    def result_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A view of ``name``'s pinned result buffer (reused by the next call) when the rows fit, else host memory."""
        pinned = self._results.get(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if pinned is None or nbytes > pinned.nbytes:
            return np.empty(shape, dtype)
        return pinned.view(dtype, shape)

    def scatter_rows(self, x: Any, rows: np.ndarray, axis: int, out: np.ndarray, dest: np.ndarray) -> None:
        """Exited rows of a device tensor into a pinned result (``out[dest] = x[rows]``): one async device-to-host
        copy per run of consecutive rows, complete after :meth:`synchronize`."""
        pinned = {p.ptr for p in self._results.values()}
        if not isinstance(x, DeviceTensor) or axis != 0 or out.ctypes.data not in pinned:
            super().scatter_rows(x, rows, axis, out, dest)
            return
        if tuple(x.shape[1:]) != out.shape[1:] or x.dtype != out.dtype:
            raise BackendError(f"exit output '{x.name}' is {x.dtype} with per-sample shape {tuple(x.shape[1:])}, "
                               f"another exit gave {out.dtype} {out.shape[1:]}: exits must agree; recompile the bundle")
        self.copy_rows(out.ctypes.data, out.shape[0], x.ptr, x.shape[0], paired_runs(rows, dest), x.shape, 0,
                       x.dtype.itemsize, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)

    def read_mask(self, x: DeviceTensor) -> np.ndarray:
        """Copy a bool [B] gate mask to pinned memory and wait: the one synchronisation per gated segment."""
        n = int(np.prod(x.shape, dtype=np.int64))
        _cuda(self.cudart.cudaMemcpyAsync(self._mask_host.ptr, x.ptr, n,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
              "cudaMemcpyAsync(gate)")
        self.synchronize()
        return self._mask_host.view(np.bool_, (n,)).copy()

    def synchronize(self) -> None:
        _cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.synchronize()
        except BackendError:
            pass
        for s in self.segments:
            s.context = None
            s.engine = None
        for pair in self._slots.values():
            for b in pair:
                b.free()
        self._scratch.free()
        for p in self._results.values():
            p.free()
        self._thr_host.free()
        self._mask_host.free()
        self.cudart.cudaStreamDestroy(self.stream)


# ------------------------------------------------------------------------------------------- chain

class TensorRTChain(EarlyExitRunner):
    """The runner on a :class:`TensorRTBackend`: the one segment loop (:class:`EarlyExitRunner`) with device buffers.

    Inputs are uploaded into preallocated slots, segment outputs are bound in place as the next segment's inputs,
    only the gate mask is read back (one synchronisation per gated segment), exited rows are copied asynchronously
    into pinned host results and the rows still running are gathered on the device. Batches larger than the
    engines' max batch run in chunks. ``last_batch_sizes``: the rows each segment ran in the last call, per chunk.
    """

    def __init__(self, bundle: Bundle | str | Path | TensorRTBackend, **options: Any) -> None:
        if isinstance(bundle, TensorRTBackend):
            backend = bundle
        else:
            backend = TensorRTBackend(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), **options)
        super().__init__(backend.bundle, backend=backend)
        self.last_batch_sizes: list[list[int]] = []

    def run(self, *args: Any, **kwargs: Any) -> RunResult:
        """:meth:`EarlyExitRunner.run`; also records :attr:`last_batch_sizes` (not thread-safe)."""
        result = super().run(*args, **kwargs)
        self.last_batch_sizes = result.batch_sizes
        return result
