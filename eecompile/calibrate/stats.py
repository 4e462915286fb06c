"""Statistics for certifying a risk from 0/1 losses (numpy/math only, no scipy).

Exact binomial tail, the Hoeffding-Bentkus p-value (Bates et al. 2021, as used by Learn-then-Test) and the
sample size for which zero errors certify a budget.
"""

from __future__ import annotations

import math

PVALUES = ("binomial", "hoeffding_bentkus")


def binom_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], exact (log-space sum, no scipy)."""
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
    """p-value of H0: risk > alpha, from ``errors`` 0/1 losses in ``n`` samples (exact binomial tail)."""
    return binom_cdf(errors, n, alpha)


def hoeffding_bentkus_pvalue(errors: int, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0: risk > alpha (valid for any loss in [0, 1]; Bates et al. 2021)."""
    rhat = errors / n
    r = min(rhat, alpha)

    def h1(a: float, b: float) -> float:
        if a <= 0.0:
            return -math.log1p(-b)
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    hoeffding = math.exp(-n * h1(r, alpha))
    bentkus = math.e * binom_cdf(math.ceil(n * rhat), n, alpha)
    return min(1.0, hoeffding, bentkus)


def samples_needed(max_drop: float, delta: float) -> int:
    """Fewest test samples for which even zero errors certify ``risk <= max_drop`` at level ``delta``."""
    return math.ceil(math.log(delta) / math.log1p(-max_drop) - 1e-12)
