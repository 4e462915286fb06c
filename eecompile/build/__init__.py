"""``eecompile build`` and ``eecompile verify``: engines per segment for a backend, and their parity check.

TensorRT (``backend="tensorrt"``): one serialized engine per segment, ``engines/seg{k}.tensorrt.{target}.plan``,
where ``target`` names the GPU architecture and TensorRT version (``sm90-trt10.13``): TensorRT engines run
only on the TensorRT version and GPU that built them. Each engine gets an :class:`EngineRecord` in
``manifest.engines``; the runtime checks the record (version, GPU) and the file's sha256 before
deserializing, and a mismatch names the command that rebuilds it.

Two TensorRT API generations are supported and detected from ``tensorrt.__version__``:
  * 10.x (JetPack 6): ``--fp16`` sets ``BuilderFlag.FP16`` and pins the gate layers, Softmax, reductions
    and normalisations to fp32 (``PREFER_PRECISION_CONSTRAINTS``);
  * 11.x: precision flags are gone and networks are strongly typed, so ``--fp16`` first converts each
    segment ONNX to fp16 (:mod:`eecompile.build.to_fp16`, gate kept fp32, I/O dtypes unchanged).

ONNX Runtime (``backend="onnxruntime"``): CPU "engines", ``engines/seg{k}.onnxruntime.{target}.onnx``: each
segment's graph as ORT optimises it on this machine (ORT_ENABLE_ALL, saved with ``optimized_model_filepath``),
with the cuts edited (:mod:`eecompile.build.ort_layout`) so that a tensor ORT holds in its blocked NCHWc layout
crosses the cut blocked instead of through a ReorderOutput / ReorderInput pair. ``target`` is ORT major.minor
and the NCHWc block size (``ort1.32-nchwc16``): such a graph is only valid on that ORT and that kind of CPU. The
record names the blocked tensors each engine takes and gives (``flags.inputs`` / ``flags.outputs``: engine
name, shape, dtype, batch axis, block, channels) so the runtime binds them; on another target the runtime
runs the portable segments and logs a warning.

Everything that needs no GPU (profiles, version dispatch, records, file names) is pure and tested on CPU.
This module imports only numpy, pyyaml and the bundle at import time: the embedded TensorRT runtime uses
its records on a Jetson without onnx.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, Manifest, TensorInfo, sha256_bytes, update_bundle
from eecompile.errors import BackendError, BundleError, DataError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
SUPPORTED_TRT_MAJORS = (10, 11)
INSTALL_HINT = ("pip install 'eecompile[gpu]' (on a Jetson: use JetPack's TensorRT, "
                "`sudo apt install python3-libnvinfer`, in a venv made with --system-site-packages)")

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)


# ------------------------------------------------------------------------------------ versions, targets

@dataclass(frozen=True)
class TRTVersion:
    """A TensorRT version and the API path it takes (``"v10"``: builder flags, ``"v11"``: strongly typed)."""

    full: str
    major: int
    minor: int

    @property
    def path(self) -> str:
        return f"v{self.major}"

    @property
    def short(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def fp16_by_flag(self) -> bool:
        """TensorRT 10 takes ``BuilderFlag.FP16``; 11 removed it (precision comes from the ONNX dtypes)."""
        return self.major == 10


def parse_trt_version(version: str) -> TRTVersion:
    """Parse ``tensorrt.__version__``; refuse versions this eecompile was not written for."""
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise BackendError(f"cannot read the TensorRT version from {version!r}; reinstall TensorRT ({INSTALL_HINT})")
    major, minor = int(m.group(1)), int(m.group(2))
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendError(
            f"TensorRT {version} is not supported: eecompile builds with TensorRT 10.x (JetPack 6) or 11.x "
            f"(JetPack >= 7.2.2); install one of them ({INSTALL_HINT})"
        )
    return TRTVersion(full=str(version).strip(), major=major, minor=minor)


def engine_target(compute_capability: str, trt_version: str) -> str:
    """The target an engine is tied to, e.g. ``sm90-trt10.13`` for compute capability 9.0 and TensorRT 10.13.x."""
    v = parse_trt_version(trt_version)
    m = re.match(r"^\s*(\d+)\.(\d+)\s*$", compute_capability)
    if not m:
        raise BackendError(f"compute capability {compute_capability!r} is not MAJOR.MINOR")
    return f"sm{m.group(1)}{m.group(2)}-trt{v.short}"


def engine_file(segment: int, target: str, backend: str = "tensorrt") -> str:
    """Bundle-relative path of segment ``segment``'s engine: ``engines/seg{k}.{backend}.{target}.plan``."""
    return f"engines/seg{segment}.{backend}.{target}.plan"


