"""CPU stand-ins for ``tensorrt`` and ``cuda.bindings.runtime``, to test our orchestration without a GPU.

They are stubs, not emulators of TensorRT: "device memory" is host memory (ctypes buffers), a "plan" is the
segment's ONNX bytes with the optimisation profile in front, and an "engine" runs that ONNX with ONNX Runtime
on CPU, reading and writing through the raw pointers our runtime binds with ``set_tensor_address``. That lets
the tests check what is ours: records and version checks, sha256 before deserializing, profiles handed to the
builder, timing-cache plumbing, pointer arithmetic of gathers/scatters, the chain loop and its policies.
Whether the real TensorRT and CUDA calls behave as documented is only checked by the ``gpu`` tests.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

_ONNX_TO_NP = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_}


# ------------------------------------------------------------------------------------------- cudart

class _Err(int):
    @property
    def name(self) -> str:
        return "cudaSuccess" if self == 0 else f"cudaError{int(self)}"


OK = _Err(0)


class FakeStream:
    """Like cuda-python's ``cudaStream_t``: an opaque handle whose address ``int()`` gives (TensorRT wants the int)."""

    def __init__(self, address: int) -> None:
        self._address = address

    def __int__(self) -> int:
        return self._address


class FakeCudart:
    class cudaMemcpyKind:  # noqa: N801 - mirrors cuda-python
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    def __init__(self, name: bytes = b"NVIDIA H200", major: int = 9, minor: int = 0) -> None:
        self._mem: dict[int, Any] = {}
        self.props = types.SimpleNamespace(name=name + b"\x00" * 8, major=major, minor=minor, totalGlobalMem=1 << 30)
        self.calls: list[str] = []
        self.syncs = 0

    def _alloc(self, n: int) -> tuple[_Err, int]:
        buf = ctypes.create_string_buffer(int(n))
        addr = ctypes.addressof(buf)
        self._mem[addr] = buf
        return OK, addr

    def cudaMalloc(self, n: int) -> tuple[_Err, int]:  # noqa: N802
        return self._alloc(n)

    def cudaMallocHost(self, n: int) -> tuple[_Err, int]:  # noqa: N802
        return self._alloc(n)

    def cudaFree(self, p: int) -> tuple[_Err]:  # noqa: N802
        self._mem.pop(p, None)
        return (OK,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: Any) -> tuple[_Err]:  # noqa: N802
        self.calls.append("memcpy")
        ctypes.memmove(dst, src, n)
        return (OK,)

    def cudaMemcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,  # noqa: N802
                          kind: int, stream: Any) -> tuple[_Err]:
        self.calls.append("memcpy2d")
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (OK,)

    def cudaSetDevice(self, d: int) -> tuple[_Err]:  # noqa: N802
        return (OK,)

    def cudaGetDeviceProperties(self, d: int) -> tuple[_Err, Any]:  # noqa: N802
        return OK, self.props

    def cudaStreamCreate(self) -> tuple[_Err, FakeStream]:  # noqa: N802
        return OK, FakeStream(0x5000)

    def cudaStreamSynchronize(self, s: Any) -> tuple[_Err]:  # noqa: N802
        self.syncs += 1
        return (OK,)

    def cudaStreamDestroy(self, s: Any) -> tuple[_Err]:  # noqa: N802
        return (OK,)

    def cudaEventCreate(self) -> tuple[_Err, int]:  # noqa: N802
        return OK, 1

    def cudaEventRecord(self, e: Any, s: Any) -> tuple[_Err]:  # noqa: N802
        return (OK,)

    def cudaEventElapsedTime(self, a: Any, b: Any) -> tuple[_Err, float]:  # noqa: N802
        return OK, 0.0

    def cudaEventDestroy(self, e: Any) -> tuple[_Err]:  # noqa: N802
        return (OK,)


# ----------------------------------------------------------------------------------------- tensorrt

