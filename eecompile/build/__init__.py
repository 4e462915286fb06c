"""``eecompile build`` and ``eecompile verify``: engines per segment for a backend, and their parity check.

- :mod:`eecompile.build.onnxruntime`: ONNX Runtime CPU engines (ORT-optimised segments, NCHWc across cuts,
  :mod:`eecompile.build.ort_layout`);
- :mod:`eecompile.build.tensorrt`: TensorRT engines and their optimisation profiles (fp16 on TensorRT 11 through
  :mod:`eecompile.build.to_fp16`);
- :mod:`eecompile.build.parity`: the backend-vs-ONNX-Runtime-CPU check (``eecompile verify``);
- :mod:`eecompile.build.report`: what a build or a check did.

The engine records these write live on the runtime side (:mod:`eecompile.runtimes.records`): a device reads
them without the compiler. The build side may import the runtime; the runtime never imports this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from eecompile.build.onnxruntime import build_onnxruntime, build_onnxruntime_cache
from eecompile.build.parity import verify_backend
from eecompile.build.report import BuildReport, VerifyReport, VerifyRow
from eecompile.build.tensorrt import build_tensorrt, compute_profiles, default_timing_cache
from eecompile.bundle import Bundle
from eecompile.errors import BackendError
from eecompile.runtimes.base import BACKENDS, check_classifier_bundle

__all__ = ["BACKENDS", "BuildReport", "VerifyReport", "VerifyRow", "build_engines", "compute_profiles",
           "default_timing_cache", "verify_backend"]


def build_engines(bundle: str | Path, backend: str = "tensorrt", fp16: bool = False, max_batch: int = 32,
                  opt_batch: int | None = None, workspace_mb: int = 1024, timing_cache: str | Path | None = None,
                  data: str | Path | None = None, dim_sizes: Mapping[str, int | Sequence[int]] | None = None,
                  device: int = 0, cache: bool = False) -> BuildReport:
    """Build one engine per segment for ``backend`` and record them in the bundle (atomic update). ``cache``
    (ONNX Runtime only): write them into the user's engine cache instead and leave the bundle untouched
    (:func:`eecompile.build.onnxruntime.build_onnxruntime_cache`)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    path = Path(bundle)
    if max_batch < 1 or (opt_batch is not None and not 1 <= opt_batch <= max_batch):
        raise BackendError(f"--max-batch must be >= 1 and --opt-batch in [1, --max-batch], got {max_batch} and "
                           f"{opt_batch}")
    check_classifier_bundle(Bundle.load(path, verify=False), "eecompile build")
    if backend == "onnxruntime":
        return build_onnxruntime_cache(path, max_batch) if cache else build_onnxruntime(path, max_batch)
    if cache:
        raise BackendError("--cache keeps ONNX Runtime CPU engines outside the bundle; TensorRT engines are "
                           "recorded in the bundle (build them on the device that runs it)")
    return build_tensorrt(path, fp16=fp16, max_batch=max_batch, opt_batch=opt_batch, workspace_mb=workspace_mb,
                           timing_cache=timing_cache, data=data, dim_sizes=dim_sizes, device=device)
