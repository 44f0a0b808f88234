"""study/stats.py against scipy (the dev install has it) at many points, and intervals against brute
force: the Wilson interval is the set of p whose score test accepts k / n, found by scanning p."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from clip_backdoor.study import stats

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


def test_incomplete_beta_matches_scipy_at_many_points():
    rng = random.Random(0)
    points = [(10 ** rng.uniform(-1, 3), 10 ** rng.uniform(-1, 3), rng.random()) for _ in range(2000)]
    points += [(a, b, x) for a in (0.5, 1, 2.5, 30) for b in (0.5, 1, 7)
               for x in (0.0, 1e-9, 0.5, 0.999, 1.0)]
    for a, b, x in points:
        expected = float(scipy_special.betainc(a, b, x))
        assert stats.betainc(a, b, x) == pytest.approx(expected, abs=1e-12), (a, b, x)


@pytest.mark.parametrize("df", [0.5, 1, 2, 3, 4, 5, 7, 9, 10, 19, 29, 100, 1000, 2.5])
def test_t_cdf_and_quantiles_match_scipy(df):
    for t in (-80, -12, -4, -2.3, -1, -0.2, 0, 0.3, 1.5, 2.776, 3, 10, 50):
        assert stats.t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-12), t
    for p in (1e-6, 1e-3, 0.005, 0.025, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.975, 0.995, 0.999, 1 - 1e-6):
        expected = float(scipy_stats.t.ppf(p, df))
        assert stats.t_ppf(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12), p
        assert stats.t_cdf(stats.t_ppf(p, df), df) == pytest.approx(p, rel=1e-9)


def test_t_pdf_and_normal_match_scipy():
    for df in (1, 3, 30):
        for t in (-3, 0, 0.7, 5):
            assert stats.t_pdf(t, df) == pytest.approx(float(scipy_stats.t.pdf(t, df)), rel=1e-12)
    for p in (1e-8, 0.01, 0.025, 0.3, 0.5, 0.8, 0.975, 0.995):
        assert stats.norm_ppf(p) == pytest.approx(float(scipy_stats.norm.ppf(p)), rel=1e-10, abs=1e-12)
    assert stats.norm_ppf(0.975) == pytest.approx(1.959963984540054, rel=1e-12)


def test_known_table_values():
    # Student's t table: two-sided 95% with 1, 2, 4, 9 degrees of freedom
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622)):
        assert stats.t_ppf(0.975, df) == pytest.approx(q, abs=1e-4)
    assert stats.t_cdf(0, 5) == 0.5 and stats.t_cdf(math.inf, 3) == 1.0 and stats.t_cdf(-math.inf, 3) == 0.0


def test_mean_interval_matches_scipy_t_interval():
    rng = random.Random(1)
    for n in (2, 3, 5, 10):
        values = [rng.gauss(0.3, 0.1) for _ in range(n)]
        for confidence in (0.8, 0.95, 0.99):
            mean, half = stats.mean_interval(values, confidence)
            lo, hi = scipy_stats.t.interval(confidence, n - 1, loc=statistics.fmean(values),
                                            scale=scipy_stats.sem(values))
            assert mean - half == pytest.approx(lo, rel=1e-9) and mean + half == pytest.approx(hi, rel=1e-9)
    assert stats.mean_interval([0.4], 0.95) == (0.4, None)  # one value: a mean, no interval
    mean, half = stats.mean_interval([None, 0.2, None, 0.4])  # absent values are left out
    assert mean == pytest.approx(0.3) and half == pytest.approx(12.7062 * 0.1, rel=1e-5)
    assert stats.mean_interval([None]) == (None, None)


def test_t_interval_covers_the_mean_as_often_as_it_says():
    """Brute force: draws of 4 normal values; the 90% interval covers the true mean in ~90% of them."""
    rng = random.Random(2)
    trials, covered = 4000, 0
    for _ in range(trials):
        values = [rng.gauss(1.0, 2.0) for _ in range(4)]
        mean, half = stats.mean_interval(values, 0.90)
        covered += abs(mean - 1.0) <= half
    assert abs(covered / trials - 0.90) < 4 * math.sqrt(0.9 * 0.1 / trials)


def _wilson_by_scanning(k: int, n: int, z: float, steps: int = 200_000) -> tuple[float, float]:
    accepted = [i / steps for i in range(steps + 1)
                if (k / n - i / steps) ** 2 <= z * z * (i / steps) * (1 - i / steps) / n]
    return min(accepted), max(accepted)


@pytest.mark.parametrize("k, n", [(0, 270), (1, 270), (5, 270), (13, 270), (135, 270), (265, 270), (270, 270),
                                  (0, 10), (3, 10), (10, 10), (1, 1), (0, 1), (450, 900)])
def test_wilson_interval_is_the_score_test_acceptance_set(k, n):
    lo, hi = stats.wilson(k, n, 0.95)
    scan_lo, scan_hi = _wilson_by_scanning(k, n, stats.norm_ppf(0.975))
    assert lo == pytest.approx(scan_lo, abs=1e-5) and hi == pytest.approx(scan_hi, abs=1e-5)
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_edges_and_bad_input():
    assert stats.wilson(0, 50)[0] == 0.0 and stats.wilson(50, 50)[1] == 1.0
    narrow, wide = stats.wilson(10, 100, 0.8), stats.wilson(10, 100, 0.99)
    assert wide[0] < narrow[0] < 0.1 < narrow[1] < wide[1]
    for k, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError):
            stats.wilson(k, n)
    for confidence in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            stats.wilson(1, 10, confidence)


def test_paired_t_matches_scipy():
    rng = random.Random(3)
    for n in (2, 3, 5, 10):
        a = [rng.gauss(0.0, 1.0) for _ in range(n)]
        b = [x + rng.gauss(0.4, 0.5) for x in a]
        result = stats.paired_t([x - y for x, y in zip(a, b)])
        expected = scipy_stats.ttest_rel(a, b)
        assert result.t == pytest.approx(float(expected.statistic), rel=1e-9)
        assert result.p == pytest.approx(float(expected.pvalue), rel=1e-8)
        assert result.df == n - 1 and result.n == n


def test_paired_t_degenerate_cases():
    assert stats.paired_t([0.3]) is None and stats.paired_t([]) is None
    zero = stats.paired_t([0.0, 0.0, 0.0])
    assert zero.p == 1.0 and zero.t == 0.0
    same = stats.paired_t([0.2, 0.2, 0.2])
    assert same.p == 0.0 and same.t == math.inf and same.half_width == 0.0
