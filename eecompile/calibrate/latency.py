"""Latency of leaving at each exit, measured through the runtime on the backend, and of the unsplit model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eecompile.bundle import Bundle, sha256_file
from eecompile.errors import BackendError

if TYPE_CHECKING:
    import onnxruntime


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """ORT options for measuring: no spinning (sessions run one after another and would fight for cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def _time_session(run: Callable[[], Any], repeats: int, warmup: int = 5, budget_s: float = 3.0) -> float:
    """Median seconds of ``run`` over a block of repeats after warm-up (stops early past ``budget_s``)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 5:
            break
    return statistics.median(times)


def find_source_model(bundle: Bundle) -> Path | None:
    """The unsplit model the bundle came from, when it is still where the manifest says (same sha256)."""
    src = bundle.manifest.source_model or {}
    name = src.get("file") or src.get("path")
    if not name:
        return None
    for p in (Path(name), bundle.path / name, bundle.path.parent / name):
        if p.is_file() and (not src.get("sha256") or sha256_file(p) == src["sha256"]):
            return p
    return None


def measure_latency(bundle: Bundle, inputs: Mapping[str, np.ndarray], *, backend: str = "onnxruntime",
                    batch_size: int = 1, repeats: int = 100, threads: int | None = None,
                    reference_model: str | Path | None = None) -> tuple[list[float], float | None]:
    """Median seconds to leave at each exit at ``batch_size`` on ``backend``, and of the unsplit model.

    Exit k is timed through the runtime itself (``EarlyExitRunner.run`` with exit k forced: earlier gates
    "never", gate k "always"), so the cost model includes what a real call pays: input checks, every
    segment up to k, gate read-back, scatter. The unsplit model (ONNX Runtime only) is timed in the same run
    with the same thread settings, so the ratio is fair. Returns cumulative seconds per exit.
    """
    import onnxruntime as ort

    from eecompile.runtimes.chain import EarlyExitRunner
    from eecompile.runtimes.onnxruntime import default_threads

    n = next(iter(inputs.values())).shape[0]
    b = min(batch_size, n)
    batch = {k: np.ascontiguousarray(v[:b]) for k, v in inputs.items()}
    options: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
    runner = EarlyExitRunner(bundle, backend=backend, **options)
    e = len(bundle.manifest.segments) - 1
    cum: list[float] = []
    try:
        for k in range(e + 1):
            forced: list[float | str] = ["never"] * e
            if k < e:
                forced[k] = "always"

            def call(f: list[float | str] = forced) -> Any:
                return runner.run(batch, thresholds=f)

            cum.append(_time_session(call, repeats))
    finally:
        runner.close()
    full: float | None = None
    src = Path(reference_model) if reference_model is not None else find_source_model(bundle)
    if src is not None and backend == "onnxruntime":
        try:
            sess = ort.InferenceSession(str(src), session_options(threads or default_threads()),
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; name the file instead
            raise BackendError(f"{src}: ONNX Runtime cannot load the unsplit model ({e})") from e
        feeds = {i.name: batch[i.name] for i in sess.get_inputs()}
        full = _time_session(lambda: sess.run(None, feeds), repeats)
    # A later exit never costs less than an earlier one (timing noise can say otherwise at tiny sizes).
    return list(np.maximum.accumulate(np.asarray(cum))), full
