"""Latency of leaving at each exit, measured through the runtime on the backend, and of the unsplit model."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BackendError
from eecompile.runtimes.bench import find_source_model
from eecompile.runtimes.data import batch_size_of, take_samples
from eecompile.runtimes.sessions import session_options as _session_options

if TYPE_CHECKING:
    import onnxruntime

    from eecompile.runtimes.chain import EarlyExitRunner


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """ORT options for measuring (:func:`eecompile.runtimes.sessions.session_options`: no spinning, one inter-op
    thread; ``threads`` None leaves ONNX Runtime's default)."""
    return _session_options(threads or 0)


def time_interleaved(calls: Sequence[Callable[[], Any]], *, rounds: int = 100, warmup: int = 3,
                     min_block_s: float = 10e-3, budget_s: float = 6.0, min_rounds: int = 7,
                     reference: int | None = None, warm_per_block: int = 1) -> list[float]:
    """Median seconds per call of each of ``calls``, measured in interleaved rounds.

    Each round times one block of every callable, in an order rotated from round to round, so slow drifts
    of the machine (frequency, other processes) fall on all of them alike; a block repeats the call enough
    times to last about ``min_block_s`` (timer resolution and one-off stalls then weigh little), after
    ``warm_per_block`` untimed calls: the block then measures the call as it runs in a process that does nothing
    else, not the first call after another callable evicted its weights from the CPU caches (on a 14 MB MLP at
    batch 1 that first call costs 1.5-2x, and a 2 ms block of 5 calls read the unsplit model 30% slow). The result
    is the median over rounds of block time / calls per block. With ``reference`` (an index into ``calls``),
    the others are paired with it round by round: call i's result is ``median_r(t_i,r / t_ref,r) *
    median_r(t_ref,r)``, so ratios to the reference do not move with the load of the machine between rounds.
    Stops after ``rounds`` rounds, or once ``budget_s`` seconds have passed and at least ``min_rounds`` rounds
    are done.
    """
    if not calls:
        return []
    single = []
    for f in calls:
        for _ in range(warmup):
            f()
        t0 = time.perf_counter()
        f()
        single.append(max(time.perf_counter() - t0, 1e-7))
    inner = [max(1, math.ceil(min_block_s / t)) for t in single]
    times: list[list[float]] = [[] for _ in calls]
    t_end = time.perf_counter() + budget_s
    for r in range(max(rounds, 1)):
        for j in range(len(calls)):
            i = (j + r) % len(calls)
            f, m = calls[i], inner[i]
            for _ in range(warm_per_block):
                f()
            t0 = time.perf_counter()
            for _ in range(m):
                f()
            times[i].append((time.perf_counter() - t0) / m)
        if r + 1 >= min_rounds and time.perf_counter() > t_end:
            break
    if reference is None:
        return [statistics.median(t) for t in times]
    ref = np.asarray(times[reference])
    ref_median = float(np.median(ref))
    return [float(np.median(np.asarray(t) / ref)) * ref_median for t in times]


def measure_latency(bundle: Bundle, inputs: Mapping[str, np.ndarray], *, backend: str = "onnxruntime",
                    batch_size: int = 1, repeats: int = 100, threads: int | None = None,
                    reference_model: str | Path | None = None,
                    runner: EarlyExitRunner | None = None,
                    settings: Sequence[Sequence[float | str]] | None = None) -> tuple[list[float], float | None]:
    """Median seconds to leave at each exit at ``batch_size`` on ``backend``, and of the unsplit model.

    Exit k is timed through the runtime itself (``EarlyExitRunner.run`` with exit k forced: earlier gates
    "never", gate k "always"), so the cost model includes what a real call pays: input checks, every
    segment up to k, gate read-back, scatter. The unsplit model (ONNX Runtime only: ``reference_model``, or
    :func:`find_source_model`) is timed in the same interleaved rounds (:func:`time_interleaved`, up to
    ``repeats`` rounds) with the same thread settings, so the ratio is fair. ``runner``: reuse this runner
    (its backend) instead of creating one. ``settings``: thresholds to time instead, one list per path (a bundle
    with jump exits times each of its ends: :func:`eecompile.calibrate.jumps.end_settings`, through its
    :class:`~eecompile.runtimes.jumps.JumpRunner` given as ``runner``); their costs are returned as measured.

    Returns (cumulative seconds to leave at each exit, one per exit, non-decreasing; seconds of the unsplit
    model or None when it was not timed). Raises BackendError when the unsplit model cannot be loaded.
    """
    from eecompile.runtimes.chain import EarlyExitRunner

    axes = {t.name: t.batch_axis for t in bundle.manifest.inputs}
    n = batch_size_of(dict(inputs), bundle.manifest.inputs, "calibration data")
    b = min(batch_size, n)
    batch = {k: np.ascontiguousarray(take_samples(v, slice(0, b), axes.get(k))) for k, v in inputs.items()}
    own = runner is None
    if runner is None:
        options: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
        runner = EarlyExitRunner(bundle, backend=backend, **options)
    e = len(bundle.manifest.segments) - 1
    chain = settings is None
    if settings is None:
        settings = [["always" if j == k else "never" for j in range(e)] for k in range(e + 1)]
    calls: list[Callable[[], Any]] = []
    for forced in settings:

        def call(f: Sequence[float | str] = forced, r: EarlyExitRunner = runner) -> Any:
            # The segments, always: reaching the final exit costs every gate on the way (with every gate
            # "never" the runner would otherwise take its no-exit path, which skips them).
            return r.run(batch, thresholds=list(f), no_exit_path=False) if chain else r.run(batch, thresholds=list(f))

        calls.append(call)
    sess = unsplit_session(bundle, reference_model, backend, threads)
    if sess is not None:
        feeds = {i.name: batch[i.name] for i in sess.get_inputs()}
        calls.append(lambda: sess.run(None, feeds))
    try:
        # Paired with the unsplit model when it is timed (the speedup is a ratio to it), else the whole chain.
        med = time_interleaved(calls, rounds=repeats, reference=len(calls) - 1)
    finally:
        if own:
            runner.close()
    k = len(settings)
    cum, full = med[:k], (med[k] if len(med) > k else None)
    # A later exit never costs less than an earlier one (timing noise can say otherwise at tiny sizes).
    return (list(np.maximum.accumulate(np.asarray(cum))) if chain else list(cum)), full


def unsplit_session(bundle: Bundle, reference_model: str | Path | None, backend: str,
                    threads: int | None) -> Any:
    """An ONNX Runtime CPU session on the unsplit model (``reference_model``, or :func:`find_source_model`) with
    the runner's thread settings, or None when there is none to time or ``backend`` is not ONNX Runtime. Raises
    BackendError when the model cannot be loaded."""
    src = Path(reference_model) if reference_model is not None else find_source_model(bundle)
    if src is None or backend != "onnxruntime":
        return None
    import onnxruntime as ort

    from eecompile.runtimes.onnxruntime import default_threads

    try:
        return ort.InferenceSession(str(src), session_options(threads or default_threads()),
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own types; name the file instead
        raise BackendError(f"{src}: ONNX Runtime cannot load the unsplit model ({err})") from err


@dataclass
class StreamTiming:
    """The chosen thresholds timed on the calibration data as ``eecompile bench`` times a bundle: one block is a
    pass over ``n_batches`` consecutive batches (each sample takes its own path, so a deep sample after shallow
    ones finds the deep segments' weights out of the CPU caches, as in use), the callables take turns round by
    round (order reversed every other round), ratios are per round. Times are ms per call of ``batch_size``
    rows; speedups are ``{median, min, max, rounds}`` of the reference's time over the chain's."""

    chain_ms: float
    never_ms: float
    unsplit_ms: float | None
    speedup: dict[str, float | int] | None  # unsplit / chain; None when the unsplit model was not timed
    never_speedup: dict[str, float | int]  # every gate "never" (the no-exit engine where there is one) / chain
    n_batches: int
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        """Plain types (``manifest.calibration.measured``)."""
        from dataclasses import asdict

        return asdict(self)


def measure_stream(runner: EarlyExitRunner, inputs: Mapping[str, np.ndarray], thresholds: Sequence[float], *,
                   batch_size: int = 1, unsplit: Any = None, budget_s: float = 3.0, min_rounds: int = 5,
                   max_rounds: int = 25, max_batches: int = 128, min_batches: int = 16,
                   pass_s: float = 0.3, rows: np.ndarray | None = None) -> StreamTiming:
    """Time ``thresholds`` on consecutive batches of ``inputs`` through ``runner`` against the same runner with
    every gate "never" and the ``unsplit`` session (an ``onnxruntime.InferenceSession`` or None), in paired rounds
    (:func:`eecompile.runtimes.bench.paired_blocks`, the method of ``eecompile bench``).

    Batches: as many of ``batch_size`` rows as make one pass of the unsplit model (or of the never path) last
    about ``pass_s`` seconds, at least ``min_batches`` while a pass stays within ``4 * pass_s`` (so a model taking
    a second per batch is timed on one batch, not sixteen), at most ``max_batches`` and the data; made of the
    samples ``rows`` in that order (default: in data order; :func:`~eecompile.runtimes.bench.stratified_rows` keeps
    the exit mix of the whole data). Rounds: as many as fit ``budget_s``, within [``min_rounds``, ``max_rounds``].
    Returns a :class:`StreamTiming`; raises what the runner raises."""
    from eecompile.runtimes.bench import WARM_BATCHES, over_batches, paired_blocks, ratio_stats

    axes = {t.name: t.batch_axis for t in runner.bundle.manifest.inputs}
    n = batch_size_of(dict(inputs), runner.bundle.manifest.inputs, "calibration data")
    bs = max(1, min(batch_size, n))
    order = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    cut = [{k: np.ascontiguousarray(take_samples(v, order[lo:lo + bs], axes.get(k))) for k, v in inputs.items()}
           for lo in range(0, order.size - bs + 1, bs)][:max_batches]
    thr = list(thresholds)
    in_names = [i.name for i in unsplit.get_inputs()] if unsplit is not None else []

    def chain(f: Mapping[str, np.ndarray]) -> Any:
        return runner.run(f, thresholds=thr)

    def never(f: Mapping[str, np.ndarray]) -> Any:
        return runner.run(f, thresholds="never")

    def whole(f: Mapping[str, np.ndarray]) -> Any:
        return unsplit.run(None, {k: f[k] for k in in_names})

    probe = over_batches(whole if unsplit is not None else never, cut[:1])
    probe()
    t0 = time.perf_counter()
    probe()
    one = max(time.perf_counter() - t0, 1e-7)
    # At least min_batches where that keeps a pass within 4 x pass_s (a heavy model at a large batch: fewer, down to 1).
    k = int(min(len(cut), max_batches, max(1, round(pass_s / one), min(min_batches, round(4 * pass_s / one)))))
    batches = cut[:k]
    calls: dict[str, Callable[[Mapping[str, np.ndarray]], Any]] = {"chain": chain, "never": never}
    if unsplit is not None:
        calls["unsplit"] = whole
    fns = {name: over_batches(call, batches) for name, call in calls.items()}
    for f in fns.values():  # warm-up, and the length of one round
        f()
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    per_round = max(time.perf_counter() - t0, 1e-7)
    rounds = int(min(max_rounds, max(min_rounds, budget_s // per_round)))
    warm = {name: over_batches(call, batches[:WARM_BATCHES]) for name, call in calls.items()}
    timed = paired_blocks(fns, calls=1, rounds=rounds, warmup=0, before_block=warm)
    ms = {name: statistics.median(b.wall) * 1e3 / len(batches) for name, b in timed.items()}
    c = timed["chain"].wall
    return StreamTiming(
        chain_ms=ms["chain"], never_ms=ms["never"], unsplit_ms=ms.get("unsplit"),
        speedup=ratio_stats(timed["unsplit"].wall, c) if unsplit is not None else None,
        never_speedup=ratio_stats(timed["never"].wall, c), n_batches=len(batches), rounds=rounds)


def time_chosen(bundle: Bundle, inputs: Mapping[str, np.ndarray], thresholds: Sequence[float], *,
                backend: str = "onnxruntime", batch_size: int = 1, threads: int | None = None,
                reference_model: str | Path | None = None, **options: Any) -> StreamTiming:
    """:func:`measure_stream` on a runner of ``bundle`` made for it (closed after), against the unsplit model
    (:func:`unsplit_session`) where there is one to time. Raises what the runner and :func:`unsplit_session`
    raise."""
    from eecompile.runtimes.chain import EarlyExitRunner

    kw: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
    runner = EarlyExitRunner(bundle, backend=backend, **kw)
    try:
        unsplit = unsplit_session(bundle, reference_model, backend, threads)
        return measure_stream(runner, inputs, thresholds, batch_size=batch_size, unsplit=unsplit, **options)
    finally:
        runner.close()
