"""Threshold search: the cheapest expected cost with the drop within budget on the calibration data.

Conventions: a gate fires when ``score >= t`` (``score <= t`` for ``entropy``; see ``GateKind.fires_above``);
a NaN score never fires; a threshold of +inf (-inf for entropy) means "never exit here".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from eecompile.calibrate.collect import ExitTable
from eecompile.errors import CalibrationError

Costs = Sequence[float] | np.ndarray  # cost of leaving at exit k (cumulative), one per exit


def never_threshold(fires_above: bool) -> float:
    return math.inf if fires_above else -math.inf


def _fires(scores: np.ndarray, threshold: float, above: bool) -> np.ndarray:
    # Comparisons with NaN are False, so a NaN score never fires.
    with np.errstate(invalid="ignore"):
        return scores >= threshold if above else scores <= threshold


def assign_exits(scores: np.ndarray, thresholds: Sequence[float], fires_above: Sequence[bool]) -> np.ndarray:
    """Exit taken by each sample: the first early exit whose gate fires, else the final exit (= E)."""
    scores = np.asarray(scores, dtype=np.float64)
    e, n = scores.shape
    fires = np.ones((e + 1, n), dtype=bool)
    for k in range(e):
        t = float(thresholds[k])
        fires[k] = False if math.isinf(t) and (t > 0) == bool(fires_above[k]) else _fires(scores[k], t, fires_above[k])
    return np.argmax(fires, axis=0)


@dataclass
class Evaluation:
    """Outcome of one threshold setting on an :class:`ExitTable`."""

    exit_index: np.ndarray  # [N]
    full_accuracy: float  # final exit vs reference (1.0 without labels)
    accuracy: float  # early-exit chain vs reference
    drop: float  # full_accuracy - accuracy
    loss: float  # share of samples the final exit gets right and the chain gets wrong (>= drop)
    expected_cost: float
    shares: list[float]  # per exit


def evaluate(table: ExitTable, thresholds: Sequence[float], costs: Costs) -> Evaluation:
    """Accuracy, drop and expected cost of ``thresholds``; ``costs[k]`` = cost of leaving at exit k."""
    idx = assign_exits(table.scores, thresholds, table.fires_above)
    n = table.n_samples
    cols = np.arange(n)
    ok = table.correct[idx, cols]
    full = table.correct[-1]
    c = np.asarray(costs, dtype=np.float64)
    return Evaluation(
        exit_index=idx,
        full_accuracy=float(full.mean()) if n else 1.0,
        accuracy=float(ok.mean()) if n else 1.0,
        drop=float(full.mean() - ok.mean()) if n else 0.0,
        loss=float((full & ~ok).mean()) if n else 0.0,
        expected_cost=float(c[idx].mean()) if n else float(c[-1]),
        shares=(np.bincount(idx, minlength=table.n_early + 1) / max(n, 1)).tolist(),
    )


def oracle_exits(table: ExitTable) -> np.ndarray:
    """Each sample's first exit that already matches the reference (the final exit when none does)."""
    return np.argmax(np.vstack([table.correct[:-1], np.ones((1, table.n_samples), bool)]), axis=0)


def candidate_thresholds(scores: np.ndarray, above: bool, n: int = 64) -> list[float]:
    """Candidate thresholds for one exit, strict to loose: 'never', then score quantiles."""
    finite = scores[np.isfinite(scores)]
    qs = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n))) if finite.size else np.array([])
    qs = qs[::-1] if above else qs
    return [never_threshold(above), *[float(q) for q in qs]]


def _risk_fn(table: ExitTable, risk: str) -> Callable[[np.ndarray], float]:
    full = table.correct[-1]
    cols = np.arange(table.n_samples)
    n = max(table.n_samples, 1)
    if risk == "drop":
        full_ok = int(full.sum())
        return lambda idx: (full_ok - int(table.correct[idx, cols].sum())) / n
    if risk == "loss":
        return lambda idx: int((full & ~table.correct[idx, cols]).sum()) / n
    raise ValueError(risk)


