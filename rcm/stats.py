"""The statistics of randomized smoothing, as pure functions of counts (no network).

All bounds are exact Clopper-Pearson (Beta quantile) bounds. With K successes out of N:
  one-sided (1 - alpha) lower bound  = Beta.ppf(alpha;     K,     N - K + 1)   (0 when K = 0)
  one-sided (1 - alpha) upper bound  = Beta.ppf(1 - alpha; K + 1, N - K)       (1 when K = N)
The two-sided (1 - 2 alpha) interval is the pair of them. Cohen et al. (2019), Theorem 1: if the
smoothed classifier's top-class probability is at least p_A > 1/2, its prediction is constant within
L2 radius sigma * Phi^-1(p_A).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, binomtest, norm

ABSTAIN = -1


def lower_confidence_bound(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (arrays allowed)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        b = beta.ppf(alpha, k, n - k + 1)
    return np.where(k > 0, b, 0.0)[()]


def upper_confidence_bound(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion (arrays allowed)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        b = beta.ppf(1 - alpha, k + 1, n - k)
    return np.where(k < n, b, 1.0)[()]


def clopper_pearson_interval(k, n, alpha):
    """Two-sided (1 - 2 alpha) interval [lower, upper]: each side fails with probability <= alpha."""
    return lower_confidence_bound(k, n, alpha), upper_confidence_bound(k, n, alpha)


def radius(sigma: float, p_lower: float, p0: float = 0.5) -> float:
    """sigma * (Phi^-1(p_lower) - Phi^-1(p0)); with p0 = 1/2 this is Cohen et al.'s radius."""
    return float(sigma * (norm.ppf(p_lower) - norm.ppf(p0)))


def top_class(counts) -> int:
    """argmax of counts; ties go to the lowest class index."""
    return int(np.argmax(np.asarray(counts)))


def certify_from_counts(counts_selection, counts_estimation, alpha: float, sigma: float):
    """CERTIFY of Cohen et al. given both count vectors (selection n0 draws, fresh estimation n draws).

    Returns (prediction, radius, count_a, p_a_lower); prediction is ABSTAIN with radius 0 when the
    lower bound on p_A is below 1/2.
    """
    c_hat = top_class(counts_selection)
    counts_estimation = np.asarray(counts_estimation)
    n = int(counts_estimation.sum())
    n_a = int(counts_estimation[c_hat])
    p_a = float(lower_confidence_bound(n_a, n, alpha))
    if p_a < 0.5:
        return ABSTAIN, 0.0, n_a, p_a
    return c_hat, radius(sigma, p_a), n_a, p_a


