"""Statistics for certifying a risk from 0/1 losses (``math`` only: no scipy, so it runs on a device).

A *loss* here is one calibration sample the early-exit chain gets wrong where the final exit gets it right (or,
without labels, where the chain disagrees with the final exit). ``errors`` losses among ``n`` independent
samples are Binomial(n, r) for the true risk r, which gives:

* :func:`binom_cdf`: the exact binomial distribution function;
* :func:`binomial_pvalue`: the exact p-value of H0 "r > alpha" (the binomial tail; what the Clopper-Pearson
  bound inverts);
* :func:`hoeffding_bentkus_pvalue`: the Hoeffding-Bentkus p-value of Bates et al., "Distribution-free,
  risk-controlling prediction sets" (JACM 2021), valid for any loss in [0, 1], as Learn-then-Test uses it
  (Angelopoulos et al., "Learn then Test", 2021);
* :func:`clopper_pearson_upper` / :func:`clopper_pearson_interval`: the exact (Clopper & Pearson, Biometrika
  1934) confidence bounds on r;
* :func:`max_certified_errors`, :func:`samples_needed`, :func:`samples_needed_at_rate`: how many losses a
  sample size tolerates for a budget, and how many samples a budget needs.

Conventions: ``delta`` is the allowed failure probability, ``confidence = 1 - delta``; rates are fractions in
[0, 1] (0.01 = one point of accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Callable

PVALUES = ("binomial", "hoeffding_bentkus")


def _check(n: int, k: int | None = None) -> None:
    if n < 0 or (k is not None and k < 0):
        raise ValueError(f"counts must be non-negative, got errors={k}, n={n}")


def binom_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], exact (a log-space sum of the k + 1 terms; no scipy).

    ``k`` may be any integer (k < 0 gives 0, k >= n gives 1); ``p`` in [0, 1]. Float64 result in [0, 1].
    """
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * math.fsum(math.exp(t - m) for t in terms))


def binomial_pvalue(errors: int, n: int, alpha: float) -> float:
    """Exact p-value of H0: risk > ``alpha``, from ``errors`` 0/1 losses in ``n`` samples.

    ``P[Binomial(n, alpha) <= errors]``: rejecting H0 when it is <= delta certifies risk <= alpha with
    probability >= 1 - delta (the test the one-sided Clopper-Pearson bound inverts).
    """
    _check(n, errors)
    return binom_cdf(errors, n, alpha)


def hoeffding_bentkus_pvalue(errors: int, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0: risk > ``alpha`` (Bates et al. 2021, Proposition 3.5).

    ``min(exp(-n h1(min(r, alpha), alpha)), e * P[Binomial(n, alpha) <= ceil(n r)])`` with ``r = errors / n``
    and ``h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))``. Valid for any loss bounded in [0, 1];
    for 0/1 losses :func:`binomial_pvalue` is exact and never larger.
    """
    _check(n, errors)
    if n == 0:
        return 1.0
    rhat = errors / n
    r = min(rhat, alpha)

    def h1(a: float, b: float) -> float:
        if a <= 0.0:
            return -math.log1p(-b)
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    hoeffding = math.exp(-n * h1(r, alpha))
    bentkus = math.e * binom_cdf(math.ceil(n * rhat), n, alpha)
    return min(1.0, hoeffding, bentkus)


def _bisect(f: Callable[[float], float], target: float) -> float:
    """p in [0, 1] with f(p) = target for f increasing in p (60 halvings: below 1e-15)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided upper confidence bound on the risk at confidence ``1 - delta`` (Clopper & Pearson 1934).

    The p with ``P[Binomial(n, p) <= errors] = delta`` (the ``1 - delta`` quantile of Beta(errors + 1,
    n - errors)); 1.0 when ``errors == n`` or ``n == 0``. The true risk is below it with probability
    >= 1 - delta.
    """
    _check(n, errors)
    if n == 0 or errors >= n:
        return 1.0
    return _bisect(lambda p: 1.0 - binom_cdf(errors, n, p), 1.0 - delta)


def clopper_pearson_interval(errors: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided exact interval ``(low, high)`` on the risk at ``confidence`` (each tail (1 - confidence) / 2).

    ``low`` is 0 when ``errors == 0`` and ``high`` is 1 when ``errors == n`` (Clopper & Pearson 1934).
    """
    _check(n, errors)
    tail = (1.0 - confidence) / 2.0
    if n == 0:
        return 0.0, 1.0
    high = clopper_pearson_upper(errors, n, tail)
    low = 0.0 if errors == 0 else _bisect(lambda p: 1.0 - binom_cdf(errors - 1, n, p), tail)
    return low, high


def max_certified_errors(n: int, max_risk: float, delta: float) -> int:
    """The most losses among ``n`` samples that still certify risk <= ``max_risk`` at level ``delta``.

    The largest k with ``P[Binomial(n, max_risk) <= k] <= delta`` (equivalently, Clopper-Pearson upper bound
    <= max_risk); -1 when even zero losses cannot (fewer than :func:`samples_needed` samples).
    """
    _check(n)
    if n == 0 or max_risk <= 0.0:
        return -1
    if max_risk >= 1.0:
        return n
    lp, lq = math.log(max_risk), math.log1p(-max_risk)
    base = math.lgamma(n + 1)
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(base - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
        if cdf > delta:
            return k - 1
    return n


def samples_needed(max_drop: float, delta: float) -> int:
    """Fewest samples for which even zero losses certify risk <= ``max_drop`` at level ``delta``.

    ``ceil(log(delta) / log(1 - max_drop))``: (1 - max_drop)^n <= delta. E.g. 0.01 at delta 0.05: 299.
    """
    return math.ceil(math.log(delta) / math.log1p(-max_drop) - 1e-12)


def samples_needed_at_rate(rate: float, max_drop: float, delta: float, limit: int = 10_000_000) -> int | None:
    """About how many samples certify risk <= ``max_drop`` at level ``delta`` when losses occur at ``rate``.

    The fewest n (found by doubling, then bisection) whose ``floor(rate * n)`` losses pass
    :func:`binomial_pvalue`; None when ``rate >= max_drop`` (no sample size certifies it) or past ``limit``.
    """
    if rate >= max_drop:
        return None

    def ok(n: int) -> bool:
        return binomial_pvalue(math.floor(rate * n + 1e-9), n, max_drop) <= delta

    hi = samples_needed(max_drop, delta)
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = max(hi // 2, 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
