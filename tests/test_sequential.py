"""Sequential certification (Smooth.certify_sequential): Cohen et al.'s guarantee with early stopping.

The bounds of all looks hold together (alpha spent over a fixed schedule of looks), so whatever look
the rule stops at, its radius is valid. Checked as the fixed-n soundness tests are: on linear base
classifiers with exactly known radii, and on simulated binomials; and the same checks reject the
rule with the anytime correction removed (every look at the full alpha).
"""

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from rcm import stats
from rcm.smoothing import ABSTAIN, Smooth, noise_generator
from stubs import Buckets, Constant
from test_smoothing import _linear_setup


def naive(monkeypatch):
    """The unsound variant: each look's bound at the full alpha (no correction for looking often)."""
    monkeypatch.setattr(stats, "sequential_levels", lambda num_looks, alpha: alpha)


def test_schedule_is_geometric_and_fixed_in_advance():
    assert stats.look_schedule(1000, 100, growth=2) == [100, 200, 400, 800, 1000]
    assert stats.look_schedule(1000, 100) == [100, 150, 225, 338, 507, 761, 1000]
    assert stats.look_schedule(100, 100) == [100] and stats.look_schedule(50, 100) == [50]
    assert stats.look_schedule(5, 1, growth=1.1) == [1, 2, 3, 4, 5]  # always at least one more draw
    looks = stats.look_schedule(100_000)
    assert len(looks) == 18 and looks[-2:] == [65_880, 100_000]  # 98 820 is within 5% of n_max: merged
    assert stats.sequential_levels(len(looks), 0.001) * len(looks) <= 0.001
    # every look but the last is at least 5% short of n_max; merging only ever drops looks
    for n_max, first in [(100_000, 100), (3200, 25), (1600, 10), (1000, 100), (20, 1)]:
        looks = stats.look_schedule(n_max, first)
        assert all(n_max - n >= 0.05 * n_max for n in looks[:-1]) and looks[-1] == n_max
        assert looks == sorted(set(looks))


def simulate_exceedance(p: float, n_max: int, first: int, alpha: float, trials: int, seed: int,
                        corrected: bool = True) -> float:
    """Fraction of simulated draw sequences in which some look's lower bound exceeds p."""
    rng = np.random.default_rng(seed)
    looks = stats.look_schedule(n_max, first)
    level = stats.sequential_levels(len(looks), alpha) if corrected else alpha
    counts = np.cumsum(rng.binomial(np.diff([0, *looks]), p, size=(trials, len(looks))), axis=1)
    lower = stats.lower_confidence_bound(counts, np.array(looks), level)
    return float((lower > p).any(axis=1).mean())


@pytest.mark.parametrize("p", [0.55, 0.8, 0.95, 0.995])
def test_every_looks_bound_holds_together_at_rate_alpha(p):
    """P(some look's lower bound > p_A) <= alpha, at any p_A; the uncorrected looks exceed it."""
    alpha, trials = 0.05, 40_000
    rate = simulate_exceedance(p, 3200, 25, alpha, trials, seed=1)
    assert rate <= binom.ppf(1 - 1e-6, trials, alpha) / trials
    uncorrected = simulate_exceedance(p, 3200, 25, alpha, trials, seed=1, corrected=False)
    if p < 0.99:  # near 1 a bound cannot exceed p_A with these n: the naive rule is harmless there
        assert uncorrected > binom.ppf(1 - 1e-6, trials, alpha) / trials


def _failures(sigma=0.25, alpha=0.05, n0=10, n_max=1600, first=10):
    """Wrong-class or over-radius certificates of the sequential rule on linear classifiers."""
    model, xs, margin = _linear_setup()
    smooth = Smooth(model, 2, sigma)
    radii = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]
    level = stats.sequential_levels(len(stats.look_schedule(n_max, first)), alpha)
    failures, certified, samples = 0, 0, []
    for i, x in enumerate(xs):
        pred, r, n_a, p_a, used = smooth.certify_sequential_with_details(
            x, n0, n_max, alpha, 4096, radii, noise_generator(1, "seq", sigma, i), first=first)
        samples.append(used)
        if pred == ABSTAIN:
            assert r == 0.0 and p_a < 0.5
            continue
        certified += 1
        assert r == pytest.approx(sigma * norm.ppf(stats.lower_confidence_bound(n_a, used - n0, level)), abs=1e-12)
        if pred != int(margin[i] > 0) or r > abs(margin[i]):
            failures += 1
    return failures, certified, np.array(samples), len(xs)