def _pack(profile: dict[str, Any], onnx_bytes: bytes) -> bytes:
    return b"FAKEPLAN" + json.dumps(profile).encode() + b"\n" + onnx_bytes


class FakeEngine:
    def __init__(self, plan: bytes) -> None:
        assert plan.startswith(b"FAKEPLAN")
        head, body = plan[8:].split(b"\n", 1)
        self.profile = json.loads(head)
        model = onnx.load_from_string(body)
        self.sess = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
        self.inputs = [(i.name, i.type.tensor_type) for i in model.graph.input]
        self.outputs = [(o.name, o.type.tensor_type) for o in model.graph.output]
        self.device_memory_size_v2 = 256  # TensorRT >= 10.1 (device_memory_size is gone in 11)

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i: int) -> str:
        return [*self.inputs, *self.outputs][i][0]

    def get_tensor_mode(self, n: str) -> str:
        return "INPUT" if n in dict(self.inputs) else "OUTPUT"

    def get_tensor_dtype(self, n: str) -> Any:
        return _ONNX_TO_NP[dict([*self.inputs, *self.outputs])[n].elem_type]

    def get_tensor_shape(self, n: str) -> tuple[int, ...]:
        tt = dict([*self.inputs, *self.outputs])[n]
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)

    def get_tensor_location(self, n: str) -> str:
        return "DEVICE"

    def get_tensor_profile_shape(self, n: str, p: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.profile[n]]

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        assert strategy == USER_MANAGED, "the runtime shares one scratch buffer: contexts must be USER_MANAGED"
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addr: dict[str, int] = {}
        self.device_memory: int | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:  # TensorRT >= 10.1: (memory, size)
        assert isinstance(ptr, int) and size >= self.engine.device_memory_size_v2
        self.device_memory = ptr

    def set_input_shape(self, n: str, shape: Any) -> bool:
        shape = tuple(int(s) for s in shape)
        if n in self.engine.profile:
            lo, _, hi = self.engine.profile[n]
            if any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                return False
        self.shapes[n] = shape
        return True

    def _feeds(self, zeros: bool) -> dict[str, np.ndarray]:
        feeds = {}
        for n, _ in self.engine.inputs:
            dt = np.dtype(self.engine.get_tensor_dtype(n))
            shape = self.shapes.get(n, self.engine.get_tensor_shape(n))
            if zeros:
                feeds[n] = np.zeros(shape, dt)
            else:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.addr[n])
                feeds[n] = np.frombuffer(raw, np.uint8)[:nbytes].view(dt).reshape(shape).copy()
        return feeds

    def get_tensor_shape(self, n: str) -> tuple[int, ...]:
        if n in dict(self.engine.inputs):
            return self.shapes.get(n, self.engine.get_tensor_shape(n))
        outs = self.engine.sess.run([n], self._feeds(zeros=True))
        return tuple(outs[0].shape)

    def set_tensor_address(self, n: str, ptr: int) -> bool:
        self.addr[n] = int(ptr)
        return True

    def execute_async_v3(self, stream: Any) -> bool:
        # The binding's parameter is ``stream_handle: int`` (pybind size_t): pass the stream's address.
        assert isinstance(stream, int), f"execute_async_v3 takes the stream as an int, got {type(stream).__name__}"
        assert self.device_memory is not None, "USER_MANAGED context without set_device_memory"
        names = [n for n, _ in self.engine.outputs]
        for n, arr in zip(names, self.engine.sess.run(names, self._feeds(zeros=False)), strict=True):
            arr = np.ascontiguousarray(arr)
            ctypes.memmove(self.addr[n], arr.ctypes.data, arr.nbytes)
        return True


class FakeBuilder:
    def __init__(self, logger: Any) -> None:
        self.built: list[dict[str, Any]] = []

    def create_network(self, flags: int) -> FakeNetwork:
        return FakeNetwork()

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, net: FakeNetwork, cfg: FakeConfig) -> bytes:
        FAKE_STATE["configs"].append(cfg)
        return _pack(cfg.profiles[0].shapes, net.onnx_bytes)


