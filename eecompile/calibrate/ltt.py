"""Learn-then-Test (Angelopoulos et al. 2021, as in CALM): thresholds whose risk on new data is within budget
with probability >= 1 - delta."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eecompile.calibrate.collect import ExitTable
from eecompile.calibrate.search import Costs, _check_budget, evaluate, never_threshold, search_thresholds
from eecompile.calibrate.stats import PVALUES, binomial_pvalue, hoeffding_bentkus_pvalue, samples_needed
from eecompile.errors import CalibrationError


@dataclass
class LTTResult:
    thresholds: list[float]
    certified: bool
    n_learn: int
    n_test: int
    n_candidates: int
    n_certified: int
    p_value: float | None  # of the chosen configuration
    test_loss: float | None


def ltt_thresholds(table: ExitTable, costs: Costs, max_drop: float, delta: float, *,
                   learn_fraction: float = 0.3, pvalue: str = "binomial", seed: int = 0,
                   n_paths: int = 24) -> LTTResult:
    """Learn-then-Test: thresholds with P(risk on new data <= max_drop) >= 1 - delta.

    The risk is the share of samples the final exit gets right and the chain gets wrong (an upper bound on
    the accuracy drop; without labels, disagreement with the final exit). *Learn*: on a random
    ``learn_fraction`` of the samples, search cheapest thresholds for a ladder of budgets, giving candidate
    configurations ordered strict to loose. *Test*: on the rest, a p-value per candidate, fixed-sequence
    testing from the strictest, stopping at the first that is not rejected at level ``delta``. Every rejected
    candidate is certified; the cheapest is returned. None certified: every gate is set to never fire.
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
    if n_test < need:
        total = math.ceil(need / (1.0 - learn_fraction))
        raise CalibrationError(
            f"ltt with max drop {max_drop} and delta {delta} needs at least {need} test samples (even with zero "
            f"errors fewer cannot certify the budget), i.e. at least {total} calibration samples with "
            f"{learn_fraction:.0%} kept for learning; got {n}. Give more calibration data, a larger --max-drop "
            f"or --delta, or use --method search"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    learn, test = table.subset(perm[:n_learn]), table.subset(perm[n_learn:])
    # Learn: the cheapest configuration for a ladder of budgets up to the target, each found on `learn` only,
    # so the hypotheses are fixed before `test` is looked at (what makes fixed-sequence testing valid).
    # "No exit fires" is left out: it is always safe and certifying it says nothing.
    never = [never_threshold(a) for a in table.fires_above]
    configs: list[list[float]] = []
    for b in np.linspace(0.0, max_drop, n_paths + 1)[1:]:
        cfg = search_thresholds(learn, costs, float(b), risk="loss")
        if cfg != never and cfg not in configs:
            configs.append(cfg)
    learn_risk = [evaluate(learn, cfg, costs).loss for cfg in configs]
    learn_cost = [evaluate(learn, cfg, costs).expected_cost for cfg in configs]
    order = sorted(range(len(configs)), key=lambda i: (learn_risk[i], -learn_cost[i]))
    pfun = binomial_pvalue if pvalue == "binomial" else hoeffding_bentkus_pvalue
    certified: list[tuple[float, int, float, float]] = []  # (test cost, config, p, loss)
    for i in order:
        ev = evaluate(test, configs[i], costs)
        errors = int(round(ev.loss * n_test))
        p = pfun(errors, n_test, max_drop)
        if p > delta:
            break
        certified.append((ev.expected_cost, i, p, ev.loss))
    if not certified:
        return LTTResult(never, False, n_learn, n_test, len(configs), 0,
                         None, None)
    _, best, p, loss = min(certified, key=lambda t: (t[0], t[1]))
    return LTTResult(configs[best], True, n_learn, n_test, len(configs), len(certified), p, loss)