def test_sequential_radius_exceeds_true_radius_at_rate_at_most_alpha():
    failures, certified, samples, total = _failures()
    assert certified > 500  # the check has something to bite on
    assert failures <= binom.ppf(1 - 1e-6, total, 0.05)
    assert samples.min() < 1610 and samples.max() <= 1610  # some stop early, none goes past n_max


def _keep_looking_failures(trials=2000, sigma=0.25, p_a=0.8, alpha=0.05):
    """Where optional stopping bites: p_A = 0.8 known exactly, and a target radius just above the
    true one, so the rule keeps looking until its upper bound rules that target out. A failure is
    a wrong class or a radius above the true sigma * Phi^-1(p_A)."""
    smooth = Smooth(Buckets([sigma * norm.ppf(p_a)], [0, 1], 2), 2, sigma)
    true_radius = sigma * norm.ppf(p_a)
    failures = 0
    for i in range(trials):
        pred, r, _ = smooth.certify_sequential(torch.zeros(1, 2, 2), 10, 3200, alpha, 4096,
                                               [0.0, true_radius + 0.01], noise_generator(2, "keep", sigma, i),
                                               first=25)
        failures += pred not in (0, ABSTAIN) or r > true_radius
    return failures, trials


def test_keep_looking_case_is_sound_and_rejects_the_uncorrected_rule(monkeypatch):
    failures, trials = _keep_looking_failures()
    assert failures <= binom.ppf(1 - 1e-6, trials, 0.05)
    naive(monkeypatch)
    failures, trials = _keep_looking_failures()
    assert failures > binom.ppf(1 - 1e-6, trials, 0.05)


def test_a_sure_image_stops_once_the_largest_reachable_radius_is_certified():
    sigma, alpha, n_max = 0.25, 0.001, 100_000
    smooth = Smooth(Constant(3, 10), 10, sigma)
    radii = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    pred, r, used = smooth.certify_sequential(torch.zeros(1, 4, 4), 100, n_max, alpha, 10_000, radii)
    level = stats.sequential_levels(len(stats.look_schedule(n_max)), alpha)
    top = stats.reachable_targets(radii, sigma, n_max, level)[-1]
    assert pred == 3 and top == 0.75 and r >= top
    assert used - 100 in stats.look_schedule(n_max) and used <= 100 + n_max // 5
    # it stopped at the first look that certifies the top target
    earlier = max(n for n in stats.look_schedule(n_max) if n < used - 100)
    assert sigma * norm.ppf(stats.lower_confidence_bound(earlier, earlier, level)) < top


def test_a_hopeless_image_abstains_early():
    # P = 0.40 / 0.35 / 0.25 for classes 0 / 1 / 2: no class reaches 1/2, so nothing is certifiable
    sigma = 0.5
    smooth = Smooth(Buckets([sigma * norm.ppf(0.40), sigma * norm.ppf(0.75)], [0, 1, 2], 3), 3, sigma)
    for i in range(10):
        pred, r, used = smooth.certify_sequential(torch.zeros(1, 2, 2), 100, 100_000, 0.001, 10_000,
                                                  [0.0, 0.25, 0.5], noise_generator(0, "hopeless", sigma, i))
        assert (pred, r) == (ABSTAIN, 0.0) and used <= 100 + 2_000


def test_unreachable_radii_are_an_error():
    with pytest.raises(ValueError, match="raise n_max"):
        Smooth(Constant(0, 2), 2, 0.25).certify_sequential(torch.zeros(1, 2, 2), 10, 10, 0.001, 10, [1.0])