class FakeNetwork:
    onnx_bytes = b""
    num_layers = 0

    def __init__(self) -> None:
        self._inputs: list[Any] = []

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, i: int) -> Any:
        return self._inputs[i]


class FakeParser:
    num_errors = 0

    def __init__(self, net: FakeNetwork, logger: Any) -> None:
        self.net = net

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        self.net.onnx_bytes = model.SerializeToString()
        for i in model.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
            self.net._inputs.append(types.SimpleNamespace(name=i.name, shape=dims))
        FAKE_STATE["parsed"].append(model)
        return True


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob + b"+"


class FakeConfig:
    def __init__(self) -> None:
        self.flags: list[Any] = []
        self.profiles: list[FakeProfile] = []
        self.cache: FakeCache | None = None
        self.pool: dict[Any, int] = {}

    def set_memory_pool_limit(self, pool: Any, n: int) -> None:
        self.pool[pool] = n

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, p: FakeProfile) -> int:
        self.profiles.append(p)
        return 0

    def create_timing_cache(self, blob: bytes) -> FakeCache:
        if bytes(blob).startswith(b"BAD"):
            raise RuntimeError("Failed to deserialize the timing cache")  # as pybind surfaces TensorRT's error
        return FakeCache(bytes(blob))

    def set_timing_cache(self, cache: FakeCache, ignore_mismatch: bool) -> bool:
        if cache.blob.startswith(b"OTHERGPU") and not ignore_mismatch:
            return False  # a cache made on another device is refused (returns False, keeps none)
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeCache | None:
        return self.cache


FAKE_STATE: dict[str, list[Any]] = {"configs": [], "parsed": []}
USER_MANAGED = 2


def make_fake_tensorrt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})  # type: ignore[attr-defined]
    def deserialize_cuda_engine(plan: bytes) -> FakeEngine:
        FAKE_STATE.setdefault("deserialized", []).append(1)
        return FakeEngine(plan)

    trt.Runtime = lambda logger: types.SimpleNamespace(  # type: ignore[attr-defined]
        deserialize_cuda_engine=deserialize_cuda_engine)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1,  # type: ignore[attr-defined]
                                                                   USER_MANAGED=USER_MANAGED)
    trt.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")  # type: ignore[attr-defined]
    trt.nptype = lambda dt: dt  # type: ignore[attr-defined]
    trt.float32, trt.float16 = np.float32, np.float16  # type: ignore[attr-defined]
    trt.Builder = FakeBuilder  # type: ignore[attr-defined]
    trt.OnnxParser = FakeParser  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.LayerType = types.SimpleNamespace(SOFTMAX="SOFTMAX", REDUCE="REDUCE")  # type: ignore[attr-defined]
    flags = types.SimpleNamespace(TF32="TF32")
    if version.startswith("10."):  # the weak-typing flags, all removed in TensorRT 11
        flags.FP16 = "FP16"
        flags.OBEY_PRECISION_CONSTRAINTS = "OBEY_PRECISION_CONSTRAINTS"
        flags.PREFER_PRECISION_CONSTRAINTS = "PREFER_PRECISION_CONSTRAINTS"
    trt.BuilderFlag = flags  # type: ignore[attr-defined]
    return trt


@contextmanager
def fake_gpu(monkeypatch: pytest.MonkeyPatch, trt_version: str = "10.13.0.35", gpu: bytes = b"NVIDIA H200",
             cc: tuple[int, int] = (9, 0)) -> Iterator[FakeCudart]:
    """Install the stand-ins as ``tensorrt`` and ``cuda.bindings.runtime`` for the duration."""
    FAKE_STATE["configs"].clear()
    FAKE_STATE["parsed"].clear()
    FAKE_STATE.pop("deserialized", None)
    cudart = FakeCudart(gpu, *cc)
    cuda_pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    runtime = types.ModuleType("cuda.bindings.runtime")
    for name in dir(cudart):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(cudart, name))
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(trt_version))
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    yield cudart
