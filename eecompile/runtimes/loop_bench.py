"""Timing a loop bundle (``eecompile bench`` on a bundle with ``manifest.loop``): the loop with its gate against the
same loop run for all N steps, with the method of :mod:`eecompile.runtimes.bench` (warmed-up blocks, the functions
taking turns every round, per-round paired ratios).

References, each the same :class:`~eecompile.runtimes.loop.LoopRunner` on the same batches at the same N (``steps``,
default the bundle's ``loop.steps``; ``eecompile bench --steps N``):

* ``gates-never``: every sample runs all N steps and no gate fires, the loop gate nor the layer exits inside the
  step (the sampler as written, without early exit); the headline;
* ``loop-never``: all N steps with the layer exits at the bundle's thresholds (only when the step has layer
  exits): what the loop gate alone saves.

The report adds ``loop`` (N, the mean steps taken, the samples stopping after each step) and counts the exit
histogram in sample-steps (each step's chain is one pass through the layer exits). The unsplit model is not timed:
it is one step of the loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import DataError
from eecompile.runtimes.bench import BenchReport, _percentiles, paired_blocks, ratio_stats
from eecompile.runtimes.loop import LoopRunner, open_loop_data
from eecompile.runtimes.sessions import default_threads

__all__ = ["bench_loop"]


def bench_loop(bundle: Bundle, data: str | Path, *, batch_size: int = 1, backend: str = "onnxruntime",
               repeats: int = 20, threads: int | None = None, max_batches: int = 64, thresholds: Any = None,
               warmup: int = 1, steps: int | None = None) -> BenchReport:
    """Benchmark loop bundle ``bundle`` on the loop inputs in ``data`` (an .npz; see the module docstring).

    One round runs up to ``max_batches`` batches of ``batch_size`` through the loop (the bundle's loop gate and,
    ``thresholds`` None, its layer exits' thresholds; policy compact), then through each reference; ``repeats``
    rounds after ``warmup``; every run takes ``steps`` steps at most (None: the bundle's ``loop.steps``). Returns a :class:`~eecompile.runtimes.bench.BenchReport` (ms per batch, samples/s;
    ``speedup``: the time of ``gates-never`` over the loop's, per round). Raises :class:`DataError` (data, batch,
    repeats, steps; an array named after a per-step input) and what the runner raises."""
    if batch_size < 1:
        raise DataError(f"--batch must be >= 1, got {batch_size}")
    if repeats < 1:
        raise DataError(f"--repeats must be >= 1, got {repeats}")
    n_threads = threads or default_threads()
    options: dict[str, Any] = {"threads": n_threads} if backend == "onnxruntime" else {}
    notes = ["unsplit model not timed: it is one step of the loop; the references run the loop for all steps"]
    with LoopRunner(bundle, backend=backend, **options) as runner:
        n_steps = runner._steps(steps)
        with open_loop_data(runner, data) as dataset:
            batches: list[dict[str, np.ndarray]] = []
            for f in dataset.batches(batch_size):
                if len(batches) == max_batches:
                    notes.append(f"timed the first {max_batches} batches of {-(-len(dataset) // batch_size)}")
                    break
                batches.append({k: np.ascontiguousarray(v) for k, v in f.items()})
        k_all = runner.chain.n_exits
        step_hist = np.zeros(n_steps, np.int64)
        exit_hist = np.zeros(k_all, np.int64)
        n = 0
        for f in batches:
            r = runner.run(f, steps=n_steps, thresholds=thresholds)
            step_hist += r.step_counts
            exit_hist += r.exit_counts.sum(axis=0)
            n += r.n_samples
        m = bundle.manifest
        total = max(int(exit_hist.sum()), 1)
        exit_histogram = [{"index": k, "name": s.exit.name or ("final" if k == k_all - 1 else None),
                           "count": int(c), "share": float(c) / total}
                          for k, (s, c) in enumerate(zip(m.segments, exit_hist, strict=True))]
        loop_samples: list[float] = []

        def loop_pass() -> None:
            for f in batches:
                t0 = time.perf_counter()
                runner.run(f, steps=n_steps, thresholds=thresholds)
                loop_samples.append(time.perf_counter() - t0)

        def over_batches(**kw: Any) -> Callable[[], object]:
            def one_pass() -> None:
                for f in batches:
                    runner.run(f, steps=n_steps, **kw)
            return one_pass

        fns: dict[str, Callable[[], object]] = {
            "loop": loop_pass,
            "gates-never": over_batches(thresholds="never", loop_threshold="never"),
        }
        descriptions = {"gates-never": f"the same loop for all {n_steps} steps, no gate firing (the loop gate nor "
                                       f"the layer exits)"}
        if k_all > 1:
            fns["loop-never"] = over_batches(thresholds=thresholds, loop_threshold="never")
            descriptions["loop-never"] = (f"the same loop for all {n_steps} steps, the layer exits at their "
                                          f"thresholds")
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        loop_samples.clear()
        timed = paired_blocks(fns, calls=1, rounds=repeats, warmup=0)
    wall = timed["loop"].wall
    references: list[dict[str, Any]] = [{"name": name, "description": descriptions[name],
                   "latency_ms_p50": statistics.median(timed[name].wall) * 1e3 / len(batches),
                   "speedup": ratio_stats(timed[name].wall, wall)} for name in fns if name != "loop"]
    return BenchReport(
        bundle=str(bundle.path), data=str(data), backend=backend, batch_size=batch_size, n_samples=n,
        n_batches=len(batches), repeats=repeats, threads=n_threads if backend == "onnxruntime" else None,
        latency_ms=_percentiles(loop_samples), throughput=n / statistics.median(wall), exit_histogram=exit_histogram,
        references=references, reference="gates-never", speedup=dict(references[0]["speedup"]), notes=notes,
        loop={"steps": n_steps, "mean_steps": float((np.arange(1, n_steps + 1) * step_hist).sum()) / max(n, 1),
              "step_histogram": step_hist.tolist(), "loop_threshold": runner.gate["threshold"] if runner.gate
              else None})