def predict_from_counts(counts, alpha: float) -> int:
    """PREDICT of Cohen et al.: the top class unless a two-sided binomial test of the top two
    counts n1 vs n2 against 1/2 has p-value > alpha (then ABSTAIN). Wrong with probability <= alpha."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")  # stable: ties keep the lowest index first
    n1, n2 = int(counts[order[0]]), int(counts[order[1]]) if len(counts) > 1 else 0
    if n1 + n2 == 0 or binomtest(n1, n1 + n2, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def max_other_class_upper_bound(counts, exclude: int, alpha: float) -> float:
    """An upper bound on the largest probability of any class except ``exclude`` that fails with
    probability <= alpha, for every number of classes C >= 2 and whichever class is excluded, even
    one chosen from the same or other data (docs/methods.md, "The off-class bound").

    Each other class gets a one-sided Clopper-Pearson upper bound at alpha / 2. The bound can only
    fail if the bound of one of the two most probable classes m1, m2 (fixed by the distribution,
    not by the counts) fails: a class c != exclude above the maximum has p_c <= p_m1, and if m1 is
    the excluded one, p_c <= p_m2 with m2 not excluded. Two bounds at alpha / 2 each: alpha.
    """
    counts = np.asarray(counts)
    others = np.delete(counts, exclude)
    if len(others) == 0:
        return 0.0
    n = counts.sum()
    return float(np.max(upper_confidence_bound(others, n, alpha / 2)))


# ------------------------------------------------------------------------------ sequential certification

MERGE = 0.05  # a look closer than this fraction of n_max to n_max is merged into the last look


def look_schedule(n_max: int, first: int = 100, growth: float = 1.5) -> list[int]:
    """Cumulative numbers of estimation draws at which a sequential certificate looks: first, then
    growing by ``growth`` each look (rounded up), and n_max last; a look within MERGE (5%) of n_max
    is dropped (merged into the last one): it would stop an image at most 5% before n_max but
    costs every look a share of alpha. Fixed before any draw, so the union bound of
    ``sequential_levels`` covers every look. A look overshoots the draws an image needed by at most
    the factor ``growth``; each look costs a share of alpha, but only about log(n_max / first) /
    log(growth) of them are made (18 for n_max = 100 000 from 100 at 1.5: 100, 150, ..., 65 880,
    100 000; the look at 98 820 is merged)."""
    if n_max < 1 or first < 1 or not growth > 1:
        raise ValueError(f"need n_max >= 1, first >= 1, growth > 1; got {n_max}, {first}, {growth}")
    looks, n = [], min(first, n_max)
    while n < n_max:
        if n_max - n >= MERGE * n_max:
            looks.append(n)
        n = max(n + 1, math.ceil(n * growth))
    return looks + [n_max]


def sequential_levels(num_looks: int, alpha: float) -> float:
    """The level of each look's bound: alpha spent evenly over the looks (a union bound), so the
    bounds of all looks hold together with probability >= 1 - alpha."""
    return alpha / num_looks


def sequential_stop(k: int, n: int, level: float, sigma: float, targets, p0: float = 0.5) -> bool:
    """Whether a sequential certificate may stop after k of n draws landed on the selected class.

    ``targets`` are the radii that matter (e.g. a report's columns), ascending, each one reachable
    within n_max. Stop when the lower bound certifies the largest target, or when the upper bound
    at the same level shows that the next target above the one certified now is out of reach. The
    rule only decides when to stop: the radius is valid whatever it decides (docs/methods.md).
    ``p0``: the cascade's threshold (radius sigma (Phi^-1(p) - Phi^-1(p0)); 1/2 for Cohen et al.)."""
    lower = float(lower_confidence_bound(k, n, level))
    above = [r for r in targets if lower < threshold(r, sigma, p0)]
    if not above:
        return True
    return float(upper_confidence_bound(k, n, level)) < threshold(above[0], sigma, p0)


def threshold(r: float, sigma: float, p0: float = 0.5) -> float:
    """The p_A that certifies radius r at noise sigma: Phi(r / sigma + Phi^-1(p0)); for r = 0, just
    above p0 (a lower bound of exactly p0 abstains). p0 = 1/2: Phi(r / sigma)."""
    if r <= 0:
        return float(np.nextafter(p0, 1.0))
    return float(norm.cdf(r / sigma + norm.ppf(p0)))


def reachable_targets(radii, sigma: float, n_max: int, level: float, p0: float = 0.5) -> list[float]:
    """The radii a bound at ``level`` can certify with n_max draws at most (all of them on the
    selected class gives the largest lower bound, level ** (1 / n_max)), ascending."""
    best = float(lower_confidence_bound(n_max, n_max, level))
    return sorted(r for r in {float(r) for r in radii} if r >= 0 and threshold(r, sigma, p0) <= best)


def oracle_draws(p_a: float, target: float, alpha: float) -> float:
    """The fewest estimation draws n with which a fixed-n Clopper-Pearson lower bound at ``alpha``
    reaches ``target`` when the count is its expectation n * p_a (p_a known exactly): the least n
    with Beta.ppf(alpha; n p_a, n (1 - p_a) + 1) >= target. inf when p_a <= target (no n is enough).

    The yardstick of a stopping rule: an image whose certificate needs the lower bound to reach
    ``target`` cannot be expected to stop, with any rule at level alpha, before about this many
    draws (a rule at a smaller level, as the sequential one is, needs more)."""
    if not 0 < target < 1 or not 0 < alpha < 1:
        raise ValueError(f"need target and alpha in (0, 1), got {target}, {alpha}")
    if not p_a > target:
        return math.inf

    def reaches(n: int) -> bool:
        return float(lower_confidence_bound(n * p_a, n, alpha)) >= target

    high = 1
    while not reaches(high):
        high *= 2
        if high > 2 ** 62:
            return math.inf
    low = high // 2  # reaches(low) is False (or low = 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return float(high)
