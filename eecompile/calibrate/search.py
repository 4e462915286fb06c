"""Threshold search: the cheapest expected cost whose accuracy drop stays within budget.

* :func:`search_thresholds`: cheapest thresholds with the *empirical* risk on the table within a budget
  (coordinate descent over score quantiles). The building block of the others.
* :func:`bounded_search` (``calibrate --method search``): the same, with the budget applied to the
  Clopper-Pearson upper confidence bound of the loss (hence of the drop) rather than to its point estimate,
  so sampling noise in the calibration set is accounted for; reports the drop with its interval and the
  sample size the budget needs.
* :func:`threshold_path`: a fine, monotone family of settings from strict to loose (what Learn-then-Test
  tests in order, :mod:`eecompile.calibrate.ltt`).

Conventions: ``costs[k]`` is the cumulative cost (any unit, e.g. ms) of leaving at exit k, final exit last;
a gate fires when ``score >= t`` (``score <= t`` for ``entropy``; see ``GateKind.fires_above``); a NaN score
never fires; a threshold of +inf (-inf for entropy) means "never exit here". The *drop* is the final exit's
accuracy minus the chain's; the *loss* is the share of samples the final exit gets right and the chain
wrong (without labels: the chain disagrees with the final exit). drop <= loss, and the loss is a binomial
proportion, which is what the bounds use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from eecompile.calibrate.collect import ExitTable
from eecompile.calibrate.stats import (
    clopper_pearson_interval,
    clopper_pearson_upper,
    max_certified_errors,
    samples_needed,
    samples_needed_at_rate,
)
from eecompile.errors import CalibrationError

Costs = Sequence[float] | np.ndarray  # cost of leaving at exit k (cumulative), one per exit


def never_threshold(fires_above: bool) -> float:
    """The threshold that never fires: +inf for gates that fire on large values, -inf for entropy."""
    return math.inf if fires_above else -math.inf


def never_setting(table: ExitTable) -> list[float]:
    """Every gate set to never fire (every sample runs to the final exit)."""
    return [never_threshold(a) for a in table.fires_above]


def _fires(scores: np.ndarray, threshold: float, above: bool) -> np.ndarray:
    # Comparisons with NaN are False, so a NaN score never fires.
    with np.errstate(invalid="ignore"):
        return scores >= threshold if above else scores <= threshold


def _gate_mask(scores: np.ndarray, threshold: float, above: bool) -> np.ndarray:
    """Where one gate fires at ``threshold`` (never at the threshold that means "never exit here")."""
    t = float(threshold)
    if math.isinf(t) and (t > 0) == bool(above):
        return np.zeros(np.shape(scores), dtype=bool)
    return _fires(scores, t, above)


def assign_exits(scores: np.ndarray, thresholds: Sequence[float], fires_above: Sequence[bool]) -> np.ndarray:
    """Exit taken by each sample: the first early exit whose gate fires, else the final exit (= E).

    ``scores``: ``[E, N]`` gate values; ``thresholds``: E numbers; returns int64 ``[N]`` in ``[0, E]``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    e, n = scores.shape
    fires = np.ones((e + 1, n), dtype=bool)
    for k in range(e):
        fires[k] = _gate_mask(scores[k], thresholds[k], fires_above[k])
    return np.argmax(fires, axis=0)


def table_exits(table: ExitTable, thresholds: Sequence[float]) -> np.ndarray:
    """Exit (column of ``table.correct``) each sample of ``table`` takes at ``thresholds`` (one per gate)."""
    return table.exits_for([_gate_mask(table.scores[k], thresholds[k], table.fires_above[k])
                            for k in range(table.n_early)])


@dataclass
class Evaluation:
    """Outcome of one threshold setting on an :class:`ExitTable` (rates are fractions of the N samples)."""

    exit_index: np.ndarray  # int64 [N]
    full_accuracy: float  # final exit vs reference (1.0 without labels)
    accuracy: float  # early-exit chain vs reference
    drop: float  # full_accuracy - accuracy
    loss: float  # share of samples the final exit gets right and the chain gets wrong (>= drop)
    expected_cost: float  # mean of costs[exit taken], in the unit of the costs
    shares: list[float]  # per exit
    errors: int = 0  # number of losses (loss * N)


def evaluate(table: ExitTable, thresholds: Sequence[float], costs: Costs) -> Evaluation:
    """Accuracy, drop, loss and expected cost of ``thresholds`` on ``table``; ``costs[k]`` = cost of leaving at
    exit k (cumulative, one per exit)."""
    idx = table_exits(table, thresholds)
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
        shares=(np.bincount(idx, minlength=table.n_exits) / max(n, 1)).tolist(),
        errors=int((full & ~ok).sum()),
    )


def oracle_exits(table: ExitTable, costs: Costs | None = None) -> np.ndarray:
    """Each sample's first exit that already matches the reference (the final exit when none does); with
    ``costs`` (one per exit), its cheapest such exit (exits whose costs do not grow in order: paths of jumps)."""
    ok = np.vstack([table.correct[:-1], np.ones((1, table.n_samples), bool)])
    if costs is None:
        return np.argmax(ok, axis=0)
    return np.argmin(np.where(ok, np.asarray(costs, np.float64)[:, None], np.inf), axis=0)


