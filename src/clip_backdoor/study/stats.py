"""The statistics of the headline, from first principles (the core install has no scipy).

- Student's t distribution: CDF through the regularised incomplete beta function (continued fraction,
  modified Lentz), quantiles by safeguarded Newton on the CDF. Tested against scipy at many points.
- ``mean_interval``: mean ± t_{(1+c)/2, n−1} · s / √n over seeds (needs two values).
- ``wilson``: the Wilson score interval of a binomial proportion k / n, the set of p with
  (k/n − p)² ≤ z² p (1 − p) / n; it stays inside [0, 1] and is honest at k = 0 (where ASR often is).
- ``paired_t``: the two-sided paired t-test of per-seed differences.
- ``paired_t_power``: that test's power for n seeds when the differences are normal with a given mean
  and standard deviation: P(|T| > t_crit) under the noncentral t with δ = mean / sd · √n, integrated
  over the χ² denominator (Simpson's rule). ``seeds_for_power``: the smallest n reaching a power.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_EPS = 1e-15
_TINY = 1e-300
_MAX_TERMS = 10_000


# ------------------------------------------------------------------------------------------------
# Distributions
# ------------------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf form), by modified Lentz."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0, x in [0, 1]."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0 (got {a}, {b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1] (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    front = math.exp(log_front)
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry beyond it.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t distribution needs df > 0 (got {df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_pdf(t: float, df: float) -> float:
    log_density = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                   - (df + 1) / 2 * math.log1p(t * t / df))
    return math.exp(log_density)


def norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _invert(cdf: Callable[[float], float], pdf: Callable[[float], float], p: float) -> float:
    """x with cdf(x) = p for a continuous distribution symmetric about 0. It is solved in the lower
    tail, where cdf values are small and exact (1 − cdf near 1 would lose digits): bracket, then
    Newton steps that fall back to bisection whenever they leave the bracket."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs p in (0, 1) (got {p})")
    if p == 0.5:
        return 0.0
    if p > 0.5:
        return -_invert(cdf, pdf, 1.0 - p)
    lo, hi = -1.0, 0.0
    while cdf(lo) > p:
        lo, hi = lo * 2.0, lo
        if lo < -1e300:
            return -math.inf
    x = 0.5 * (lo + hi)
    for _ in range(300):
        f = cdf(x) - p
        if f == 0.0:
            return x
        if f > 0:
            hi = x
        else:
            lo = x
        density = pdf(x)
        step = x - f / density if density > 0 else math.nan
        x_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-15 * max(1.0, abs(x)):
            return x_new
        x = x_new
    return x


@functools.lru_cache(maxsize=4096)
def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t distribution needs df > 0 (got {df})")
    return _invert(lambda x: t_cdf(x, df), lambda x: t_pdf(x, df), p)


@functools.lru_cache(maxsize=256)
def norm_ppf(p: float) -> float:
    """The p-quantile of the standard normal distribution."""
    return _invert(norm_cdf, norm_pdf, p)


# ------------------------------------------------------------------------------------------------
# Intervals and tests
# ------------------------------------------------------------------------------------------------
def check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise ValueError(f"confidence level {confidence!r} must lie strictly between 0 and 1")
    return float(confidence)


def t_half_width(values: Sequence[float], confidence: float = 0.95) -> float | None:
    """Half-width of the two-sided Student-t interval of the mean of ``values`` (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    q = t_ppf(0.5 + check_confidence(confidence) / 2.0, n - 1)
    return q * statistics.stdev(values) / math.sqrt(n)


def mean_interval(values: Sequence[float | None], confidence: float = 0.95
                  ) -> tuple[float | None, float | None]:
    """(mean, half-width of its t interval) over the present values; (None, None) when none are."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), t_half_width(present, confidence)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (lo, hi) of the proportion k / n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, n > 0 (got k={k}, n={n})")
    z = norm_ppf(0.5 + check_confidence(confidence) / 2.0)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class PairedTest:
    """A two-sided paired t-test of differences d_i = a_i − b_i."""

    n: int
    mean: float
    half_width: float | None  # of the mean's t interval at the requested confidence
    t: float
    df: int
    p: float


def paired_t(differences: Sequence[float], confidence: float = 0.95) -> PairedTest | None:
    """None for fewer than two differences. All-equal differences (zero spread) give t = ±inf, p = 0
    when they are not zero, and t = 0, p = 1 when they are."""
    d = list(differences)
    n = len(d)
    if n < 2:
        return None
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0.0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = min(1.0, 2.0 * t_cdf(-abs(t), n - 1))
    return PairedTest(n, mean, t_half_width(d, confidence), t, n - 1, p)


def paired_t_power(mean: float, sd: float, n: int, confidence: float = 0.95) -> float:
    """Power of the two-sided paired t-test at level 1 − confidence for n ≥ 2 normal differences."""
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences (got {n})")
    if not sd > 0:
        raise ValueError(f"the differences' standard deviation must be > 0 (got {sd})")
    df = n - 1
    c = t_ppf(0.5 + check_confidence(confidence) / 2.0, df)
    delta = abs(mean) / sd * math.sqrt(n)
    # T = (Z + δ) / S with S = sqrt(χ²_df / df), whose density is ∝ s^(df−1) exp(−df s² / 2).
    log_norm = math.log(2.0) + (df / 2.0) * math.log(df / 2.0) - math.lgamma(df / 2.0)
    steps, upper = 4000, 1.0 + 12.0 / math.sqrt(df)
    h = upper / steps
    total = 0.0
    for i in range(steps + 1):
        s = i * h
        density = 0.0 if s == 0.0 and df > 1 else math.exp(log_norm + (df - 1) * math.log(s or _TINY)
                                                             - df * s * s / 2.0)
        reject = norm_cdf(delta - c * s) + norm_cdf(-delta - c * s)
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * density * reject
    return min(1.0, total * h / 3.0)


def seeds_for_power(mean: float, sd: float, power: float = 0.8, confidence: float = 0.95,
                    max_n: int = 1000) -> int | None:
    """The smallest number of seeds whose paired t-test reaches ``power`` (None beyond max_n). Power
    grows with n, so doubling then bisecting needs O(log n) evaluations, not n."""
    def reaches(n: int) -> bool:
        return paired_t_power(mean, sd, n, confidence) >= power

    if reaches(2):
        return 2
    low, high = 2, 4  # reaches(low) is False
    while not reaches(min(high, max_n)):
        if high >= max_n:
            return None
        low, high = high, high * 2
    high = min(high, max_n)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high
