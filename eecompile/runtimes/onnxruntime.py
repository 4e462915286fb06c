"""ONNX Runtime backend: one ``InferenceSession`` per segment, created once.

CPU (default): tensors are numpy arrays; ``sess.run`` is called directly (see ``_run_cpu`` for why not
IO binding). When the bundle holds ORT CPU engines built for this machine (``eecompile build --backend
onnxruntime``: ORT's own optimised graphs whose cuts carry NCHWc-blocked tensors, see
``eecompile/build/ort_layout.py``), those run instead of the portable segments; engines for another ORT
version or CPU are skipped with a warning and the portable segments run. ``device="cuda"``: CUDAExecutionProvider (optionally TensorRT EP in front of it), activations
stay on the GPU as ``OrtValue``s through IO binding, only the gate mask is bound to the host.

Imports numpy and onnxruntime only (no onnx, no torch): this runs on a Jetson.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, SegmentInfo, sha256_file
from eecompile.errors import BackendError, BundleError, DataError
from eecompile.runtimes.base import SegmentBackend
from eecompile.runtimes.records import rebuild_command
from eecompile.runtimes.sessions import default_threads, session_options, user_cache_dir

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a core dependency, but a Jetson may lack it
    ort = None

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
# Thread pools, measured on a 2-core CPU (3-segment MLP chain, all segments run, best of 5 blocks of 50):
#   width 1024, batch 32: per-session (no spinning) 3.26 ms, shared 3.01 ms, per-session spinning 24 ms
#   width 1024, batch 1:  0.81 ms vs 0.56 ms;   width 256, batch 32: 0.36 vs 0.28;   batch 1: 0.13 vs 0.09
# "shared" is 8-30% faster, but it is process-wide and only works when it is the process's first ORT use
# (otherwise ORT silently runs single-threaded), and its pool spins. So "per-session" stays the default
# (robust anywhere); "shared" is there for a dedicated inference process.
THREAD_POOLS = ("per-session", "shared")
# ORT graph rewrites turned off on CPU by default. SkipLayerNormFusion (Add + LayerNormalization ->
# SkipLayerNormalization) only fires when shapes are known, which the compiler's shape inference makes true for
# every segment, while a model as exported from torch usually lacks that value_info, so the unsplit model keeps
# the unfused pair. ORT 1.32's CPU kernel for the fused op is the slower one: measured on BERT-base (2-core EPYC,
# batch 1 and 8, paired blocks) the same graph ran 1.06-1.09x slower fused, which was the whole no-exit
# overhead of a 4-exit BERT chain. Pass disabled_optimizers=() to keep every ORT rewrite.
DEFAULT_CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# Graph optimisation level an ORT CPU engine (ORT's own optimised graph, edited) is loaded with: none. The graph
# already holds every rewrite ORT_ENABLE_ALL made on this machine; running the optimisers again would redo the
# NCHWc layout pass on a blocked graph and only cost session-creation time.
ENGINE_LOAD_LEVEL = "ORT_DISABLE_ALL"
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16",
}
_shared_pool_threads: int | None = None  # process-wide: ORT's global pools can be sized once
_per_session_used = False

# A one-node graph: ReorderInput (domain com.microsoft.nchwc) of a [1, 64, 1, 2] tensor, serialized with onnx
# once (the runtime does not import onnx). Its output shows ORT's NCHWc block size on this CPU.
_NCHWC_PROBE = (
    b'\x08\x08\x12\x00:v\n?\n\x01x\x12\x01y"\x0cReorderInput*\x14\n\rchannels_last\x18\x00\xa0\x01\x02:\x13'
    b'com.microsoft.nchwc\x12\x0bnchwc_probeZ\x1b\n\x01x\x12\x16\n\x14\x08\x01\x12\x10\n\x02\x08\x01\n\x02'
    b'\x08@\n\x02\x08\x01\n\x02\x08\x02b\t\n\x01y\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11B\x17\n\x13'
    b'com.microsoft.nchwc\x10\x01'
)
_block_size: int | None = None
# Gathers of at least this many bytes (batch axis 0) reuse host buffers (``_RowBuffers``); smaller ones take a fresh
# array, which malloc serves from its heap as cheaply.
POOL_MIN_BYTES = 1 << 20


def _use_shared_pool(threads: int) -> None:
    """Size ORT's process-wide intra-op pool. This only takes effect before the first session of the process
    exists (ORT creates its environment then); later, ORT silently runs such sessions on the caller's thread
    alone. We refuse when *we* made a per-session session earlier; sessions made elsewhere we cannot see."""
    global _shared_pool_threads
    if _shared_pool_threads is None:
        if _per_session_used:
            raise BackendError(
                "onnxruntime: thread_pool='shared' must be the first ONNX Runtime use in this process, but a "
                "per-session runner was created before; use thread_pool='per-session' or create this one first"
            )
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads
    elif _shared_pool_threads != threads:
        log.warning("onnxruntime shared thread pool already has %d threads; ignoring threads=%d",
                    _shared_pool_threads, threads)


def nchwc_block_size() -> int:
    """ORT's NCHWc block size on this CPU (MLAS: 16 with AVX-512, 8 with AVX2), or 1 where NCHWc is not used.

    Measured, not guessed from CPU flags: a ReorderInput of channels 0..63 at two pixels writes channel 0 of the
    second pixel right after the first block of channels."""
    global _block_size
    if _block_size is None:
        try:
            # In a process whose sessions use ORT's global pools (thread_pool="shared"), every session must.
            so = session_options(1, optimization="disable", log_severity=4,
                                 shared_pool=_shared_pool_threads is not None)
            sess = ort.InferenceSession(_NCHWC_PROBE, so, providers=["CPUExecutionProvider"])
            x = np.zeros((1, 64, 1, 2), np.float32)
            x[0, :, 0, 1] = 1.0
            flat = np.asarray(sess.run(None, {"x": x})[0]).reshape(-1)
            nz = np.flatnonzero(flat)
            _block_size = int(nz[0]) if nz.size and nz[0] > 0 else 1
        except Exception:  # noqa: BLE001 - a build without the NCHWc kernels: no blocked layout
            _block_size = 1
    return _block_size


def cpu_target() -> str:
    """The target ORT CPU engines are tied to: ORT major.minor and the NCHWc block size, e.g. ``ort1.32-nchwc16``."""
    parts = str(ort.__version__).split(".")
    block = nchwc_block_size()
    return f"ort{parts[0]}.{parts[1] if len(parts) > 1 else 0}-" + (f"nchwc{block}" if block > 1 else "nonchwc")


def to_blocked(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW -> ORT's NCHWc: ``[N, C, H, W]`` to ``[N, C_pad, H, W]`` holding ``[N, C_pad/b, H, W, b]`` (zero-padded)."""
    n, c, h, w = x.shape
    cp = -(-c // block) * block
    if cp != c:
        x = np.concatenate([x, np.zeros((n, cp - c, h, w), x.dtype)], axis=1)
    return np.ascontiguousarray(x.reshape(n, cp // block, block, h, w).transpose(0, 1, 3, 4, 2)).reshape(n, cp, h, w)


def from_blocked(x: np.ndarray, block: int, channels: int) -> np.ndarray:
    """ORT's NCHWc ``[N, C_pad, H, W]`` back to NCHW ``[N, channels, H, W]``."""
    n, cp, h, w = x.shape
    plain = np.ascontiguousarray(x).reshape(n, cp // block, h, w, block).transpose(0, 1, 4, 2, 3)
    return np.ascontiguousarray(plain.reshape(n, cp, h, w)[:, :channels])


class Blocked:
    """A carried tensor in ORT's NCHWc layout, as an engine hands it to the next one.

    The chain treats it like any device array: :meth:`OnnxRuntimeBackend.gather` takes rows of it (batch axis 0),
    :meth:`OnnxRuntimeBackend.to_host` returns it in plain NCHW."""

    __slots__ = ("array", "block", "channels")

    def __init__(self, array: np.ndarray, block: int, channels: int) -> None:
        self.array = array
        self.block = block
        self.channels = channels

    @property
    def shape(self) -> tuple[int, ...]:
        """The plain (NCHW) shape this tensor stands for."""
        n, _, h, w = self.array.shape
        return (n, self.channels, h, w)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype


class _RowBuffers:
    """Host buffers for the rows a CPU gather keeps (batch axis 0), reused once nothing references them.

    Why: a fresh array of tens of MB is a fresh ``mmap`` every call (above malloc's mmap threshold), so every
    gather page-faults its whole output in again. Measured on the compaction figure's carried tensor (16 of 32 rows
    of [32, 256, 56, 56] float32, 51 MB): ``np.take`` into a fresh array 4.1 ms, into a reused buffer 2.0 ms; and
    on the shared 2-core VM the faults of a fresh one took 25-117 ms in about half the calls of a compact run when
    another process was busy (ORT's own outputs come from its arena and were not hit). Rows that are already
    contiguous (``rows`` is a range) are returned as a view, with no copy.

    A buffer is free when only this pool holds it: every view of it (the prefix handed out, anything derived from it,
    an ORT feed wrapping it) references it as its base, so ``sys.getrefcount`` counts them. The pool holds at most
    ``per_shape`` buffers per (row shape, dtype), each sized for the most rows kept so far, until ``clear``
    (like ORT's arena, it keeps its peak); beyond that a gather takes a fresh array. Thread-safe."""

    __slots__ = ("_bufs", "_lock", "per_shape")

    def __init__(self, per_shape: int = 4) -> None:
        self._bufs: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.per_shape = per_shape

    def take(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n = int(rows.size)
        first = int(rows[0])
        if int(rows[-1]) - first + 1 == n and (n < 2 or bool((np.diff(rows) == 1).all())):
            return x[first:first + n]
        key = (x.shape[1:], x.dtype.str)
        with self._lock:  # the view made here marks the buffer taken before another thread can look at it
            bufs = self._bufs.setdefault(key, [])
            out = None
            for i in range(len(bufs)):
                if sys.getrefcount(bufs[i]) == _FREE_REFS:
                    if bufs[i].shape[0] < n:
                        bufs[i] = np.empty((n, *key[0]), x.dtype)
                    out = bufs[i][:n]
                    break
            if out is None and len(bufs) < self.per_shape:
                bufs.append(np.empty((n, *key[0]), x.dtype))
                out = bufs[-1][:n]
        if out is None:
            return np.take(x, rows, axis=0)
        return np.take(x, rows, axis=0, out=out, mode="clip")  # mode="raise" would copy through a temporary

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


def _free_refs() -> int:
    """``sys.getrefcount`` of a pooled buffer nobody else holds, as ``_RowBuffers.take`` reads it (list + argument)."""
    bufs = [np.empty(1)]
    return sys.getrefcount(bufs[0])


_FREE_REFS = _free_refs()


class OnnxRuntimeBackend(SegmentBackend):
    """Runs a bundle's segments on ONNX Runtime.

    Options:
      ``threads``: intra-op threads (default: the cores this process may use);
      ``thread_pool``: ``"per-session"`` (default) or ``"shared"`` (one process-wide pool for all sessions);
      ``device``: ``"cpu"`` (default) or ``"cuda"``; ``device_id``: GPU ordinal;
      ``tensorrt``: put ORT's TensorRT EP in front of CUDA (``device="cuda"`` only), with
      ``trt_cache_dir`` (default :func:`default_trt_cache_dir`: the user's cache, never inside the bundle) and
      ``fp16``;
      ``disabled_optimizers``: ORT graph rewrites to skip (default on CPU: ``DEFAULT_CPU_DISABLED_OPTIMIZERS``);
      ``engines``: run the bundle's ORT CPU engines when they were built for this machine (default True; CPU only,
      and only with the disabled optimizers they were built with); ``engines=False`` runs the portable segments;
      ``expose``: ``{segment index: [tensor names]}``, intermediate tensors each segment returns as extra outputs
      (see :meth:`expose`);
      ``prepack``: MLAS weight prepacking (default True); ``prepack=False`` holds each weight once, as stored, for
      memory-bound deployments (a shared-weight model's runner: 0.94x the unsplit model's memory instead of 3.06x)
      at a CPU cost (1.2-1.9x on that model; :func:`~eecompile.runtimes.sessions.session_options`).

    Raises :class:`BackendError` for a bad option or a missing onnxruntime, :class:`BundleError` for a segment or
    engine file ONNX Runtime cannot load or whose inputs disagree with the manifest.
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, threads: int | None = None, thread_pool: str = "per-session",
                 device: str = "cpu", device_id: int = 0, tensorrt: bool = False,
                 trt_cache_dir: str | Path | None = None, fp16: bool = False,
                 disabled_optimizers: tuple[str, ...] | list[str] | None = None, engines: bool = True,
                 expose: Mapping[int, Sequence[str]] | None = None, prepack: bool = True, **options: Any) -> None:
        super().__init__(bundle, **options)
        if ort is None:
            raise BackendError("onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu)")
        if options:
            raise BackendError(f"onnxruntime backend: unknown option(s) {', '.join(sorted(options))}; known: "
                               "threads, thread_pool, device, device_id, tensorrt, trt_cache_dir, fp16, "
                               "disabled_optimizers, engines, expose, prepack")
        if device not in DEVICES:
            raise BackendError(f"onnxruntime backend: device '{device}' is not one of {', '.join(DEVICES)}")
        if thread_pool not in THREAD_POOLS:
            raise BackendError(f"onnxruntime backend: thread_pool '{thread_pool}' is not one of "
                               f"{', '.join(THREAD_POOLS)}")
        if threads is not None and threads < 1:
            raise BackendError(f"onnxruntime backend: threads must be >= 1, got {threads}")
        if tensorrt and device != "cuda":
            raise BackendError("onnxruntime backend: tensorrt=True needs device='cuda'")
        self.device = device
        self.device_id = device_id
        self.threads = threads or default_threads()
        if disabled_optimizers is None:
            disabled_optimizers = DEFAULT_CPU_DISABLED_OPTIMIZERS if device == "cpu" else ()
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.prepack = bool(prepack)
        self.providers = self._providers(tensorrt, trt_cache_dir, fp16)
        if thread_pool == "shared":
            _use_shared_pool(self.threads)
        self._shared = thread_pool == "shared"
        opts = self._session_options(shared=self._shared)
        self._sessions: list[Any] = []
        self._out_names: list[list[str]] = []  # the graph's output names
        self._thr_names: list[str | None] = []
        self._gate_names: list[str | None] = []
        # Engines only: manifest name -> (engine name, block, channels) of blocked inputs; engine output name ->
        # (manifest name, block, channels) of blocked outputs.
        self._blocked_in: list[dict[str, tuple[str, int, int]]] = []
        self._blocked_out: list[dict[str, tuple[str, int, int]]] = []
        self.engine_target: str | None = None  # set when engines run
        self._rows = _RowBuffers()  # host buffers for large CPU gathers, reused across calls
        self._run_fns: list[Any] = []  # per segment: the session's run, without the Python wrapper (see _fast_run)
        self._thr_arrays: dict[float, np.ndarray] = {}  # threshold value -> the read-only float32 scalar fed
        self._no_exit: dict[str, Any] | None = None  # the no-exit engine's record entry (flags.no_exit), if any
        self._no_exit_sess: Any = None  # its session, loaded at first use
        self._no_exit_lock = threading.Lock()
        self._exposed: list[tuple[str, ...]] = [() for _ in self.manifest.segments]  # extra outputs per segment
        self._engine_root: Path | None = None  # engines from the user's cache (None: from the bundle)
        records = self._engine_records() if engines and not expose else None
        if records is None and engines and not expose and self.device == "cpu":
            records = self._cached_engine_records()
        if records is not None:
            eopts = self._session_options(shared=self._shared)
            # The graph is ORT's own optimised graph: running the optimisers again would redo the layout pass on
            # an already blocked graph (and cost session-creation time). Load it as it is.
            eopts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ENGINE_LOAD_LEVEL)
            self.engine_target = str(records[0]["target"])
        for seg in self.manifest.segments:
            rec = records[seg.index] if records is not None else None
            sess = self._load(seg, opts) if rec is None else self._load_engine(seg, rec, eopts)
            self._sessions.append(sess)
            self._run_fns.append(_fast_run(sess))
            self._out_names.append([o.name for o in sess.get_outputs()])
            self._thr_names.append(seg.exit.gate.threshold_input if seg.exit.gate else None)
            self._gate_names.append(seg.exit.gate.output if seg.exit.gate else None)
            flags = (rec or {}).get("flags") or {}
            self._blocked_in.append({name: (str(e["name"]), int(e["block"]), int(e["channels"]))
                                     for name, e in (flags.get("inputs") or {}).items()})
            self._blocked_out.append({str(e["name"]): (name, int(e["block"]), int(e["channels"]))
                                      for name, e in (flags.get("outputs") or {}).items()})
        self._any_blocked = any(self._blocked_out)  # a Blocked tensor can reach a segment only from an engine
        if records is not None:
            no_exit = (records[-1].get("flags") or {}).get("no_exit")
            if isinstance(no_exit, Mapping) and no_exit.get("file"):
                self._no_exit = dict(no_exit)
                self._no_exit_opts = eopts
        if expose:
            self.expose(expose)

    def expose(self, extra: Mapping[int, Sequence[str]]) -> None:
        """Make segment k's session also return the intermediate tensors ``extra[k]`` (names in the segment graph).

        The session of each segment that lacks one of them is made again from the segment file with those tensors
        appended to the graph's outputs (the ONNX protobuf is extended in place; no onnx package needed). Tensors
        exposed before stay exposed. ORT CPU engines are ORT-optimised graphs in which intermediate tensors may be
        fused away, so a runner running them switches to the portable segments first (logged). Raises
        :class:`BackendError` naming the segment and tensors ONNX Runtime cannot find."""
        self.check_open()
        todo = {int(k): [n for n in names if n not in self._out_names[int(k)]] for k, names in extra.items()}
        todo = {k: names for k, names in todo.items() if names}
        if not todo:
            return
        if self.engine_target is not None:
            log.info("%s: extra outputs need the portable segments; not running the ORT CPU engines for %s",
                     self.bundle.path, self.engine_target)
            opts = self._session_options(shared=self._shared)
            for seg in self.manifest.segments:
                self._set_session(seg.index, self._load(seg, opts, self._exposed[seg.index]))
            self._blocked_in = [{} for _ in self.manifest.segments]
            self._blocked_out = [{} for _ in self.manifest.segments]
            self._any_blocked = False
            self._no_exit = self._no_exit_sess = None
            self.engine_target = None
        for k, names in todo.items():
            want = tuple(dict.fromkeys([*self._exposed[k], *names]))
            self._set_session(k, self._load(self.manifest.segments[k], None, want))
            self._exposed[k] = want

    def _set_session(self, index: int, sess: Any) -> None:
        self._sessions[index] = sess
        self._run_fns[index] = _fast_run(sess)
        self._out_names[index] = [o.name for o in sess.get_outputs()]

    # --- construction ---------------------------------------------------------------------------------
    def _providers(self, tensorrt: bool, trt_cache_dir: str | Path | None, fp16: bool) -> list[Any]:
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"onnxruntime: device='cuda' needs the CUDAExecutionProvider, but this onnxruntime "
                f"({ort.__version__}) offers only {', '.join(available)}; install onnxruntime-gpu matching your "
                f"CUDA version, or use device='cpu'"
            )
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if not tensorrt:
            return [cuda, "CPUExecutionProvider"]
        if "TensorrtExecutionProvider" not in available:
            raise BackendError(
                "onnxruntime: tensorrt=True needs the TensorrtExecutionProvider, which this onnxruntime lacks; "
                "install onnxruntime-gpu built with TensorRT, or use tensorrt=False"
            )
        cache = Path(trt_cache_dir) if trt_cache_dir else default_trt_cache_dir(self.bundle)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BackendError(f"onnxruntime: cannot create the TensorRT EP cache directory {cache} ({e}); pass "
                               f"trt_cache_dir= (a writable directory) or set EECOMPILE_CACHE_DIR") from e
        trt = ("TensorrtExecutionProvider", {
            "device_id": self.device_id,
            "trt_engine_cache_enable": True,  # engines are built once per shape profile, then reloaded
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": fp16,
        })
        return [trt, cuda, "CPUExecutionProvider"]

    def _session_options(self, shared: bool, external_data_dir: str | None = None) -> Any:
        global _per_session_used
        if not shared:
            _per_session_used = True
        # Shared: one pool serves every session of the chain (and of the process). It spins between runs (the
        # Python API cannot turn that off for global pools), but with one pool nobody else fights it.
        return session_options(self.threads, shared_pool=shared, disabled_optimizers=self.disabled_optimizers,
                               log_severity=2, external_data_dir=external_data_dir, prepack=self.prepack)

    def _engine_records(self) -> list[dict[str, Any]] | None:
        """This machine's ORT CPU engine records, one per segment, or None (portable segments, with a warning
        when engines exist but were built elsewhere or with other options)."""
        mine_all = [d for d in self.manifest.engines if d.get("backend") == "onnxruntime" and d.get("file")]
        if not mine_all:
            return None
        fix = f"rebuild them here with `{rebuild_command(self.bundle.path, backend='onnxruntime')}`"
        if self.device != "cpu":
            log.info("%s: ORT CPU engines are for the CPU provider; device=%s runs the portable segments",
                     self.bundle.path, self.device)
            return None
        target = cpu_target()
        mine = {int(d["segment"]): d for d in mine_all if d.get("target") == target}
        if not mine:
            if (engine_cache_dir(self.manifest, target) / ENGINE_CACHE_INDEX).is_file():
                return None  # this machine's engines are in the user's cache (_cached_engine_records)
            others = sorted({str(d.get("target")) for d in mine_all})
            log.warning("%s: ONNX Runtime engines were built for %s, this machine is %s (ONNX Runtime %s); running "
                        "the portable segments instead (slower); %s, or keep the bundle as it is and build them "
                        "into your cache with `eecompile build %s --backend onnxruntime --cache`", self.bundle.path,
                        ", ".join(others), target, ort.__version__, fix, self.bundle.path)
            return None
        missing = [s.index for s in self.manifest.segments if s.index not in mine]
        if missing:
            log.warning("%s: ONNX Runtime engines for %s lack segment(s) %s; running the portable segments; %s",
                        self.bundle.path, target, missing, fix)
            return None
        files = self.manifest.files
        stale = [s.index for s in self.manifest.segments
                 if (mine[s.index].get("flags") or {}).get("segment_sha256") not in (None, files.get(s.file))]
        if stale:
            # The segment changed after its engine was built (e.g. train-heads replaced a head).
            log.warning("%s: ONNX Runtime engines for segment(s) %s were built from an older version of the "
                        "segment; running the portable segments; %s", self.bundle.path, stale, fix)
            return None
        built_with = {tuple((d.get("flags") or {}).get("disabled_optimizers") or ()) for d in mine.values()}
        if built_with != {tuple(self.disabled_optimizers)}:
            log.warning("%s: ONNX Runtime engines were built with disabled_optimizers=%s, this runner asks for %s; "
                        "running the portable segments", self.bundle.path, sorted(built_with),
                        list(self.disabled_optimizers))
            return None
        return [mine[s.index] for s in self.manifest.segments]

    def _cached_engine_records(self) -> list[dict[str, Any]] | None:
        """This machine's ORT CPU engine records from the user's cache (:func:`engine_cache_dir`), each engine
        file's sha256 checked against its record first; None (portable segments, with a warning when a cache entry
        exists but does not hold) when there are none."""
        root = engine_cache_dir(self.manifest)
        index = root / ENGINE_CACHE_INDEX
        if not index.is_file():
            return None
        fix = (f"delete {root} and build them again with `eecompile build {self.bundle.path} --backend onnxruntime "
               f"--cache`")
        try:
            doc = json.loads(index.read_text())
            recs = {int(d["segment"]): dict(d) for d in doc["records"]}
            built_from = dict(doc["segments"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cannot read the engine cache (%s); running the portable segments; %s", index, e, fix)
            return None
        files = self.manifest.files
        if built_from != {s.file: files.get(s.file) for s in self.manifest.segments} or sorted(recs) != [
                s.index for s in self.manifest.segments]:
            log.warning("%s: the cached engines were built from other segments; running the portable segments; %s",
                        root, fix)
            return None
        if {tuple((d.get("flags") or {}).get("disabled_optimizers") or ()) for d in recs.values()} != {
                tuple(self.disabled_optimizers)}:
            return None
        for d in recs.values():
            for rel, sha in ((d.get("file"), d.get("sha256")),
                             (((d.get("flags") or {}).get("no_exit") or {}).get("file"),
                              ((d.get("flags") or {}).get("no_exit") or {}).get("sha256"))):
                if rel is None:
                    continue
                p = root / str(rel)
                if (not sha or ".." in Path(str(rel)).parts or p.is_symlink() or not p.is_file()
                        or sha256_file(p) != sha):
                    log.warning("%s: cached engine file missing or changed (sha256 differs from its record); running "
                                "the portable segments; %s", p, fix)
                    return None
        self._engine_root = root
        log.info("%s: running the ONNX Runtime engines cached in %s", self.bundle.path, root)
        return [recs[s.index] for s in self.manifest.segments]

    def _engine_file(self, rel: str, sha: str | None) -> Path:
        """An engine file's path, checked: in the bundle (listed, confined, sha256 as the manifest says and as the
        record says), or in the engine cache (checked by :meth:`_cached_engine_records`)."""
        if self._engine_root is not None:
            return self._engine_root / rel
        path = self.bundle.verify_file(rel)  # refuses a file whose sha256 differs from the manifest's
        if sha and sha != self.manifest.files.get(rel):
            raise BundleError(f"{path}: sha256 in the engine record differs from the manifest's; rebuild the "
                              f"engines with `eecompile build {self.bundle.path} --backend onnxruntime`")
        return path

    def _load_engine(self, seg: SegmentInfo, rec: dict[str, Any], opts: Any) -> Any:
        path = self._engine_file(str(rec["file"]), rec.get("sha256"))
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:
            raise BundleError(f"{path}: ONNX Runtime cannot load the engine of segment {seg.index} "
                              f"({_first_line(e)}); rebuild the engines with "
                              f"`eecompile build {self.bundle.path} --backend onnxruntime`") from e
        blocked = (rec.get("flags") or {}).get("inputs") or {}
        _check_inputs(sess, seg, {t.name: str(blocked[t.name]["name"]) for t in seg.inputs if t.name in blocked},
                      f"{path}: engine inputs", "its record",
                      f"rebuild the engines with `eecompile build {self.bundle.path} --backend onnxruntime`")
        return sess

    def _load(self, seg: SegmentInfo, opts: Any, extra: Sequence[str] = ()) -> Any:
        path = self.bundle.verify_file(seg.file)
        try:
            if extra:
                # From bytes, with the extra outputs appended; external weights are read from the segment's folder.
                src: Any = with_extra_outputs(path.read_bytes(), extra)
                opts = self._session_options(shared=self._shared, external_data_dir=str(path.parent))
            else:
                src = str(path)
            sess = ort.InferenceSession(src, sess_options=opts, providers=self.providers)
        except Exception as e:
            if extra:
                raise BackendError(f"{path}: cannot return {list(extra)} as extra outputs of segment {seg.index} "
                                   f"({_first_line(e)}); give names of tensors computed in that segment") from e
            raise BundleError(f"{path}: ONNX Runtime cannot load segment {seg.index} ({_first_line(e)}); "
                              f"recompile the bundle or upgrade onnxruntime") from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendError(f"{path}: ONNX Runtime fell back to {sess.get_providers()} instead of CUDA; "
                               f"check the CUDA/cuDNN libraries onnxruntime-gpu needs")
        _check_inputs(sess, seg, {}, f"{path}: graph inputs", "the manifest", "recompile the bundle")
        return sess

    # --- SegmentBackend -------------------------------------------------------------------------------
    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        if self._closed:
            self.check_open()
        thr = self._thr_names[index]
        if thr is not None:
            feeds = dict(feeds)  # a copy: the caller's feeds may be shared with other threads
            feeds[thr] = self._threshold_array(threshold)
        if self.device == "cpu":
            if self._blocked_in[index] or self._blocked_out[index]:
                return self._run_engine(index, feeds)
            return self._run_cpu(index, feeds)
        return self._run_cuda(index, feeds)

    def _threshold_array(self, value: float | None) -> np.ndarray:
        """The float32 scalar fed to a threshold input, one read-only array per value (ORT reads it in place)."""
        a = self._thr_arrays.get(value)  # type: ignore[arg-type]
        if a is None:
            a = np.array(value, dtype=np.float32)
            a.flags.writeable = False
            if len(self._thr_arrays) >= 256:
                self._thr_arrays.clear()
            if value == value:  # NaN never equals itself: not cached
                self._thr_arrays[value] = a  # type: ignore[index]
        return a

    def _run_cpu(self, index: int, feeds: dict[str, Any]) -> dict[str, Any]:
        # Plain run: measured against a CPU IO binding (bind_cpu_input + bind_output("cpu") +
        # copy_outputs_to_cpu) it was as fast or faster at every batch size we tried, because the binding
        # object has to be made per call (a shared one is not thread-safe) and outputs are still copied out.
        if self._any_blocked and any(isinstance(v, Blocked) for v in feeds.values()):
            feeds = {k: (self.to_host(v) if isinstance(v, Blocked) else v) for k, v in feeds.items()}
        names = self._out_names[index]
        try:
            outs = self._run_fns[index](names, feeds, None)
        except Exception as e:
            raise self._diagnose(index, feeds, e) from e
        return dict(zip(names, outs, strict=True))

    # --- the no-exit engine -----------------------------------------------------------------------------
    @property
    def has_no_exit(self) -> bool:
        """True when this machine's ORT CPU engines include the no-exit engine (the chain without heads and
        gates, optimised as one graph: ``flags.no_exit`` of the final segment's record) and they run."""
        return self._no_exit is not None and not self._closed

    def run_no_exit(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the no-exit engine on the model inputs; return the final outputs by model output name. The
        engine's session is made at the first call (its weights are not held unless it is used)."""
        self.check_open()
        info = self._no_exit
        if info is None:
            return super().run_no_exit(feeds)
        sess = self._no_exit_sess
        if sess is None:
            with self._no_exit_lock:
                if self._no_exit_sess is None:
                    self._no_exit_sess = self._load_no_exit(info)
                sess = self._no_exit_sess
        run, names, rename = sess
        if self._any_blocked:
            feeds = {k: (self.to_host(v) if isinstance(v, Blocked) else v) for k, v in feeds.items()}
        try:
            outs = run(names, feeds, None)
        except Exception as e:
            raise BackendError(f"{self.bundle.path}: ONNX Runtime failed running the no-exit engine "
                               f"({_first_line(e)}); run with no_exit_path=False, or rebuild the engines with "
                               f"`eecompile build {self.bundle.path} --backend onnxruntime`") from e
        return {rename[n]: v for n, v in zip(names, outs, strict=True)}

    def _load_no_exit(self, info: Mapping[str, Any]) -> tuple[Any, list[str], dict[str, str]]:
        path = self._engine_file(str(info["file"]), info.get("sha256"))
        fix = f"rebuild the engines with `eecompile build {self.bundle.path} --backend onnxruntime`"
        try:
            sess = ort.InferenceSession(str(path), sess_options=self._no_exit_opts, providers=self.providers)
        except Exception as e:
            raise BundleError(f"{path}: ONNX Runtime cannot load the no-exit engine ({_first_line(e)}); {fix}") from e
        outputs = dict(info.get("outputs") or {})  # model output name -> tensor name in the engine
        have_in = {i.name for i in sess.get_inputs()}
        have_out = {o.name for o in sess.get_outputs()}
        want_in = {t.name for t in self.manifest.inputs}
        if not have_in <= want_in or set(outputs.values()) - have_out or set(outputs) != {
                t.name for t in self.manifest.outputs}:
            raise BundleError(f"{path}: the no-exit engine's inputs {sorted(have_in)} / outputs {sorted(have_out)} "
                              f"do not match the manifest's model inputs and outputs; {fix}")
        names = list(outputs.values())
        return _fast_run(sess), names, {t: n for n, t in outputs.items()}

    def _run_engine(self, index: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """An engine with blocked inputs/outputs: bind manifest names to engine names; blocked tensors travel as
        :class:`Blocked` (a plain array fed to a blocked input, e.g. by ``verify``, is converted here)."""
        blocked_in = self._blocked_in[index]
        run_feeds: dict[str, Any] = {}
        for name, value in feeds.items():
            spec = blocked_in.get(name)
            if spec is None:
                run_feeds[name] = self.to_host(value) if isinstance(value, Blocked) else value
                continue
            engine_name, block, _channels = spec
            if isinstance(value, Blocked) and value.block == block:
                run_feeds[engine_name] = value.array
            else:
                plain = self.to_host(value) if isinstance(value, Blocked) else value
                run_feeds[engine_name] = to_blocked(np.ascontiguousarray(plain), block)
        names = self._out_names[index]
        try:
            outs = self._run_fns[index](names, run_feeds, None)
        except Exception as e:
            raise self._diagnose(index, run_feeds, e) from e
        blocked_out = self._blocked_out[index]
        result: dict[str, Any] = {}
        for name, value in zip(names, outs, strict=True):
            spec = blocked_out.get(name)
            if spec is None:
                result[name] = value
            else:
                result[spec[0]] = Blocked(value, spec[1], spec[2])
        return result

    def _run_cuda(self, index: int, feeds: dict[str, Any]) -> dict[str, Any]:
        sess = self._sessions[index]
        io = sess.io_binding()  # per call: an IOBinding is not safe to share between threads
        try:
            for name, value in feeds.items():
                if isinstance(value, np.ndarray):
                    io.bind_cpu_input(name, value)
                else:
                    io.bind_ortvalue_input(name, value)
            gate = self._gate_names[index]
            for name in self._out_names[index]:
                # Only the gate mask is read on the host every step; everything else stays on the GPU.
                io.bind_output(name, "cpu" if name == gate else "cuda", 0 if name == gate else self.device_id)
            sess.run_with_iobinding(io)
        except Exception as e:
            raise self._diagnose(index, feeds, e) from e
        return dict(zip(self._out_names[index], io.get_outputs(), strict=True))

    def to_host(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, Blocked):
            return from_blocked(x.array, x.block, x.channels)
        return x.numpy()

    def from_host(self, x: np.ndarray) -> Any:
        if self.device == "cpu":
            return x
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", self.device_id)

    def gather(self, x: Any, rows: np.ndarray, axis: int) -> Any:
        if isinstance(x, np.ndarray):
            if axis == 0 and rows.size and rows.size * (x.nbytes // max(x.shape[0], 1)) >= POOL_MIN_BYTES:
                return self._rows.take(x, rows)
            return np.take(x, rows, axis=axis)
        if isinstance(x, Blocked):
            if axis != 0:
                raise BackendError(f"a blocked (NCHWc) tensor has its batch on axis 0, not {axis}; rebuild the engines")
            a = x.array
            big = rows.size and rows.size * (a.nbytes // max(a.shape[0], 1)) >= POOL_MIN_BYTES
            return Blocked(self._rows.take(a, rows) if big else np.take(a, rows, axis=0), x.block, x.channels)
        # No gather primitive for OrtValues in ORT's Python API (and runtimes/ may not import onnx to build a
        # one-node Gather graph), so on CUDA the rows still running take a round trip through the host.
        return self.from_host(np.take(x.numpy(), rows, axis=axis))

    def close(self) -> None:
        super().close()
        self._sessions.clear()
        self._run_fns.clear()
        self._no_exit_sess = None
        self._rows.clear()

    # --- errors ---------------------------------------------------------------------------------------
    def _diagnose(self, index: int, feeds: dict[str, Any], error: Exception) -> Exception:
        """Turn an ORT failure into our error, naming the tensor and the expected vs actual shape/dtype."""
        sess = self._sessions[index]
        seg = self.manifest.segments[index]
        where = f"segment {index} ({seg.file})"
        for arg in sess.get_inputs():
            if arg.name not in feeds:
                return DataError(f"{where}: input '{arg.name}' was not fed; fed {sorted(feeds)}")
            value = feeds[arg.name]
            shape = tuple(value.shape() if callable(getattr(value, "shape", None)) else value.shape)
            dtype = str(value.dtype) if isinstance(value, np.ndarray) else _ORT_TYPES.get(value.data_type(), "?")
            want_dtype = _ORT_TYPES.get(arg.type, arg.type)
            want = [d if isinstance(d, int) else None for d in arg.shape]
            if dtype != want_dtype:
                return DataError(f"{where}: input '{arg.name}' has dtype {dtype}, expected {want_dtype}")
            if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape, strict=False)):
                shown = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in arg.shape)
                return DataError(f"{where}: input '{arg.name}' has shape {list(shape)}, expected [{shown}]")
        return BackendError(f"{where}: ONNX Runtime failed: {_first_line(error)}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# ModelProto.graph = 7, GraphProto.output = 12, ValueInfoProto.name = 1 (onnx/onnx.proto3).
_MODEL_GRAPH, _GRAPH_OUTPUT, _VALUE_INFO_NAME = 7, 12, 1


def with_extra_outputs(model: bytes, names: Sequence[str]) -> bytes:
    """A serialized ONNX model with ``names`` appended to its graph outputs (name only; ORT infers the type).

    Protobuf merges a repeated occurrence of an embedded message field into the first and appends repeated
    fields (protobuf encoding guide, "Last One Wins" / merging), so appending a second ``graph`` that holds only
    the new outputs extends the graph's outputs without parsing the model: the runtime needs no onnx package."""
    outputs = b"".join(_field(_GRAPH_OUTPUT, _field(_VALUE_INFO_NAME, n.encode())) for n in names)
    return model + _field(_MODEL_GRAPH, outputs)


ENGINE_CACHE_INDEX = "records.json"
"""The file of an engine cache directory that lists its engines (their records, as ``manifest.engines`` holds them)
and the segments they were built from."""


def _segment_digest(manifest: Any) -> str:
    return hashlib.sha256("\n".join(f"{s.file}={manifest.files.get(s.file, '')}"
                                     for s in manifest.segments).encode()).hexdigest()


def engine_cache_dir(manifest: Any, target: str | None = None) -> Path:
    """Where ORT CPU engines for a bundle's segments live when they are kept OUTSIDE the bundle (``eecompile build
    BUNDLE --backend onnxruntime --cache``: a bundle built elsewhere, or a signed one, stays untouched): the user's
    cache, ``ort-engines/<target>/<digest of the segments' sha256>``. The runner looks there when the bundle has no
    engines for this machine, and checks every file's sha256 before loading it."""
    return user_cache_dir("ort-engines", target or cpu_target(), _segment_digest(manifest)[:24])


def default_trt_cache_dir(bundle: Bundle) -> Path:
    """Where ORT's TensorRT EP keeps the engines and timing cache it builds for ``bundle``: the user's cache
    (:func:`~eecompile.runtimes.sessions.user_cache_dir`), ``ort-trt/<key>``, the key a digest of the bundle's
    segment files (their sha256 in the manifest), so that a changed segment gets a fresh directory. Never inside
    the bundle: writing there would break its signature and its file hashes."""
    return user_cache_dir("ort-trt", _segment_digest(bundle.manifest)[:16])


def _fast_run(sess: Any) -> Any:
    """``run(output_names, feeds, run_options)`` of an ``InferenceSession`` without its Python wrapper.

    ``InferenceSession.run`` checks, before calling the compiled session, that every input is fed, whether WebGPU
    graph capture is on and who owns each OrtValue fed, and (on an EP failure) may fall back to other providers:
    about 13 us per call on a 2-core EPYC, as much as ORT's own run of a small segment. The runner's feeds are
    checked once against the session's inputs when it is made (``_check_inputs``), they are numpy arrays, and
    CPU sessions have no fallback, so the compiled ``run`` is called directly when ORT exposes it (``_sess``);
    otherwise the wrapper runs. ORT's own checks of shapes and types still apply."""
    inner = getattr(sess, "_sess", None)
    run = getattr(inner, "run", None)
    if run is None or not callable(run) or "CPUExecutionProvider" != (sess.get_providers() or [""])[0]:
        return sess.run
    return run


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_inputs(sess: Any, seg: SegmentInfo, renamed: dict[str, str], what: str, source: str, fix: str) -> None:
    """The session's inputs must be the segment's data inputs (``renamed`` where an engine renames them) plus
    its threshold; a mismatch means the file and the manifest disagree."""
    want = {renamed.get(t.name, t.name) for t in seg.inputs}
    if seg.exit.gate is not None:
        want.add(seg.exit.gate.threshold_input)
    have = {i.name for i in sess.get_inputs()}
    if want != have:
        raise BundleError(f"{what} {sorted(have)} do not match {sorted(want)} in {source}; {fix}")