def candidate_thresholds(scores: np.ndarray, above: bool, n: int = 64) -> list[float]:
    """Candidate thresholds for one exit, strict to loose: 'never', then ``n`` score quantiles.

    The quantiles are observed scores (no interpolation), so a threshold compares the same way in float64 here
    as in the float32 gate of the graph."""
    finite = scores[np.isfinite(scores)]
    qs = (np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n), method="nearest")) if finite.size
          else np.array([]))
    qs = qs[::-1] if above else qs
    return [never_threshold(above), *[float(q) for q in qs]]


def shared_candidates(table: ExitTable, n: int = 64) -> list[float]:
    """Candidates for one threshold shared by every exit (``table.shared``), strict to loose: quantiles of all
    exits' scores pooled (the gates must fire the same way)."""
    if len(set(table.fires_above)) > 1:
        raise CalibrationError("a shared threshold needs gates that fire the same way (all on large values)")
    return candidate_thresholds(table.scores.reshape(-1), table.fires_above[0], 2 * n)[1:]


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
    """Per-exit thresholds minimising expected cost with the empirical risk <= ``max_drop`` on ``table``.

    ``risk``: ``drop`` (final accuracy minus chain accuracy) or ``loss`` (share the final exit gets right and
    the chain wrong; what the bounds certify). Coordinate descent over ``n_candidates`` score quantiles per
    exit, started from "no exit fires" and from the best point of a shared-quantile path; the cheaper result
    wins. A ``table.shared`` table (Q-exit gates) gets one threshold for every exit: the cheapest of
    :func:`shared_candidates` within budget. Returns E thresholds (every gate "never" when nothing else fits). Raises CalibrationError when
    ``costs`` does not have E + 1 entries.
    """
    e = table.n_early
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (table.n_exits,):
        raise CalibrationError(f"costs has {c.size} entries; it needs one per exit ({table.n_exits})")
    if e == 0 or table.n_samples == 0:
        return [never_threshold(a) for a in table.fires_above]
    risk_of = _risk_fn(table, risk)
    if table.shared:  # one threshold for every exit: the cheapest shared candidate within budget
        best, best_cost = never_setting(table), float(c[-1])
        for t in shared_candidates(table, n_candidates):
            idx = table_exits(table, [t] * e)
            cost = float(c[idx].mean())
            if risk_of(idx) <= max_drop + 1e-12 and cost < best_cost - 1e-12:
                best, best_cost = [t] * e, cost
        return best
    cands = [candidate_thresholds(table.scores[k], table.fires_above[k], n_candidates) for k in range(e)]
    # Every candidate's firing mask is computed once; an evaluation is then an argmax over E + 1 rows.
    masks = [[_gate_mask(table.scores[k], t, table.fires_above[k]) for t in cands[k]] for k in range(e)]

    def score(choice: list[int]) -> tuple[float, float]:
        idx = table.exits_for([masks[k][choice[k]] for k in range(e)])
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


@dataclass
class SearchResult:
    """What :func:`bounded_search` chose and how sure it is.

    ``feasible``: some setting other than "every gate never" has its upper bound within budget (else
    nothing should be deployed). ``exits_pay``: the cheapest such setting at ``costs`` lets samples exit; when
    ``feasible`` but not ``exits_pay``, exiting is slower than running the whole chain at these costs and
    ``thresholds`` is every gate never, a result to deploy (the budget is met, nothing is lost). ``allowed_errors``: the most losses the
    N samples tolerate for the budget at this confidence (-1: even zero are too many). ``drop_upper``: the
    one-sided Clopper-Pearson upper bound of the loss at ``confidence``, an upper bound on the drop.
    ``loss_interval``: two-sided Clopper-Pearson interval of the loss at ``confidence``.
    ``samples_needed``: fewest samples for which zero losses meet the budget at this confidence;
    ``samples_needed_best``: about how many the cheapest setting with empirical drop within budget would need
    (None when its loss rate is not below the budget). ``best_unbounded``: that setting (reported, not
    deployed, when it differs from ``thresholds``).
    """

    thresholds: list[float]
    feasible: bool
    exits_pay: bool
    confidence: float
    n_samples: int
    allowed_errors: int
    errors: int
    drop_upper: float
    loss_interval: tuple[float, float]
    samples_needed: int
    samples_needed_best: int | None
    best_unbounded: list[float]