# ------------------------------------------------------------------------------------------- records

@dataclass
class EngineRecord:
    """What ``manifest.engines`` holds for one engine: enough to refuse it on the wrong machine."""

    segment: int
    backend: str
    target: str
    file: str | None  # bundle-relative; None when the backend stores nothing (onnxruntime)
    sha256: str | None
    backend_version: str  # TensorRT (or ONNX Runtime) version that built it
    gpu_name: str | None = None
    compute_capability: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # fp16, max_batch, opt_batch, workspace_mb, precision
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]
    built_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineRecord:
        try:
            return cls(segment=int(d["segment"]), backend=str(d["backend"]), target=str(d["target"]),
                       file=d.get("file"), sha256=d.get("sha256"), backend_version=str(d["backend_version"]),
                       gpu_name=d.get("gpu_name"), compute_capability=d.get("compute_capability"),
                       flags=dict(d.get("flags") or {}), profiles=dict(d.get("profiles") or {}),
                       built_at=str(d.get("built_at", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.engines: malformed engine record {dict(d)!r} ({e}); "
                              f"rebuild the engines with `eecompile build`") from e


def engine_records(manifest: Manifest, backend: str, target: str | None = None) -> list[EngineRecord]:
    """The records of ``backend`` (and ``target``) in the manifest, by segment."""
    out = [EngineRecord.from_dict(d) for d in manifest.engines if d.get("backend") == backend]
    if target is not None:
        out = [r for r in out if r.target == target]
    return sorted(out, key=lambda r: r.segment)


def rebuild_command(bundle_path: str | Path, flags: Mapping[str, Any] | None = None,
                    backend: str = "tensorrt") -> str:
    """The ``eecompile build`` line that reproduces an engine with the same flags on this machine."""
    flags = flags or {}
    parts = ["eecompile", "build", str(bundle_path), "--backend", backend]
    if flags.get("fp16"):
        parts.append("--fp16")
    for key, opt in (("max_batch", "--max-batch"), ("opt_batch", "--opt-batch"), ("workspace_mb", "--workspace")):
        if flags.get(key) is not None:
            parts += [opt, str(flags[key])]
    return " ".join(parts)


def check_engine_record(record: EngineRecord, trt_version: str, gpu_name: str, compute_capability: str,
                        bundle_path: str | Path = "BUNDLE", strict_gpu: bool = True) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, naming the rebuild command.

    TensorRT refuses such a plan itself ("Version tag does not match") but only after reading it, and with a
    message that names neither the file nor the fix. A different GPU model with the same compute capability
    deserializes but may be slow or wrong-tuned: refused unless ``strict_gpu=False`` (then a warning).
    """
    where = f"{bundle_path}/{record.file}" if record.file else f"{bundle_path} segment {record.segment}"
    fix = f"rebuild the engines on this machine: `{rebuild_command(bundle_path, record.flags)}`"
    if record.backend != "tensorrt":
        raise BackendError(f"{where}: a {record.backend} record, not a TensorRT engine")
    if record.backend_version.strip() != str(trt_version).strip():
        raise BackendError(f"{where}: built with TensorRT {record.backend_version}, this machine has TensorRT "
                           f"{trt_version} (engines only load on the version that built them); {fix}")
    if (record.compute_capability or "") != compute_capability:
        raise BackendError(f"{where}: built for compute capability {record.compute_capability} "
                           f"({record.gpu_name}), this GPU is {compute_capability} ({gpu_name}); {fix}")
    if (record.gpu_name or "") != gpu_name:
        msg = f"{where}: built on {record.gpu_name}, this GPU is {gpu_name} (same compute capability)"
        if strict_gpu:
            raise BackendError(f"{msg}; {fix}")
        log.warning("%s; it may run slower than an engine built here", msg)


# ------------------------------------------------------------------------------------------ profiles

def _dim_sizes_from_data(manifest: Manifest, data_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Sizes of named symbolic dims, learnt from the shapes of model inputs (and any tensor) in the data."""
    sizes: dict[str, int] = {}
    infos = {t.name: t for t in manifest.inputs}
    for seg in manifest.segments:
        for t in [*seg.inputs, *seg.outputs]:
            infos.setdefault(t.name, t)
    for name, shape in data_shapes.items():
        info = infos.get(name)
        if info is None:
            continue
        if len(shape) != len(info.shape):
            raise DataError(f"data array '{name}' has shape {tuple(shape)}, the bundle expects rank "
                            f"{len(info.shape)} {info.shape}")
        for axis, (dim, size) in enumerate(zip(info.shape, shape, strict=True)):
            if axis == info.batch_axis or not isinstance(dim, str):
                continue
            if dim in sizes and sizes[dim] != int(size):
                raise DataError(f"data arrays disagree on dim '{dim}': {sizes[dim]} and {int(size)} ('{name}')")
            sizes[dim] = int(size)
    return sizes


def compute_profiles(manifest: Manifest, max_batch: int, opt_batch: int | None = None,
                     data_shapes: Mapping[str, Sequence[int]] | None = None,
                     dim_sizes: Mapping[str, int | Sequence[int]] | None = None) -> dict[int, dict[str, Profile]]:
    """Optimisation profile (min, opt, max) of every data input of every segment.

    The batch axis spans ``1..max_batch`` (compaction makes every batch size occur), tuned for
    ``opt_batch`` (default ``max_batch``). A fixed dim is itself. A symbolic non-batch dim takes its size
    from ``dim_sizes`` (an int, or a (min, opt, max) triple) or from the data (``data_shapes``: array name ->
    shape; a model input's named dims carry over to the tensors that share the name); otherwise it is an
    error that asks for the size. ``batch_mode: per_sample`` bundles get batch 1 only. The threshold input
    is a fixed scalar and needs no profile.
    """
    if max_batch < 1:
        raise BackendError(f"--max-batch must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise BackendError(f"--opt-batch {opt} must lie in 1..--max-batch ({max_batch})")
    if manifest.batch_mode == "per_sample":
        max_batch = opt = 1
    known: dict[str, tuple[int, int, int]] = {}
    for dim, size in _dim_sizes_from_data(manifest, data_shapes or {}).items():
        known[dim] = (size, size, size)
    for dim, given in (dim_sizes or {}).items():
        if isinstance(given, int):
            known[dim] = (given, given, given)
        else:
            lo, mid, hi = (int(s) for s in given)
            if not 1 <= lo <= mid <= hi:
                raise BackendError(f"size range for dim '{dim}' must satisfy 1 <= min <= opt <= max, got {given}")
            known[dim] = (lo, mid, hi)
    shapes = {k: tuple(int(s) for s in v) for k, v in (data_shapes or {}).items()}

    profiles: dict[int, dict[str, Profile]] = {}
    for seg in manifest.segments:
        per_input: dict[str, Profile] = {}
        for t in seg.inputs:
            per_input[t.name] = _profile_of(t, seg.index, max_batch, opt, known, shapes.get(t.name))
        profiles[seg.index] = per_input
    return profiles


def _profile_of(t: TensorInfo, segment: int, max_batch: int, opt: int, known: Mapping[str, tuple[int, int, int]],
                data_shape: tuple[int, ...] | None) -> Profile:
    lo: list[int] = []
    mid: list[int] = []
    hi: list[int] = []
    for axis, dim in enumerate(t.shape):
        if axis == t.batch_axis:
            rng: tuple[int, int, int] = (1, opt, max_batch)
        elif isinstance(dim, int) and dim > 0:
            rng = (dim, dim, dim)
        elif isinstance(dim, str) and dim in known:
            rng = known[dim]
        elif data_shape is not None and len(data_shape) == len(t.shape):
            rng = (data_shape[axis], data_shape[axis], data_shape[axis])
        else:
            label = f"'{dim}'" if dim else "unnamed"
            raise BackendError(
                f"segment {segment} input '{t.name}' axis {axis} is a symbolic dim ({label}) with no size: "
                f"give sample inputs (build with data=...) or the size (dim_sizes={{{dim or 'DIM'!r}: N}}), "
                f"or fix the dim when compiling"
            )
        lo.append(rng[0])
        mid.append(rng[1])
        hi.append(rng[2])
    return tuple(lo), tuple(mid), tuple(hi)


def default_timing_cache(target: str) -> Path:
    """Where the timing cache lives between builds when ``--timing-cache`` is not given (per target)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eecompile" / f"timing-{target}.cache"


# ---------------------------------------------------------------------------------------------- build

@dataclass
class BuildReport:
    """What ``build_engines`` did, one row per segment."""

    bundle: Path
    backend: str
    target: str
    records: list[EngineRecord]
    seconds: list[float]
    sizes: list[int]
    timing_cache: Path | None = None
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{self.bundle}: {self.backend} engines for {self.target}")
        for col in ("segment", "file", "size", "build s", "flags"):
            table.add_column(col)
        for r, s, n in zip(self.records, self.seconds, self.sizes, strict=True):
            flags = ", ".join(f"{k}={v}" for k, v in r.flags.items() if not isinstance(v, (dict, list)))
            if r.flags.get("rewritten"):
                flags += ", blocked: " + ", ".join(f"{c['tensor']} ({'out' if c['from'] == r.segment else 'in'})"
                                                   for c in r.flags["rewritten"])
            table.add_row(str(r.segment), r.file or "(none stored)", f"{n / 1e6:.1f} MB" if n else "-",
                          f"{s:.1f}", flags)
        console = Console()
        console.print(table)
        if self.timing_cache:
            console.print(f"timing cache: {self.timing_cache}")
        for note in self.notes:
            console.print(note)


def _replace_engine_records(tmp: Path, manifest: Manifest, records: Sequence[EngineRecord], backend: str,
                            target: str, drop_fileless: bool = False) -> None:
    """Swap in ``records`` for ``backend``/``target`` in a staged bundle: engines for other targets stay (one
    bundle can carry engines for several GPUs or CPUs), this target's old records and files go."""
    new_files = {r.file for r in records}
    stale = [d for d in manifest.engines if d.get("backend") == backend
             and (d.get("target") == target or (drop_fileless and not d.get("file")))]
    for d in stale:
        f = d.get("file")
        if f and (tmp / f).is_file() and f not in new_files:
            (tmp / f).unlink()
    manifest.engines = [d for d in manifest.engines if d not in stale] + [r.to_dict() for r in records]


def build_engines(bundle: str | Path, backend: str = "tensorrt", fp16: bool = False, max_batch: int = 32,
                  opt_batch: int | None = None, workspace_mb: int = 1024, timing_cache: str | Path | None = None,
                  data: str | Path | None = None, dim_sizes: Mapping[str, int | Sequence[int]] | None = None,
                  device: int = 0) -> BuildReport:
    """Build one engine per segment for ``backend`` and record them in the bundle (atomic update)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    path = Path(bundle)
    if backend == "onnxruntime":
        return _build_onnxruntime(path, max_batch)
    return _build_tensorrt(path, fp16=fp16, max_batch=max_batch, opt_batch=opt_batch, workspace_mb=workspace_mb,
                           timing_cache=timing_cache, data=data, dim_sizes=dim_sizes, device=device)


def _data_shapes(data: str | Path | None) -> dict[str, tuple[int, ...]]:
    if data is None:
        return {}
    try:
        with np.load(data) as z:
            return {k: tuple(z[k].shape) for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{data}: cannot read the .npz ({e})") from e


def ort_engine_file(segment: int, target: str) -> str:
    """Bundle-relative path of segment ``segment``'s ORT CPU engine: ``engines/seg{k}.onnxruntime.{target}.onnx``."""
    return f"engines/seg{segment}.onnxruntime.{target}.onnx"


# An optimised graph is one protobuf; past this size it would need external data, which engines do not use yet.
ORT_ENGINE_MAX_BYTES = 1_900_000_000


def _build_onnxruntime(path: Path, max_batch: int) -> BuildReport:
    """ORT CPU engines: each segment's ORT-optimised graph (this machine), boundaries edited to carry NCHWc."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from eecompile.build.ort_layout import carry_blocked, count_reorders, optimise_with_ort
    from eecompile.runtimes.onnxruntime import (
        DEFAULT_CPU_DISABLED_OPTIMIZERS,
        ENGINE_LOAD_LEVEL,
        cpu_target,
        nchwc_block_size,
    )

    b = Bundle.load(path)
    m = b.manifest
    target = cpu_target()
    block = nchwc_block_size()
    disabled = list(DEFAULT_CPU_DISABLED_OPTIMIZERS)
    seconds: list[float] = []
    graphs: dict[int, onnx.ModelProto] = {}
    before: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="eecompile-ort-") as scratch:
        for seg in m.segments:
            t0 = time.perf_counter()
            src = b.verify_file(seg.file)
            dst = Path(scratch) / f"seg{seg.index}.opt.onnx"
            try:
                optimise_with_ort(src, dst, disabled)
            except Exception as e:  # ORT raises its own exception types; name the file instead
                raise BackendError(f"{src}: ONNX Runtime cannot load this segment ({e}); recompile the bundle") from e
            if dst.stat().st_size > ORT_ENGINE_MAX_BYTES:
                raise BackendError(f"{src}: ONNX Runtime's optimised graph is {dst.stat().st_size / 2**30:.1f} GB, "
                                   f"over what one ONNX file holds; run this bundle on its portable segments")
            graphs[seg.index] = onnx.load(str(dst))
            before[seg.index] = count_reorders(graphs[seg.index])
            seconds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    carried, skipped = carry_blocked(graphs, m.segments, [t.name for t in m.inputs], block)
    edit_s = (time.perf_counter() - t0) / max(len(m.segments), 1)
    blobs = {k: g.SerializeToString() for k, g in graphs.items()}

    # Every engine must load the way the runtime loads it (no optimisers) before it is recorded.
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ENGINE_LOAD_LEVEL)
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    for k, blob in blobs.items():
        try:
            ort.InferenceSession(blob, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendError(f"segment {k}: ONNX Runtime refuses its edited optimised graph ({e}); this is a bug "
                               f"in eecompile's layout pass: report it; the portable segments still run") from e

    built_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    records: list[EngineRecord] = []
    for seg in m.segments:
        k = seg.index
        after = count_reorders(graphs[k])
        flags: dict[str, Any] = {
            "max_batch": max_batch, "providers": ["CPUExecutionProvider"], "graph_optimization": "ORT_ENABLE_ALL",
            "load_optimization": ENGINE_LOAD_LEVEL, "disabled_optimizers": disabled, "nchwc_block": block,
            "inputs": {c.tensor: c.io_entry() for c in carried if k in c.consumers},
            "outputs": {c.tensor: c.io_entry() for c in carried if c.producer == k},
            "rewritten": [c.summary() for c in carried if k == c.producer or k in c.consumers],
            "reorders_before": before[k], "reorders_after": after,
        }
        rel = ort_engine_file(k, target)
        records.append(EngineRecord(segment=k, backend="onnxruntime", target=target, file=rel,
                                    sha256=sha256_bytes(blobs[k]), backend_version=ort.__version__, flags=flags,
                                    built_at=built_at))
    seconds = [s_ + edit_s for s_ in seconds]

    def change(tmp: Path, manifest: Manifest) -> None:
        (tmp / "engines").mkdir(exist_ok=True)
        for r in records:
            assert r.file is not None
            (tmp / r.file).write_bytes(blobs[r.segment])
        # The old file-less "check" records go too.
        _replace_engine_records(tmp, manifest, records, "onnxruntime", target, drop_fileless=True)

    update_bundle(path, change)
    notes = [f"ONNX Runtime {ort.__version__}, NCHWc block {block}: "
             f"{len(carried)} boundary tensor(s) carried in blocked layout"]
    notes += [f"  {c.tensor}: segment {c.producer} -> {c.consumers} as {c.engine_name}" for c in carried]
    notes += [f"  kept plain: {s_.tensor} ({s_.reason})" for s_ in skipped]
    return BuildReport(path, "onnxruntime", target, records, seconds, [len(blobs[r.segment]) for r in records],
                       notes=notes)


def _build_tensorrt(path: Path, *, fp16: bool, max_batch: int, opt_batch: int | None, workspace_mb: int,
                    timing_cache: str | Path | None, data: str | Path | None,
                    dim_sizes: Mapping[str, int | Sequence[int]] | None, device: int) -> BuildReport:
    from eecompile.runtimes.tensorrt import import_tensorrt, query_gpu, trt_logger

    b = Bundle.load(path)
    trt = import_tensorrt()
    version = parse_trt_version(trt.__version__)
    gpu = query_gpu(device)
    target = engine_target(gpu.compute_capability, version.full)
    profiles = compute_profiles(b.manifest, max_batch, opt_batch, _data_shapes(data), dim_sizes)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(target)
    cache_blob = cache_path.read_bytes() if cache_path.is_file() else b""
    flags: dict[str, Any] = {
        "fp16": fp16, "max_batch": max_batch, "opt_batch": opt_batch or max_batch, "workspace_mb": workspace_mb,
        "precision": ("fp16-flag" if version.fp16_by_flag else "fp16-onnx") if fp16 else "fp32",
        "tf32": True,  # TensorRT's default; verify tolerances allow for it
    }
    logger = trt_logger(trt)
    records: list[EngineRecord] = []
    seconds: list[float] = []
    sizes: list[int] = []

    def change(tmp: Path, manifest: Manifest) -> None:
        nonlocal cache_blob
        import tempfile

        (tmp / "engines").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="eecompile-fp16-") as scratch:
            for seg in manifest.segments:
                t0 = time.perf_counter()
                onnx_path = tmp / seg.file
                if fp16 and not version.fp16_by_flag:
                    from eecompile.build.to_fp16 import convert_segment_file_to_fp16

                    onnx_path = convert_segment_file_to_fp16(onnx_path, Path(scratch) / f"seg{seg.index}.fp16.onnx")
                plan, cache_blob = _build_plan(trt, logger, version, onnx_path, profiles[seg.index],
                                               fp16=fp16, workspace_mb=workspace_mb, cache_blob=cache_blob)
                rel = engine_file(seg.index, target)
                (tmp / rel).write_bytes(plan)
                seconds.append(time.perf_counter() - t0)
                sizes.append(len(plan))
                records.append(EngineRecord(
                    segment=seg.index, backend="tensorrt", target=target, file=rel, sha256=sha256_bytes(plan),
                    backend_version=version.full, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                    flags=dict(flags), profiles={n: [list(s) for s in p] for n, p in profiles[seg.index].items()},
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                ))
        _replace_engine_records(tmp, manifest, records, "tensorrt", target)

    update_bundle(path, change)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_cache = cache_path.with_suffix(cache_path.suffix + ".tmp")
    tmp_cache.write_bytes(cache_blob)
    os.replace(tmp_cache, cache_path)
    return BuildReport(path, "tensorrt", target, records, seconds, sizes, timing_cache=cache_path)


def _build_plan(trt: Any, logger: Any, version: TRTVersion, onnx_path: Path, profile: Mapping[str, Profile], *,
                fp16: bool, workspace_mb: int, cache_blob: bytes) -> tuple[bytes, bytes]:
    """Parse one segment, build its serialized engine; return (plan, updated timing cache)."""
    builder = trt.Builder(logger)
    # Flags 0: 10.x networks are always explicit-batch (EXPLICIT_BATCH is deprecated and ignored) and weakly typed,
    # so BuilderFlag.FP16 applies; 11.x networks are always strongly typed (the ONNX dtypes are the precision).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # a path, so external weight files next to it resolve
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"{onnx_path}: the TensorRT ONNX parser refused this segment: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if fp16 and version.fp16_by_flag:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _pin_fp32_layers(trt, network)

    prof = builder.create_optimization_profile()
    dynamic = 0
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if all(d >= 0 for d in inp.shape):
            continue  # static (the threshold scalar): no profile needed
        if inp.name not in profile:
            raise BackendError(f"{onnx_path}: input '{inp.name}' is dynamic but not in the manifest; recompile")
        lo, mid, hi = profile[inp.name]
        prof.set_shape(inp.name, lo, mid, hi)  # raises RuntimeError when min <= opt <= max does not hold
        dynamic += 1
    if dynamic and config.add_optimization_profile(prof) < 0:
        raise BackendError(f"{onnx_path}: TensorRT refused the optimisation profile {dict(profile)}")

    # One timing cache threads through every segment (and every build): identical layers are timed once.
    if not config.set_timing_cache(_timing_cache(config, cache_blob, onnx_path), False):
        # False: the cache was made on another GPU/TensorRT (ignore_mismatch=False refuses it); start afresh.
        log.warning("%s: the timing cache was made on another device; starting an empty one", onnx_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)  # IHostMemory, or None on failure
    if plan is None:
        raise BackendError(f"{onnx_path}: TensorRT could not build an engine (see the log above); try a larger "
                           f"--workspace or a smaller --max-batch")
    cache = config.get_timing_cache()
    return bytes(plan), (bytes(cache.serialize()) if cache is not None else cache_blob)


def _timing_cache(config: Any, blob: bytes, onnx_path: Path) -> Any:
    """``config.create_timing_cache(blob)``; a cache file TensorRT cannot read (another version, truncated) is
    replaced by an empty cache with a warning instead of failing the build."""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception as e:  # pybind raises RuntimeError/TypeError for a malformed blob
            log.warning("%s: the timing cache is unreadable (%s); starting an empty one", onnx_path, e)
            cache = None
        if cache is not None:
            return cache
    return config.create_timing_cache(b"")


_FP32_LAYER_TYPES = ("SOFTMAX", "REDUCE", "NORMALIZATION")


def _pin_fp32_layers(trt: Any, network: Any) -> None:
    """TensorRT 10 + FP16: keep gate layers (``.gate/`` in the ONNX node name), softmax, reductions and
    normalisations in fp32, as the strongly typed path does by converting the ONNX."""
    fp32_types = {getattr(trt.LayerType, t) for t in _FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
    floats = {trt.float32, trt.float16}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if ".gate/" not in layer.name and layer.type not in fp32_types:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not any(o.dtype in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j, o in enumerate(outs):
            if o.dtype in floats:
                layer.set_output_type(j, trt.float32)


# --------------------------------------------------------------------------------------------- verify

@dataclass
class VerifyRow:
    segment: int
    tensor: str
    kind: str  # "value" (max abs error / output scale) or "decisions" (rows that disagree)
    error: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class VerifyReport:
    """Each segment's outputs on the backend against ONNX Runtime on CPU, fed the same inputs."""

    bundle: Path
    backend: str
    batch: int
    rows: list[VerifyRow]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{self.bundle}: {self.backend} vs ONNX Runtime CPU, batch {self.batch}")
        for col in ("segment", "output", "check", "error", "tolerance", "", "detail"):
            table.add_column(col)
        for r in self.rows:
            table.add_row(str(r.segment), r.tensor, r.kind, f"{r.error:.3g}", f"{r.tolerance:.3g}",
                          "ok" if r.ok else "[red]FAIL[/red]", r.detail)
        console = Console()
        console.print(table)
        for note in self.notes:
            console.print(note)
        console.print("parity ok" if self.ok else "[red]parity FAILED[/red]")


# Max |backend - reference| / max(|reference|, 1e-6). TensorRT uses TF32 for fp32 matmuls/convs by default
# (10-bit mantissa, like fp16), so fp32 engines get a tolerance of the same order.
# ORT CPU engines ("ort") run the same kernels as the portable segments: only summation order may differ.
VALUE_TOL = {"fp32": 5e-3, "fp16": 2e-2, "ort": 1e-5}
# Gate flips are expected only for samples whose score sits within this band of the threshold.
SCORE_BAND = {"fp32": 2e-3, "fp16": 1e-2, "ort": 1e-5}
DECISION_TOL_NO_SCORE = 0.01  # without a score output: fraction of rows allowed to disagree


def verify_backend(bundle: str | Path, backend: str = "tensorrt", data: str | Path | None = None,
                   batch: int | None = None, **options: Any) -> VerifyReport:
    """Run every segment on ``backend`` and on ONNX Runtime CPU with identical inputs and compare.

    Segment k's inputs are the reference chain's tensors (all samples run every segment), so an error is
    pinned to the segment that makes it. Values are compared relative to each output's scale, gate decisions
    row by row (a flip counts only when the reference score is not within a band of the threshold).
    We drive our own runtime rather than Polygraphy's ``TrtRunner``: the point is to test the bindings the
    chain uses (``set_tensor_address``, shared scratch memory, our copies), not Polygraphy's.
    """
    import onnxruntime as ort

    b = Bundle.load(bundle)
    m = b.manifest
    precision = "fp32"
    max_batch = None
    if backend == "tensorrt":
        recs = engine_records(m, "tensorrt")
        if not recs:
            raise BackendError(f"{b.path}: no TensorRT engines; build them with "
                               f"`{rebuild_command(b.path)}`")
        precision = "fp16" if any(r.flags.get("fp16") for r in recs) else "fp32"
        max_batch = min(int(r.flags.get("max_batch", 1)) for r in recs)
    elif backend == "onnxruntime":
        precision = "ort"
    inputs = _verify_inputs(b, data, batch, max_batch)
    n = next(iter(inputs.values())).shape[0]

    # Reference: every segment on every sample, ONNX Runtime CPU.
    env: dict[str, np.ndarray] = dict(inputs)
    ref: list[dict[str, np.ndarray]] = []
    feeds_per_seg: list[dict[str, np.ndarray]] = []
    for seg in m.segments:
        sess = ort.InferenceSession(str(b.verify_file(seg.file)), providers=["CPUExecutionProvider"])
        feeds = {t.name: env[t.name] for t in seg.inputs}
        if seg.exit.gate is not None:
            feeds[seg.exit.gate.threshold_input] = np.array(seg.exit.gate.threshold, np.float32)
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(names, feeds), strict=True))
        env.update(outs)
        ref.append(outs)
        feeds_per_seg.append(feeds)

    be = _make_backend(b, backend, **options)
    notes: list[str] = []
    if backend == "onnxruntime":
        target = getattr(be, "engine_target", None)
        if target:
            notes.append(f"ONNX Runtime CPU engines for {target} against the portable segments "
                         f"(blocked tensors converted to NCHW to compare)")
        else:
            notes.append("no ONNX Runtime engines for this machine (see the warning above, or none built): "
                         "the portable segments were compared with themselves")
    rows: list[VerifyRow] = []
    try:
        for seg, feeds, expected in zip(m.segments, feeds_per_seg, ref, strict=True):
            gate = seg.exit.gate
            dev = {k: be.from_host(v) for k, v in feeds.items() if gate is None or k != gate.threshold_input}
            got = be.run_segment(seg.index, dev, gate.threshold if gate else None)
            for name, want in expected.items():
                if name not in got:
                    rows.append(VerifyRow(seg.index, name, "missing", 1.0, 0.0, "backend did not return it"))
                    continue
                have = be.to_host(got[name])
                rows.append(_compare(seg.index, name, want, have, precision, gate, expected))
    finally:
        be.close()
    return VerifyReport(b.path, backend, n, rows,
                        notes=[*notes, f"precision {precision}; inputs: {'data ' + str(data) if data else 'random'}"])


def _compare(segment: int, name: str, want: np.ndarray, have: np.ndarray, precision: str, gate: Any,
             outs: Mapping[str, np.ndarray]) -> VerifyRow:
    if want.shape != have.shape:
        return VerifyRow(segment, name, "shape", 1.0, 0.0, f"expected {want.shape}, got {have.shape}")
    if want.dtype == np.bool_ or not np.issubdtype(want.dtype, np.floating):
        differ = want != have
        if gate is not None and name == gate.output and getattr(gate, "score_output", None) in outs:
            score = np.asarray(outs[gate.score_output], np.float64)
            near = np.abs(score - gate.threshold) <= SCORE_BAND[precision]
            bad = int((differ & ~near).sum())
            return VerifyRow(segment, name, "decisions", float(bad), 0.0,
                             f"{int(differ.sum())}/{differ.size} differ, {bad} away from the threshold")
        frac = float(differ.mean()) if differ.size else 0.0
        return VerifyRow(segment, name, "decisions", frac, DECISION_TOL_NO_SCORE,
                         f"{int(differ.sum())}/{differ.size} differ")
    w = want.astype(np.float64)
    h = have.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(finite, np.isfinite(h)):
        return VerifyRow(segment, name, "value", float("inf"), VALUE_TOL[precision], "NaN/Inf pattern differs")
    scale = max(float(np.abs(w[finite]).max()) if finite.any() else 0.0, 1e-6)
    err = float(np.abs(w[finite] - h[finite]).max()) / scale if finite.any() else 0.0
    return VerifyRow(segment, name, "value", err, VALUE_TOL[precision], f"scale {scale:.3g}")


def _verify_inputs(b: Bundle, data: str | Path | None, batch: int | None,
                   max_batch: int | None) -> dict[str, np.ndarray]:
    m = b.manifest
    want = batch or min(8, max_batch or 8)
    if max_batch is not None and want > max_batch:
        raise BackendError(f"verify batch {want} exceeds the engines' --max-batch {max_batch}")
    if data is not None:
        try:
            z = np.load(data)
        except (OSError, ValueError) as e:
            raise DataError(f"{data}: cannot read the .npz ({e})") from e
        out = {}
        for t in m.inputs:
            if t.name not in z.files:
                raise DataError(f"{data}: no array named '{t.name}' (model input); arrays: {', '.join(z.files)}")
            out[t.name] = np.ascontiguousarray(z[t.name][:want]).astype(t.dtype, copy=False)
        return out
    rng = np.random.default_rng(0)
    recs = engine_records(m, "tensorrt")
    opt_shapes: dict[str, list[int]] = {}
    for r in recs:
        for name, prof in r.profiles.items():
            opt_shapes.setdefault(name, prof[1])
    out = {}
    for t in m.inputs:
        shape = []
        for axis, dim in enumerate(t.shape):
            if axis == t.batch_axis:
                shape.append(want)
            elif isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif t.name in opt_shapes:
                shape.append(int(opt_shapes[t.name][axis]))
            else:
                raise DataError(f"model input '{t.name}' has a symbolic dim ({dim}) at axis {axis}: "
                                f"pass --data with sample inputs")
        dtype = np.dtype(t.dtype)
        if np.issubdtype(dtype, np.floating):
            out[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[t.name] = np.ones(shape, dtype)
        else:
            out[t.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def _make_backend(b: Bundle, backend: str, **options: Any) -> Any:
    """A :class:`SegmentBackend` for ``backend`` (TensorRT here; ONNX Runtime from its own module)."""
    if backend == "tensorrt":
        from eecompile.runtimes.tensorrt import TensorRTBackend

        return TensorRTBackend(b, **options)
    if backend == "onnxruntime":
        import importlib

        from eecompile.runtimes.base import SegmentBackend

        try:
            mod = importlib.import_module("eecompile.runtimes.onnxruntime")
        except ImportError as e:
            raise BackendError(f"the ONNX Runtime backend is not available ({e})") from e
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, SegmentBackend) and obj is not SegmentBackend \
                    and obj.__module__ == mod.__name__:
                return obj(b, **options)
        raise BackendError("eecompile.runtimes.onnxruntime defines no SegmentBackend")
    raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
