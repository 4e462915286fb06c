"""Learn-then-Test: thresholds whose risk on new data is within budget with probability >= 1 - delta.

Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
Control" (2021), as CALM applies it to early exits (Schuster et al., "Confident Adaptive Language Modeling",
NeurIPS 2022): split the calibration data, *learn* an ordered family of candidate settings on one part, *test*
them in that order on the other (fixed-sequence testing), and every setting tested before the first failure is
certified simultaneously (family-wise error <= delta). The family here is :func:`threshold_path`: a fine,
monotone path of threshold vectors from strict to loose, so testing walks as far as the data allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eecompile.calibrate.collect import ExitTable
from eecompile.calibrate.search import Costs, _check_budget, evaluate, never_setting, threshold_path
from eecompile.calibrate.stats import (
    PVALUES,
    binomial_pvalue,
    hoeffding_bentkus_pvalue,
    samples_needed,
    samples_needed_at_rate,
)
from eecompile.errors import CalibrationError


@dataclass
class LTTResult:
    """Outcome of :func:`ltt_thresholds`.

    ``thresholds``: the certified setting (the cheapest on the test split among those certified); when
    nothing is certified, every gate never fires and ``best_uncertified`` holds the setting that would have
    been next in line (reported, not to be deployed). ``n_candidates``: settings on the path;
    ``n_certified``: how many fixed-sequence testing certified before it stopped. ``p_value`` and
    ``test_loss`` are those of the chosen setting (of ``best_uncertified`` when nothing is certified).
    ``samples_needed``: fewest calibration samples (learning share included) for which zero losses on the
    test split would certify the budget; ``samples_needed_best``: about how many ``best_uncertified`` would
    need at its test loss rate (None when that rate is not below the budget).
    """

    thresholds: list[float]
    certified: bool
    n_learn: int
    n_test: int
    n_candidates: int
    n_certified: int
    p_value: float | None
    test_loss: float | None
    samples_needed: int = 0
    samples_needed_best: int | None = None
    best_uncertified: list[float] | None = None


def ltt_thresholds(table: ExitTable, costs: Costs, max_drop: float, delta: float, *,
                   learn_fraction: float = 0.3, pvalue: str = "binomial", seed: int = 0,
                   n_candidates: int = 64, max_points: int = 200) -> LTTResult:
    """Learn-then-Test: thresholds with P(loss on new data <= max_drop) >= 1 - delta.

    The loss is the share of samples the final exit gets right and the chain gets wrong (an upper bound on
    the accuracy drop; without labels, disagreement with the final exit). *Learn*: on a random
    ``learn_fraction`` of the samples (``seed``), :func:`threshold_path` orders up to ``max_points`` settings
    from strict to loose. *Test*: on the rest, a p-value of H0 "loss > max_drop" per setting (``pvalue``:
    ``binomial``, exact for 0/1 losses, or ``hoeffding_bentkus``), in path order, stopping at the first that
    is not rejected at level ``delta``. Returns an :class:`LTTResult`.

    Raises CalibrationError for a budget, delta or learning share outside (0, 1), an unknown p-value, or
    when the test split is smaller than :func:`~eecompile.calibrate.stats.samples_needed` (then nothing
    could be certified whatever the thresholds; the message gives the sample count needed).
    """
    _check_budget(max_drop, delta)
    if pvalue not in PVALUES:
        raise CalibrationError(f"p-value '{pvalue}' is unknown; use one of {', '.join(PVALUES)}")
    if not 0.0 < learn_fraction < 1.0:
        raise CalibrationError(f"learn_fraction must be in (0, 1), got {learn_fraction}")
    n = table.n_samples
    need = samples_needed(max_drop, delta)
    n_learn = int(round(learn_fraction * n))
    n_test = n - n_learn
    total = math.ceil(need / (1.0 - learn_fraction))
    if n_test < need:
        raise CalibrationError(
            f"ltt with max drop {max_drop:g} and delta {delta:g} needs at least {need} test samples (even with zero "
            f"errors fewer cannot certify the budget), i.e. at least {total} calibration samples with "
            f"{learn_fraction:.0%} kept for learning; got {n}. Give more calibration data, a larger --max-drop "
            f"or --delta, or use --method search"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    learn, test = table.subset(perm[:n_learn]), table.subset(perm[n_learn:])
    # Learn: the path is fixed from `learn` alone, before `test` is looked at (what makes fixed-sequence
    # testing valid). It runs a little past the budget on `learn` so testing, not learning, decides where to stop.
    path = threshold_path(learn, costs, n_candidates=n_candidates, max_points=max_points,
                          max_loss=min(1.0, 3.0 * max_drop + 3.0 / max(n_learn, 1)))
    pfun = binomial_pvalue if pvalue == "binomial" else hoeffding_bentkus_pvalue
    certified: list[tuple[float, int, float, float]] = []  # (test cost, position, p, loss)
    failed: tuple[int, float, float] | None = None  # the first setting not certified: (position, p, loss)
    for i, cfg in enumerate(path):
        ev = evaluate(test, cfg, costs)
        p = pfun(ev.errors, n_test, max_drop)
        if p > delta:
            failed = (i, p, ev.loss)
            break
        certified.append((ev.expected_cost, i, p, ev.loss))
    never = never_setting(table)
    if not certified:
        if failed is None:
            return LTTResult(never, False, n_learn, n_test, len(path), 0, None, None, total, None, None)
        i, p, loss = failed
        best_need = samples_needed_at_rate(loss, max_drop, delta)
        return LTTResult(never, False, n_learn, n_test, len(path), 0, p, loss, total,
                         None if best_need is None else math.ceil(best_need / (1.0 - learn_fraction)), path[i])
    _, best, p, loss = min(certified, key=lambda t: (t[0], -t[1]))
    return LTTResult(path[best], True, n_learn, n_test, len(path), len(certified), p, loss, total)
