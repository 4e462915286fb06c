"""TensorRT engines: one serialized engine per segment, ``engines/seg{k}.tensorrt.{target}.plan``.

``target`` names the GPU architecture and TensorRT version (``sm90-trt10.13``): TensorRT engines run only on the
TensorRT version and GPU that built them. Each engine gets an :class:`~eecompile.runtimes.records.EngineRecord`
in ``manifest.engines``.

Two TensorRT API generations are supported and detected from ``tensorrt.__version__``:
  * 10.x (JetPack 6): ``--fp16`` sets ``BuilderFlag.FP16`` and pins the gate layers, Softmax, reductions
    and normalisations to fp32 (``PREFER_PRECISION_CONSTRAINTS``);
  * 11.x: precision flags are gone and networks are strongly typed, so ``--fp16`` first converts each
    segment ONNX to fp16 (:mod:`eecompile.build.to_fp16`, gate kept fp32, I/O dtypes unchanged).

Everything that needs no GPU (profiles, version dispatch, file names) is pure and tested on CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.build.report import BuildReport
from eecompile.bundle import Bundle, Manifest, TensorInfo, sha256_bytes, update_bundle
from eecompile.errors import BackendError, DataError
from eecompile.names import is_gate_node
from eecompile.runtimes.records import (
    EngineRecord,
    TRTVersion,
    engine_file,
    engine_target,
    parse_trt_version,
    replace_engine_records,
)

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)


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
    from eecompile.runtimes.sessions import user_cache_dir

    return user_cache_dir(f"timing-{target}.cache")


def _data_shapes(data: str | Path | None) -> dict[str, tuple[int, ...]]:
    if data is None:
        return {}
    try:
        with np.load(data) as z:
            return {k: tuple(z[k].shape) for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{data}: cannot read the .npz ({e})") from e


def build_tensorrt(path: Path, *, fp16: bool, max_batch: int, opt_batch: int | None, workspace_mb: int,
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
        replace_engine_records(tmp, manifest, records, "tensorrt", target)

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
        if not is_gate_node(layer.name) and layer.type not in fp32_types:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not any(o.dtype in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j, o in enumerate(outs):
            if o.dtype in floats:
                layer.set_output_type(j, trt.float32)
