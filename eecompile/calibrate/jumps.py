"""Calibration data for bundles with jump exits (MuE's encoder–decoder exits; :mod:`eecompile.runtimes.jumps`).

A sample's answer there depends on its *path*: the jump exit it took (the decoder then reads that exit's head output
in place of the encoder output) and the exit it ended at afterwards. A *route* is one choice of jumps: for MuE's
two encoder exits, "jump at exit 0", "jump at exit 1" and "no jump". An *end* is a route and an exit a sample can
end at on it (a decoder exit, or the final exit).

:func:`collect_jump_table` runs the runner (policy ``never``) once per route, the route forced by overriding its
jump gates, and records each gate's score on each route and whether each end's answer agrees with the reference
(the labels, or the run without exits: the no-jump route's final exit). :class:`JumpTable` then sends each sample
down the route its jump gates choose and to the first ending exit that fires there, so the threshold search and
Learn-then-Test of :mod:`.search` and :mod:`.ltt` run on it unchanged: its "exits" are the ends, and a cost is
given per end: each timed through the runner along its own path (:func:`end_settings` for
:func:`~eecompile.calibrate.latency.measure_latency`), or summed from per-segment costs (:meth:`JumpTable.end_costs`).
A jump saves the segments between its exit and its target, not the rest of the network.

Imports numpy, the bundle reader and the runtime only (calibration runs on a device without onnx or torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, Manifest
from eecompile.calibrate.collect import (
    ExitTable,
    _batch_first,
    _rows,
    correctness,
    final_output,
    iter_batches,
    predictions,
    within_error_budget,
)
from eecompile.errors import BundleError, CalibrationError
from eecompile.spec import GateKind

__all__ = ["JumpTable", "Route", "collect_jump_table", "end_settings", "jump_exit_rows", "jump_routes"]


@dataclass(frozen=True)
class Route:
    """One choice of jumps through a bundle: ``taken``, the jump exits taken (segment indices, in order);
    ``jumps``, every jump exit on the route as (segment, taken); ``ends``, the segments a sample can end at on it
    (its gated ending exits, then the final segment)."""

    taken: tuple[int, ...]
    jumps: tuple[tuple[int, bool], ...]
    ends: tuple[int, ...]


def _gate_index(manifest: Manifest) -> dict[int, int]:
    """Segment index -> its gate's position among the thresholds (gated segments in order)."""
    gated = [k for k, s in enumerate(manifest.segments) if s.exit.gate is not None]
    return {k: g for g, k in enumerate(gated)}


def jump_routes(manifest: Manifest) -> list[Route]:
    """Every route through ``manifest``'s segments (``manifest.jumps``), depth first with a jump taken before it
    is passed: the route that takes no jump comes last."""
    segs = manifest.segments
    to = {int(j["exit"]): int(j["to"]) for j in manifest.jumps or ()}
    gated = _gate_index(manifest)
    routes: list[Route] = []

    def walk(k: int, taken: tuple[int, ...], jumps: tuple[tuple[int, bool], ...], ends: tuple[int, ...]) -> None:
        while k < len(segs) - 1:
            if k in to:
                walk(to[k], (*taken, k), (*jumps, (k, True)), ends)
                jumps = (*jumps, (k, False))
            elif k in gated:
                ends = (*ends, k)
            k += 1
        routes.append(Route(taken, jumps, (*ends, len(segs) - 1)))

    walk(0, (), (), ())
    return routes


def _setting(manifest: Manifest, route: Route, end: int | None = None) -> list[float | str]:
    """Thresholds (one per gated exit) that send every sample down ``route`` and, with ``end``, out at that exit:
    ``"always"`` at the jumps it takes and at ``end``, ``"never"`` at every other gate."""
    force = {*route.taken, end}
    return ["always" if k in force else "never" for k in _gate_index(manifest)]


def end_settings(table: JumpTable, manifest: Manifest) -> list[list[float | str]]:
    """One threshold setting per end of ``table`` (in its order), each forcing every sample down that end's
    route and out at its exit: what :func:`~eecompile.calibrate.latency.measure_latency` times."""
    return [_setting(manifest, route, end) for route in table.routes for end in route.ends]