def bounded_search(table: ExitTable, costs: Costs, max_drop: float, confidence: float, *,
                   n_candidates: int = 64) -> SearchResult:
    """Cheapest thresholds whose upper confidence bound on the drop is within ``max_drop``.

    The losses of a setting on the N calibration samples are Binomial(N, true loss); the setting is accepted
    when its one-sided Clopper-Pearson bound at ``confidence`` is <= ``max_drop``, i.e. when it has at most
    :func:`~eecompile.calibrate.stats.max_certified_errors` losses. The bound holds per setting; the search
    over settings is not corrected for (use Learn-then-Test, :func:`~eecompile.calibrate.ltt.ltt_thresholds`,
    for a guarantee that is). Raises CalibrationError for a budget or confidence outside (0, 1).
    """
    _check_budget(max_drop)
    check_confidence(confidence)
    delta = 1.0 - confidence
    n = table.n_samples
    allowed = max_certified_errors(n, max_drop, delta)
    never = never_setting(table)
    best = search_thresholds(table, costs, max_drop, n_candidates=n_candidates, risk="drop")
    reachable = False
    if allowed >= 0:
        rate = (allowed + 0.5) / max(n, 1)
        thresholds = search_thresholds(table, costs, rate, n_candidates=n_candidates, risk="loss")
        # "never" can also be the answer because exiting does not pay at the measured costs; whether some
        # setting that lets samples exit meets the bound is a question of the losses alone: ask it with costs
        # that make every earlier exit cheaper.
        reachable = thresholds != never or search_thresholds(
            table, np.arange(1.0, table.n_exits + 1.0), rate, n_candidates=n_candidates, risk="loss") != never
    else:
        thresholds = never
    ev = evaluate(table, thresholds, costs)
    ev_best = evaluate(table, best, costs)
    return SearchResult(
        thresholds=thresholds, feasible=reachable, exits_pay=thresholds != never, confidence=confidence, n_samples=n,
        allowed_errors=allowed, errors=ev.errors, drop_upper=clopper_pearson_upper(ev.errors, n, delta),
        loss_interval=clopper_pearson_interval(ev.errors, n, confidence),
        samples_needed=samples_needed(max_drop, delta),
        samples_needed_best=samples_needed_at_rate(ev_best.loss, max_drop, delta) if best != never else None,
        best_unbounded=best,
    )


def threshold_path(table: ExitTable, costs: Costs, *, n_candidates: int = 64, max_points: int = 200,
                   max_loss: float = 1.0) -> list[list[float]]:
    """A monotone family of settings from strict to loose, learned on ``table``: the path Learn-then-Test tests.

    Starting from "no exit fires", each step loosens one exit by one candidate threshold (a score quantile of
    that exit), the exit that saves the most expected cost per loss it adds on ``table``; every threshold only
    ever loosens, so the settings are ordered strict to loose. Stops when every exit is at its loosest or the
    loss on ``table`` passes ``max_loss``; at most ``max_points`` settings (evenly thinned). "No exit fires"
    itself is not on the path (it is always safe; certifying it says nothing). A ``table.shared`` table gets
    one threshold for every exit, the path running over :func:`shared_candidates`.
    """
    e, n = table.n_early, table.n_samples
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (table.n_exits,):
        raise CalibrationError(f"costs has {c.size} entries; it needs one per exit ({table.n_exits})")
    if e == 0 or n == 0:
        return []
    if table.shared:  # one threshold for every exit: the shared candidates are already ordered strict to loose
        tied: list[list[float]] = []
        for t in shared_candidates(table, n_candidates):
            tied.append([t] * e)
            if evaluate(table, tied[-1], c).loss > max_loss:
                break
        if len(tied) > max_points:
            keep = np.unique(np.round(np.linspace(0, len(tied) - 1, max_points)).astype(int))
            tied = [tied[i] for i in keep]
        return tied
    cands = [candidate_thresholds(table.scores[k], table.fires_above[k], n_candidates) for k in range(e)]
    masks = [[_gate_mask(table.scores[k], t, table.fires_above[k]) for t in cands[k]] for k in range(e)]
    full = table.correct[-1]
    cols = np.arange(n)

    def score(choice: list[int]) -> tuple[int, float]:
        idx = table.exits_for([masks[k][choice[k]] for k in range(e)])
        return int((full & ~table.correct[idx, cols]).sum()), float(c[idx].mean())

    choice = [0] * e
    losses, cost = score(choice)
    path: list[list[float]] = []
    while True:
        best: tuple[float, int, int, float] | None = None  # (merit, exit, losses, cost)
        for k in range(e):
            if choice[k] + 1 >= len(cands[k]):
                continue
            trial = [*choice[:k], choice[k] + 1, *choice[k + 1:]]
            trial_losses, trial_cost = score(trial)
            merit = (cost - trial_cost) / (1.0 + max(trial_losses - losses, 0))
            if best is None or merit > best[0]:
                best = (merit, k, trial_losses, trial_cost)
        if best is None:
            break
        _, k, losses, cost = best
        choice[k] += 1
        path.append([cands[j][choice[j]] for j in range(e)])
        if losses / n > max_loss:
            break
    if len(path) > max_points:
        keep = np.unique(np.round(np.linspace(0, len(path) - 1, max_points)).astype(int))
        path = [path[i] for i in keep]
    return path


def check_confidence(confidence: float) -> None:
    """Raise CalibrationError unless ``confidence`` is in (0, 1)."""
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise CalibrationError(f"--confidence must be in (0, 1) (e.g. 0.95), got {confidence}")


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
