"""Many requests, one runner call: stack the requests' samples, run the compacting chain once, and hand each
request its rows back as soon as its last sample has exited.

The runner reports rows as they leave (``on_exit(k, rows, outputs)``, rows in the stacked batch's order), so a
request whose samples all left at exit 0 is answered while the deeper segments still run for the others.
Where the runner cannot report rows (a backend without ``on_exit``), every request is answered when the call
returns. A loop bundle's requests (:class:`~eecompile.runtimes.loop.LoopRunner`, grouped by steps and loop
threshold too) are answered when their call returns, with the steps each sample ran. Numpy only (no Ray): the Ray
Serve deployment and Triton's Python model both use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eecompile.bundle import TensorInfo
from eecompile.serve.protocol import PredictRequest


@dataclass
class Answer:
    """One request's result: final outputs (model layout, its own rows) and each sample's exit; for end-only
    outputs (``manifest.end_only``) ``present``: name -> (bool [n], True where the sample reached the final exit
    and so has a row (the others are NaN, 0 for non-float outputs), that output's batch axis); for a bundle with
    jump exits ``jumped``: int64 [n], the jump exit each sample took (-1 for none), else None."""

    outputs: dict[str, np.ndarray]
    exit_index: np.ndarray | None  # int64 [n]; None for a loop's answer (each step has its own exits)
    present: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    jumped: np.ndarray | None = None
    steps: np.ndarray | None = None  # loops: int64 [n], the steps each sample ran


@dataclass
class _Pending:
    start: int
    n: int
    left: int
    exit_index: np.ndarray
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # batch first


class RowCollector:
    """Scatters exited rows into per-request buffers; calls ``done(i, answer)`` when request ``i`` is whole.

    ``sizes``: samples per request, in stacking order; ``out_axes``: batch axis of each final output;
    ``end_only``: outputs only the final exit (index ``final``) gives, name -> (per-sample shape, dtype): for a
    request's samples that left earlier their rows are NaN (0 for non-float dtypes) and ``Answer.present`` says so."""

    def __init__(self, sizes: Sequence[int], out_axes: dict[str, int],
                 done: Callable[[int, Answer], None],
                 end_only: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None, final: int = -1) -> None:
        self._starts = np.cumsum([0, *sizes])[:-1]
        self._pending = [_Pending(int(s), int(n), int(n), np.empty(int(n), dtype=np.int64))
                         for s, n in zip(self._starts, sizes, strict=True)]
        self._out_axes = out_axes
        self._done = done
        self._end_only = dict(end_only or {})
        self._final = final
        self.jumped: np.ndarray | None = None  # jump bundles: the stacked batch's RunResult.jumped, once known

    def on_exit(self, k: int, rows: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Rows ``rows`` (indices into the stacked batch) left at exit ``k`` with ``outputs`` (batch first)."""
        if rows.size == 0:
            return
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        for i in np.unique(owner):
            p = self._pending[int(i)]
            sel = owner == i
            local = rows[sel] - p.start
            for name, a in outputs.items():
                if name not in p.rows:
                    p.rows[name] = np.empty((p.n, *a.shape[1:]), dtype=a.dtype)
                p.rows[name][local] = a[sel]
            p.exit_index[local] = k
            p.left -= int(local.size)
            if p.left == 0:
                present = self._fill_absent(p)
                outs = {name: (a if self._out_axes[name] == 0 else np.moveaxis(a, 0, self._out_axes[name]))
                        for name, a in p.rows.items()}
                jumped = None if self.jumped is None else self.jumped[p.start:p.start + p.n]
                self._done(int(i), Answer(outs, p.exit_index, present, jumped))

    def _fill_absent(self, p: _Pending) -> dict[str, tuple[np.ndarray, int]]:
        present = {}
        for name, (shape, dtype) in self._end_only.items():
            reached = p.exit_index == self._final
            a = p.rows.get(name)
            if a is None:
                a = p.rows[name] = np.empty((p.n, *shape), dtype)
            a[~reached] = np.nan if a.dtype.kind in "fc" else 0
            present[name] = (reached, self._out_axes[name])
        return present


def stack_feeds(requests: Sequence[PredictRequest], inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Concatenate the requests' inputs along each batch axis (batch-free inputs are equal across a group)."""
    if len(requests) == 1:
        return requests[0].feeds
    return {t.name: (requests[0].feeds[t.name] if t.batch_axis is None
                     else np.concatenate([r.feeds[t.name] for r in requests], axis=t.batch_axis))
            for t in inputs}


def reports_rows(runner: Any) -> bool:
    """Whether ``runner.run`` can report rows as they exit (an ``on_exit`` parameter)."""
    try:
        return "on_exit" in inspect.signature(runner.run).parameters
    except (TypeError, ValueError):
        return False


def run_group(runner: Any, requests: Sequence[PredictRequest], done: Callable[[int, Answer], None]) -> Any:
    """Run requests that share thresholds in one call; ``done(i, answer)`` for each as it completes.

    Returns the runner's RunResult (its ``exit_counts`` and ``timings`` feed the metrics; a LoopResult for a loop).
    """
    m = runner.manifest
    if getattr(m, "loop", None) is not None:
        return run_loop_group(runner, requests, done)
    out_axes = {t.name: (t.batch_axis or 0) for t in m.outputs}
    end_only = {t.name: (tuple(d if isinstance(d, int) else 0 for i, d in enumerate(t.shape) if i != out_axes[t.name]),
                         np.dtype(t.dtype)) for t in m.outputs if t.name in set(getattr(m, "end_only", ()))}
    collector = RowCollector([r.n for r in requests], out_axes, done, end_only, final=len(m.segments) - 1)
    feeds = stack_feeds(requests, runner.inputs)
    thresholds = list(requests[0].thresholds) if requests[0].thresholds is not None else None
    if reports_rows(runner):
        return runner.run(feeds, thresholds=thresholds, policy="compact", on_exit=collector.on_exit)
    result = runner.run(feeds, thresholds=thresholds, policy="compact")
    collector.jumped = getattr(result, "jumped", None)  # JumpRunner (it answers when the call returns)
    for k in range(len(result.exit_counts)):
        rows = np.flatnonzero(result.exit_index == k)
        collector.on_exit(k, rows, {name: np.moveaxis(a, out_axes[name], 0)[rows]
                                    for name, a in result.outputs.items()
                                    if name not in end_only or k == len(m.segments) - 1})
    return result


def run_loop_group(runner: Any, requests: Sequence[PredictRequest], done: Callable[[int, Answer], None]) -> Any:
    """A loop bundle's requests that share steps and thresholds in one :meth:`LoopRunner.run` call; each gets its
    rows of the loop's results (on their batch axes) and its samples' steps. Returns the LoopResult."""
    r = requests[0]
    result = runner.run(stack_feeds(requests, runner.inputs), steps=r.steps,
                        thresholds=list(r.thresholds) if r.thresholds is not None else None,
                        loop_threshold=list(r.loop_threshold) if isinstance(r.loop_threshold, tuple)
                        else r.loop_threshold, policy="compact")
    axes = {t.name: (t.batch_axis or 0) for t in runner.results}
    start = 0
    for i, req in enumerate(requests):
        rows = np.arange(start, start + req.n)
        outs = {name: np.take(a, rows, axis=axes[name]) for name, a in result.outputs.items()}
        done(i, Answer(outs, None, steps=result.steps[rows]))
        start += req.n
    return result


def group_requests(requests: Sequence[PredictRequest], inputs: Sequence[TensorInfo]) -> list[list[int]]:
    """Indices of the requests that can share a runner call, in arrival order."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group_key(inputs), []).append(i)
    return list(groups.values())
