"""The statistics of certification: worked values of DESIGN §3 and Clopper-Pearson coverage."""

import numpy as np
import pytest
from scipy.stats import beta, binom, binomtest, norm

from rcm import stats
from rcm.stats import ABSTAIN

ALPHA = 0.001


def cohen(n_a, n, sigma, alpha=ALPHA):
    return stats.certify_from_counts([0, 1], [n - n_a, n_a], alpha, sigma)


def test_radius_cap_at_n_100000():
    p = stats.lower_confidence_bound(100_000, 100_000, ALPHA)
    assert p == pytest.approx(0.9999309248, abs=1e-10)
    assert p == pytest.approx(ALPHA ** (1 / 100_000), rel=1e-12)  # closed form when n_A = n
    _, r, _, _ = cohen(100_000, 100_000, 1.0)
    assert r == pytest.approx(3.8115, abs=5e-5)


@pytest.mark.parametrize("n_a,n,sigma,expected", [
    (99_000, 100_000, 0.5, 1.145000),
    (50_500, 100_000, 0.5, 0.000137),
    (980, 1000, 1.0, 1.778034),
])
def test_worked_radii(n_a, n, sigma, expected):
    pred, r, count, _ = cohen(n_a, n, sigma)
    assert pred == 1 and count == n_a
    assert r == pytest.approx(expected, abs=5e-7 if expected > 0.01 else 5e-7)


def test_half_abstains_and_10000_cap():
    assert cohen(50_000, 100_000, 1.0)[:2] == (ABSTAIN, 0.0)
    assert norm.ppf(stats.lower_confidence_bound(10_000, 10_000, ALPHA)) == pytest.approx(3.1986, abs=5e-5)


def test_bounds_are_clopper_pearson():
    # The one-sided (1 - a) bounds are the two ends of the two-sided (1 - 2a) exact interval.
    for k, n in [(0, 10), (3, 10), (10, 10), (517, 1000)]:
        lo, hi = stats.clopper_pearson_interval(k, n, 0.025)
        assert lo == (0.0 if k == 0 else pytest.approx(beta.ppf(0.025, k, n - k + 1)))
        assert hi == (1.0 if k == n else pytest.approx(beta.ppf(0.975, k + 1, n - k)))


def test_selection_ties_take_lowest_index():
    assert stats.top_class([3, 7, 7, 1]) == 1


@pytest.mark.parametrize("p,n", [(0.6, 50), (0.9, 100), (0.99, 200), (0.999, 1000)])
def test_lower_bound_coverage(p, n):
    """P(lower bound > true p) <= alpha, checked over 200 000 simulated binomials per case."""
    alpha, trials = 0.05, 200_000
    k = np.random.default_rng(0).binomial(n, p, size=trials)
    failures = int(np.sum(stats.lower_confidence_bound(k, n, alpha) > p))
    # Allow binomial slack above alpha: a failure count this high has probability < 1e-6 if the rate is alpha.
    assert failures <= binom.ppf(1 - 1e-6, trials, alpha)
    # Exact check: the failure probability under Binomial(n, p) is computable; it must be <= alpha.
    ks = np.arange(n + 1)
    assert binom.pmf(ks, n, p)[stats.lower_confidence_bound(ks, n, alpha) > p].sum() <= alpha


def test_coverage_check_has_power():
    """The coverage check rejects an anti-conservative bound (the point estimate), so it can fail."""
    alpha, trials, n, p = 0.05, 200_000, 100, 0.9
    k = np.random.default_rng(0).binomial(n, p, size=trials)
    assert np.sum(k / n > p) > binom.ppf(1 - 1e-6, trials, alpha)


def test_upper_bound_coverage():
    alpha, trials, n, p = 0.05, 200_000, 80, 0.3
    k = np.random.default_rng(1).binomial(n, p, size=trials)
    failures = int(np.sum(stats.upper_confidence_bound(k, n, alpha) < p))
    assert failures <= binom.ppf(1 - 1e-6, trials, alpha)


def test_predict_follows_binomial_test():
    # Both branches, and the decision equals scipy's two-sided binomtest p-value against alpha.
    for counts in ([60, 40, 0], [90, 10, 0], [0, 0, 51], [0, 5, 49, 46], [500, 430]):
        top2 = sorted(counts, reverse=True)[:2]
        expected = (ABSTAIN if binomtest(top2[0], sum(top2), 0.5).pvalue > 0.01
                    else int(np.argmax(counts)))
        assert stats.predict_from_counts(counts, 0.01) == expected
    assert stats.predict_from_counts([90, 10, 0], 0.01) == 0
    assert stats.predict_from_counts([0, 5, 49, 46], 0.01) == ABSTAIN


def test_max_other_class_bound_puts_half_of_alpha_on_each_class():
    counts = np.array([10, 700, 250, 40])
    b = stats.max_other_class_upper_bound(counts, exclude=1, alpha=0.03)
    assert b == pytest.approx(beta.ppf(1 - 0.015, 251, 1000 - 250))
    # two classes: the one other class, still at alpha / 2 (which class is excluded may be random)
    assert stats.max_other_class_upper_bound(np.array([300, 700]), exclude=1, alpha=0.03) == \
        pytest.approx(beta.ppf(1 - 0.015, 301, 700))


def test_max_other_class_bound_holds_at_alpha_whichever_class_is_excluded():
    """The adversary excludes, after seeing the counts, the class whose exclusion makes the bound
    fail if any does: the failure rate is still <= alpha, for two classes and for ten. Bonferroni
    over the C - 1 other classes (alpha / (C - 1) each) fails this at C = 2."""
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.1, 200, 5_000
    limit = alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    for p in (np.array([0.5, 0.5]), np.array([0.3, 0.3, 0.3] + [0.1 / 7] * 7)):
        counts = rng.multinomial(n, p, size=trials)

        def fails(bound):
            return np.mean([any(bound(c, e) < np.max(np.delete(p, e)) for e in range(len(p)))
                            for c in counts])
        rate = fails(lambda c, e: stats.max_other_class_upper_bound(c, e, alpha))
        assert rate <= limit, (len(p), rate)
        if len(p) == 2:
            bonferroni = fails(lambda c, e: float(np.max(stats.upper_confidence_bound(
                np.delete(c, e), n, alpha / (len(p) - 1)))))
            assert bonferroni > limit, bonferroni


def test_oracle_draws_is_the_least_n_whose_bound_at_the_expected_count_reaches_the_target():
    import math

    # p_A = 1: the bound with all n draws on the class is alpha ** (1 / n)
    for target in (0.6, 0.9, 0.99):
        assert stats.oracle_draws(1.0, target, 0.001) == math.ceil(math.log(0.001) / math.log(target))
    for p, target, alpha in [(0.99, 0.95, 0.001), (0.7, 0.6, 0.01), (0.9, 0.5 + 1e-9, 0.05)]:
        n = stats.oracle_draws(p, target, alpha)
        assert stats.lower_confidence_bound(n * p, n, alpha) >= target
        assert all(stats.lower_confidence_bound(m * p, m, alpha) < target for m in range(1, int(n)))
    assert stats.oracle_draws(0.6, 0.6, 0.001) == math.inf and stats.oracle_draws(0.5, 0.7, 0.001) == math.inf