@dataclass
class JumpTable(ExitTable):
    """An :class:`~eecompile.calibrate.collect.ExitTable` over the paths of a bundle with jump exits.

    ``scores[e, r, n]``: gated exit ``e``'s score (thresholds order) for sample n on route r (NaN where the route
    does not pass the exit); ``correct[j, n]``: end j's answer matches the reference, ends in route order and
    within a route in exit order, so the last end is the no-jump route's final exit (the run without exits);
    ``routes``: :func:`jump_routes`; ``gates``: the segment of each gated exit; ``jumps_to``: jump exit (segment)
    -> the segment it continues at. Set from those: ``end_segment`` and ``end_jump`` (int64 [ends]), the segment
    each end leaves at and the (last) jump exit its route takes, -1 for none (the runner's ``exit_index`` and
    ``jumped``)."""

    routes: list[Route] = field(default_factory=list)
    gates: list[int] = field(default_factory=list)
    jumps_to: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.correct = np.asarray(self.correct, dtype=bool)
        ends = sum(len(r.ends) for r in self.routes)
        if self.scores.shape[:2] != (len(self.gates), len(self.routes)) or self.scores.ndim != 3:
            raise CalibrationError(f"scores has shape {list(self.scores.shape)}; it must be [gated exits "
                                   f"({len(self.gates)}), routes ({len(self.routes)}), samples]")
        if self.correct.shape != (ends, self.scores.shape[2]):
            raise CalibrationError(f"correct has shape {list(self.correct.shape)}; it must be [ends ({ends}), "
                                   f"samples ({self.scores.shape[2]})]")
        if len(self.fires_above) != len(self.gates):
            raise CalibrationError(f"fires_above has {len(self.fires_above)} entries for {len(self.gates)} gates")
        self._gate = {k: g for g, k in enumerate(self.gates)}
        self.end_segment = np.array([k for r in self.routes for k in r.ends], np.int64)
        self.end_jump = np.array([r.taken[-1] if r.taken else -1 for r in self.routes for _ in r.ends], np.int64)
        self._first = np.cumsum([0, *(len(r.ends) for r in self.routes)])[:-1]  # each route's first end

    @property
    def n_samples(self) -> int:
        return int(self.scores.shape[2])

    @property
    def n_early(self) -> int:
        return len(self.gates)

    @property
    def n_exits(self) -> int:
        return int(self.correct.shape[0])

    def exits_for(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        """The end each sample takes (int64 [N]) given where each gate fires (``masks[e]``: bool [routes, N]): the
        route whose jump gates it fires and passes as the route does, then that route's first ending gate that
        fires, else its final exit."""
        n = self.n_samples
        out = np.full(n, self.n_exits - 1, np.int64)
        ones = np.ones(n, bool)
        for r, route in enumerate(self.routes):
            on = ones.copy()
            for k, taken in route.jumps:
                m = masks[self._gate[k]][r]
                on &= m if taken else ~m
            if not on.any():
                continue
            fires = np.vstack([*(masks[self._gate[k]][r] for k in route.ends[:-1]), ones])
            out[on] = self._first[r] + np.argmax(fires[:, on], axis=0)
        return out

    def subset(self, rows: np.ndarray) -> JumpTable:
        return JumpTable(self.scores[:, :, rows], self.correct[:, rows], list(self.fires_above), self.has_labels,
                         self.shared, self.routes, self.gates, self.jumps_to)

    def end_costs(self, segment_costs: Sequence[float]) -> list[float]:
        """Each end's cost from one cost per segment (``calibrate(costs=...)``): the sum over the segments its path
        runs (a jump skips those between its exit and its target). Raises CalibrationError for another count."""
        c = np.asarray(segment_costs, np.float64)
        n_segments = int(self.end_segment.max()) + 1
        if c.shape != (n_segments,):
            raise CalibrationError(f"costs has {c.size} entries; a bundle with jump exits needs one per segment "
                                   f"({n_segments})")
        return [float(c[_path(route, end, self.jumps_to)].sum()) for route in self.routes for end in route.ends]


def _path(route: Route, end: int, to: Mapping[int, int]) -> list[int]:
    """The segments a sample on ``route`` runs until it ends at ``end``."""
    taken = set(route.taken)
    out, k = [], 0
    while True:
        out.append(k)
        if k == end:
            return out
        k = to[k] if k in taken else k + 1


def collect_jump_table(bundle: Bundle, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, *,
                       runner: Any, batch_size: int = 256, quiet: bool = False,
                       error_budget: float | None = None) -> JumpTable:
    """Every gate's score and every end's agreement with the reference, for each sample on each route.

    ``inputs``, ``labels``, ``batch_size``, ``quiet`` and ``error_budget`` as for
    :func:`~eecompile.calibrate.collect.collect_exit_table` (the reference is the labels, or the no-jump route's
    final exit: the run without exits); ``runner``: the bundle's :class:`~eecompile.runtimes.jumps.JumpRunner`,
    run with policy ``never`` once per route and batch. Returns a :class:`JumpTable`. Raises BundleError when a
    gated exit has no score output, DataError when the labels do not match the predictions."""
    m = bundle.manifest
    gate_of = _gate_index(m)
    for k in gate_of:
        if not m.segments[k].exit.gate.score_output:  # type: ignore[union-attr]
            raise BundleError(f"{bundle.path}: exit {k} has no gate score output (exit.gate.score_output); recompile "
                              f"the bundle with this eecompile version")
    routes = jump_routes(m)
    gates = list(gate_of)
    out_name = final_output(m)
    out_axis = m.outputs[0].batch_axis or 0
    axes = {t.name: t.batch_axis for t in m.inputs}
    n = next(int(v.shape[axes[k] or 0]) for k, v in inputs.items() if axes.get(k) is not None)
    n_ends = sum(len(r.ends) for r in routes)
    scores = np.full((len(gates), len(routes), n), np.nan)
    answers: np.ndarray | None = None  # predictions per end, or (error budget) within it
    settings = [_setting(m, r) for r in routes]
    for rows in iter_batches(n, batch_size, "running every path", quiet):
        feeds = {k: _rows(v, rows, axes.get(k)) for k, v in inputs.items()}
        ys = []
        for r, route in enumerate(routes):
            res = runner.run(feeds, thresholds=settings[r], policy="never")
            scores[:, r, rows] = res.gate_scores[gates]
            ys += [res.all_exits[k][out_name] for k in route.ends]
        if error_budget is not None:
            got = np.stack(within_error_budget(ys, out_axis, error_budget))
        else:
            got = np.stack([_batch_first(predictions(y, m.class_axis), out_axis, m.class_axis, y.ndim) for y in ys])
        if answers is None:
            answers = np.empty((n_ends, n, *got.shape[2:]), got.dtype)
        answers[:, rows] = got
    assert answers is not None
    correct = answers if error_budget is not None else correctness(answers, labels)
    kinds = [GateKind(m.segments[k].exit.gate.kind) for k in gates]  # type: ignore[union-attr]
    return JumpTable(scores, correct, [k.fires_above for k in kinds], has_labels=labels is not None, routes=routes,
                     gates=gates, jumps_to={int(j["exit"]): int(j["to"]) for j in m.jumps or ()})


def jump_exit_rows(table: JumpTable, manifest: Manifest, ends: np.ndarray, thresholds: Sequence[float],
                   costs: Sequence[float] | np.ndarray) -> tuple[list[dict[str, Any]], str]:
    """The calibration report's rows per exit (segment) for a jump bundle, and a note on the jumps.

    ``ends``: the end each sample takes (:meth:`JumpTable.exits_for`); ``thresholds``: one per gated exit;
    ``costs``: ms per end. Each row has the chain's keys (``share``/``accuracy``: of the samples that end there;
    ``cumulative_ms``: ending there without a jump; for a jump exit, jumping there and going on to the final exit;
    for the segment before a jump target, the path without jumps) and, for a jump exit, ``jump_to`` and ``jumped`` (share of samples taking it)."""
    n = table.n_samples
    end_seg, jumped = table.end_segment[ends], table.end_jump[ends]
    ok = table.correct[ends, np.arange(n)]
    shown = dict(zip(table.gates, thresholds, strict=True))
    cost = np.asarray(costs, np.float64)

    pairs = [(r, e) for r in table.routes for e in r.ends]
    final = int(table.end_segment[-1])

    def cost_at(k: int) -> float:
        if k in table.jumps_to:  # jumping there, then on to the final exit
            return float(cost[next(j for j, (r, e) in enumerate(pairs) if k in r.taken and e == final)])
        # ending there on the route without jumps (the last one), else (the boundary) that route's final exit
        return float(cost[next((j for j, (r, e) in enumerate(pairs) if not r.taken and e == k), len(pairs) - 1)])

    rows, shares = [], []
    for k, seg in enumerate(manifest.segments):
        here = end_seg == k
        gate = seg.exit.gate
        row: dict[str, Any] = {
            "index": k, "name": seg.exit.name, "gate": gate.kind if gate else None,
            "threshold": float(shown[k]) if k in shown else None, "share": float(here.mean()),
            "accuracy": float(ok[here].mean()) if here.any() else None, "cumulative_ms": cost_at(k)}
        if k in table.jumps_to:
            row.update(jump_to=table.jumps_to[k], jumped=float((jumped == k).mean()))
            shares.append(f"exit {k} {row['jumped']:.1%}")
        rows.append(row)
    return rows, "jumped (went on at the jump target with the exit's output): " + ", ".join(shares)