def search_thresholds(table: ExitTable, costs: Costs, max_drop: float, *, n_candidates: int = 64,
                      risk: str = "drop", max_rounds: int = 20) -> list[float]:
    """Per-exit thresholds minimising expected cost with the risk <= ``max_drop`` on ``table``.

    ``risk``: ``drop`` (final accuracy minus chain accuracy) or ``loss`` (share the final exit gets right and
    the chain wrong; what Learn-then-Test certifies). Coordinate descent over score quantiles, started from
    "no exit fires" and from the best point of a shared-quantile path; the cheaper result wins.
    """
    e = table.n_early
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (e + 1,):
        raise CalibrationError(f"costs has {c.size} entries; it needs one per exit ({e + 1})")
    if e == 0 or table.n_samples == 0:
        return [never_threshold(a) for a in table.fires_above]
    risk_of = _risk_fn(table, risk)
    cands = [candidate_thresholds(table.scores[k], table.fires_above[k], n_candidates) for k in range(e)]
    # Every candidate's firing mask is computed once; an evaluation is then an argmax over E + 1 rows.
    masks = [[np.zeros(table.n_samples, bool) if math.isinf(t) else _fires(table.scores[k], t, table.fires_above[k])
              for t in cands[k]] for k in range(e)]
    last = np.ones(table.n_samples, bool)

    def score(choice: list[int]) -> tuple[float, float]:
        idx = np.argmax(np.vstack([*(masks[k][choice[k]] for k in range(e)), last]), axis=0)
        return risk_of(idx), float(c[idx].mean())

    def descend(choice: list[int]) -> tuple[list[int], float]:
        best_cost = score(choice)[1]
        for _ in range(max_rounds):
            changed = False
            for k in range(e):
                for j in range(len(cands[k])):
                    if j == choice[k]:
                        continue
                    trial = [*choice[:k], j, *choice[k + 1:]]
                    r, cost = score(trial)
                    if r <= max_drop + 1e-12 and cost < best_cost - 1e-12:
                        choice, best_cost, changed = trial, cost, True
            if not changed:
                break
        return choice, best_cost

    starts = [[0] * e]
    # Shared-quantile path: the same candidate position at every exit, strict to loose; keep the loosest
    # feasible point as a second start (coordinate descent alone can stall where exits must move together).
    path_best: list[int] | None = None
    for j in range(1, max(len(x) for x in cands)):
        trial = [min(j, len(cands[k]) - 1) for k in range(e)]
        r, _ = score(trial)
        if r <= max_drop + 1e-12:
            path_best = trial
    if path_best is not None:
        starts.append(path_best)
    results = [descend(s) for s in starts]
    choice, _ = min(results, key=lambda rc: rc[1])
    return [cands[k][choice[k]] for k in range(e)]


def _check_budget(max_drop: float, delta: float | None = None) -> None:
    if not (isinstance(max_drop, (int, float)) and 0.0 < max_drop < 1.0):
        raise CalibrationError(f"--max-drop must be in (0, 1) (e.g. 0.01 for one point of accuracy), got {max_drop}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise CalibrationError(f"--delta must be in (0, 1) (e.g. 0.05), got {delta}")


def pareto_curve(table: ExitTable, costs: Costs, baseline_cost: float,
                 budgets: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Accuracy against speedup of the cheapest thresholds for a ladder of budgets (for the plot)."""
    budgets = list(budgets) if budgets is not None else [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12,
                                                          0.2, 0.3, 0.5, 1.0]
    out = []
    for b in budgets:
        cfg = search_thresholds(table, costs, b) if b > 0 else [never_threshold(a) for a in table.fires_above]
        ev = evaluate(table, cfg, costs)
        out.append({"budget": float(b), "accuracy": ev.accuracy, "speedup": baseline_cost / ev.expected_cost})
    return out
