"""One factory for ONNX Runtime ``SessionOptions``: every session eecompile makes is configured here.

The runner's sessions, calibration's latency timing, ``bench``'s unsplit model, the compiler's verify and probe
sessions and the build step all call :func:`session_options`, so thread settings and optimisation levels are the
same wherever a ratio is measured.

Thread settings (measured on a 2-core CPU, 3-segment MLP chain): per-session pools that *sleep* between runs
(``allow_spinning=0``); segments run one after another, and a pool spinning after its run steals the cores the
next segment's pool needs (a chain 3x slower). Imports onnxruntime only, lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eecompile.errors import BackendError

OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def import_onnxruntime() -> Any:
    """``import onnxruntime`` with an error that says how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(f"onnxruntime is not installed ({e}); `pip install onnxruntime` (or onnxruntime-gpu; "
                           f"on a Jetson the wheel from the Jetson AI Lab index)") from e
    return ort


def user_cache_dir(*parts: str) -> Path:
    """eecompile's cache directory for this user, outside every bundle (a bundle is never written at run time: that
    would break its signature and its sha256 records): ``$EECOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/eecompile``,
    else ``~/.cache/eecompile``; ``parts`` are joined below it. Not created here."""
    env = os.environ.get("EECOMPILE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eecompile"
    return base.joinpath(*parts)


def default_threads() -> int:
    """The cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def session_options(threads: int | None = None, *, optimization: str | int = "all", shared_pool: bool = False,
                    disabled_optimizers: Sequence[str] = (), log_severity: int = 3,
                    external_data_dir: str | None = None, prepack: bool = True) -> Any:
    """An ``onnxruntime.SessionOptions``.

    ``threads``: intra-op threads (default: the cores this process may use; ``0`` leaves ORT's own default),
    one inter-op thread, sequential execution, no spinning. ``shared_pool``: use the process-wide pools instead
    (``use_per_session_threads = False``; the threads are then set with ``set_global_thread_pool_sizes``).
    ``optimization``: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"`` (ORT's graph optimisation level; the
    enum names such as ``"ORT_DISABLE_ALL"`` work too), or a ``GraphOptimizationLevel``. ``disabled_optimizers``: ORT rewrites to skip by name.
    ``log_severity``: 0 verbose .. 4 fatal. ``external_data_dir``: where weights stored outside a model loaded
    from bytes live. ``prepack=False`` turns MLAS weight prepacking off (``session.disable_prepacking``): each
    MatMul/Conv weight is then held once, as stored, instead of beside a packed copy made per node and per session
    (what makes a runner of a shared-weight model hold ~3x the model's weights), at a CPU cost measured in
    ``benchmarks/README.md`` ("Shared weights"). Raises :class:`BackendError` when onnxruntime is missing or an
    argument is invalid."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    if isinstance(optimization, str):
        level = OPTIMIZATION_LEVELS.get(optimization, optimization)
        if level not in OPTIMIZATION_LEVELS.values():
            raise BackendError(f"optimization '{optimization}' is not one of {', '.join(OPTIMIZATION_LEVELS)}")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    else:
        so.graph_optimization_level = optimization
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = int(log_severity)
    if shared_pool:
        so.use_per_session_threads = False
    else:
        if threads is None:
            threads = default_threads()
        if threads < 0:
            raise BackendError(f"threads must be >= 1 (or 0 for ONNX Runtime's default), got {threads}")
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if disabled_optimizers:
        so.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(disabled_optimizers))
    if external_data_dir:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so
