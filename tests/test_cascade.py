"""Cascaded multi-scale certification (DESIGN §4) on base classifiers with known behaviour."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from rcm import stats
from rcm.cascade import certify_cascade, stage_alpha
from rcm.smoothing import ABSTAIN, Smooth, noise_generator
from stubs import Buckets, Constant

X = torch.zeros(1, 3, 3)
N0, N, ALPHA = 100, 2000, 0.001


def gens(sigmas, idx=0):
    return [noise_generator(0, "cascade-test", s, idx) for s in sigmas]


@pytest.mark.parametrize("split,level", [("uniform", ALPHA / 3), ("harmonic", ALPHA)])
def test_top_scale_certifies(split, level):
    members = [(1.0, Constant(2, 10)), (0.5, Constant(7, 10))]
    r = certify_cascade(members, X, 10, N0, N, ALPHA, 500, generators=gens([1.0, 0.5]), alpha_split=split)
    assert (r.prediction, r.stage, r.sigma) == (2, 1, 1.0)
    # all N draws say 2, so p_L = level^(1/N): alpha / (2K - 1) uniform, alpha / 1 harmonic
    assert r.p_a_lower == pytest.approx(level ** (1 / N))
    assert r.radius == pytest.approx(1.0 * norm.ppf(level ** (1 / N)))
    assert r.samples == N0 + N


def test_stage_levels():
    assert [stage_alpha(0.003, k, 3) for k in (1, 2, 3)] == pytest.approx([0.0006] * 3)
    assert [stage_alpha(0.006, k, 3, "harmonic") for k in (1, 2, 3)] == pytest.approx([0.006, 0.003, 0.002])
    with pytest.raises(ValueError):
        stage_alpha(0.1, 1, 2, "bonferroni")


@pytest.mark.parametrize("split", ["uniform", "harmonic"])
def test_lower_scale_radius_from_its_own_bound_at_the_stage_level(split):
    # Top scale: class 0 with p = 0.02, the rest spread thin -> confidently passes with a small
    # off-class bound, so the cap is loose and R_2 = sigma_2 Phi^-1(p_L) binds.
    s1, s2 = 1.0, 0.25
    top = Buckets([s1 * norm.ppf(q) for q in np.linspace(0.1, 0.9, 9)], list(range(10)), 10)
    members = [(s1, top), (s2, Buckets([s2 * norm.ppf(0.97)], [3, 4], 10))]  # class 3 w.p. 0.97
    r = certify_cascade(members, X, 10, N0, N, ALPHA, 500, generators=gens([s1, s2]), alpha_split=split)
    assert (r.prediction, r.stage) == (3, 2)
    level = stage_alpha(ALPHA, 2, 2, split)
    assert r.p_a_lower == pytest.approx(stats.lower_confidence_bound(r.count_a, N, level))
    assert r.radius == pytest.approx(s2 * norm.ppf(r.p_a_lower))


def test_p0_above_half_shifts_the_radius():
    members = [(0.5, Constant(1, 3))]
    r = certify_cascade(members, X, 3, N0, N, ALPHA, 500, p0=0.6, generators=gens([0.5]))
    assert r.radius == pytest.approx(0.5 * (norm.ppf(ALPHA ** (1 / N)) - norm.ppf(0.6)))


@pytest.mark.parametrize("p0", [0.3, 0.4999, 1.0])
def test_p0_outside_half_to_one_is_rejected(p0):
    with pytest.raises(ValueError, match="p0"):
        certify_cascade([(0.5, Constant(1, 3))], X, 3, N0, N, ALPHA, 500, p0=p0)


def test_lower_scale_certifies_with_radius_capped_by_the_top_scale():
    # Top scale: class 0 with p = 0.40, class 1 with p = 0.60 - split into 1 (0.35) and 2 (0.25):
    # no class reaches 0.5 -> confidently pass. Second scale: always class 1.
    s1, s2 = 1.0, 0.5
    e1, e2 = s1 * norm.ppf(0.40), s1 * norm.ppf(0.75)
    top = Buckets([e1, e2], [0, 1, 2], 3)
    members = [(s1, top), (s2, Constant(1, 3))]
    r = certify_cascade(members, X, 3, N0, N, ALPHA, 500, generators=gens([s1, s2]), alpha_split="harmonic")
    assert (r.prediction, r.stage, r.sigma) == (1, 2, s2)
    # Recompute the counts the cascade saw (same generators) and the radius DESIGN §4 prescribes.
    g1 = gens([s1])[0]
    Smooth(top, 3, s1).sample_counts(X, N0, 500, g1)
    counts1 = Smooth(top, 3, s1).sample_counts(X, N, 500, g1)
    alpha_2 = ALPHA / 2
    r_2 = s2 * norm.ppf(stats.lower_confidence_bound(N, N, alpha_2))
    p_bar = stats.max_other_class_upper_bound(counts1, 1, alpha_2)
    cap = s1 * (0 - norm.ppf(p_bar))
    assert cap < r_2  # the cap binds
    assert r.radius == pytest.approx(cap)
    assert r.samples == 2 * (N0 + N)


def test_undecidable_scale_abstains():
    # A fair coin at the top scale: p_L < 0.5 <= p_U -> ABSTAIN at stage 1, no lower scale tried.
    members = [(1.0, Buckets([0.0], [0, 1], 2)), (0.5, Constant(1, 2))]
    r = certify_cascade(members, X, 2, N0, N, ALPHA, 500, generators=gens([1.0, 0.5]))
    assert (r.prediction, r.radius, r.stage) == (ABSTAIN, 0.0, 1)


def test_every_scale_passes_abstains():
    top = Buckets([norm.ppf(1 / 3), norm.ppf(2 / 3)], [0, 1, 2], 3)
    members = [(1.0, top), (0.5, Buckets([0.5 * norm.ppf(1 / 3), 0.5 * norm.ppf(2 / 3)], [0, 1, 2], 3))]
    r = certify_cascade(members, X, 3, N0, N, ALPHA, 500, generators=gens([1.0, 0.5]))
    assert (r.prediction, r.stage) == (ABSTAIN, 0) and math.isnan(r.sigma)


def test_single_member_equals_cohen_two_sided_level():
    # With one scale and p0 = 1/2 the cascade certifies like Cohen et al. at alpha.
    members = [(0.25, Constant(4, 5))]
    r = certify_cascade(members, X, 5, N0, N, ALPHA, 500, generators=gens([0.25]))
    p, rad = Smooth(Constant(4, 5), 5, 0.25).certify(X, N0, N, ALPHA, 500, gens([0.25])[0])
    assert (r.prediction, r.radius) == (p, pytest.approx(rad))


def test_cascade_rejects_unsorted_scales():
    with pytest.raises(ValueError):
        certify_cascade([(0.25, Constant(0, 2)), (0.5, Constant(0, 2))], X, 2, 10, 10, 0.01, 10)


def _false_certificate_rates(num_classes: int, trials: int, alpha: float, n: int, n0: int) -> dict:
    """Rates of certificates with R > 0 on a cascade where every such certificate is false (below)."""
    s1, s2 = 1.0, 0.5
    # sigma_1: class 0 on one side of a half-space through x (P = 1/2); the other side split evenly
    # over classes 1 .. C - 1 (C = 2: class 1 with P = 1/2). sigma_2: always class 1.
    rest = num_classes - 1
    edges = [0.0] + [s1 * norm.ppf(0.5 + 0.5 * i / rest) for i in range(1, rest)]
    members = [(s1, Buckets(edges, list(range(num_classes)), num_classes)), (s2, Constant(1, num_classes))]
    x = torch.zeros(1, 2, 2)
    false = {"uniform": 0, "harmonic": 0}
    for t in range(trials):
        for split in false:
            r = certify_cascade(members, x, num_classes, n0, n, alpha, n,
                                generators=gens([s1, s2], idx=t), alpha_split=split)
            false[split] += r.radius > 0
    return {split: count / trials for split, count in false.items()}


@pytest.mark.parametrize("num_classes,n0", [(2, 2), (10, 100)])
def test_cascade_is_sound_where_every_positive_radius_is_false(num_classes, n0):
    """At sigma_1 the base classifier gives class 0 on a half-space through x, so P(0) = 1/2 and the
    smoothed classifier at sigma_1 flips under any shift (p0 = 1/2), and the cascade's answer with
    it; at sigma_2 it always says 1. So every certificate with R > 0 is false, and their rate over
    independent noise is the cascade's failure rate. A stage-2 certificate is issued exactly when
    the off-class bound of class 0 at sigma_1 fails (it excludes class 1, the class stage 2 picks),
    so the case bites on that bound, for two classes and for ten (where the other side of the
    half-space is spread over nine classes and stage 1 always selects class 0).

    With the default split the rate stays <= alpha; with the harmonic split (Jeong & Shin's
    alpha / k) it exceeds alpha: a stage-1 certificate (lower bound at alpha) and a stage-2 one
    (the off-class bound at sigma_1, at alpha / 2 / 2) fail on disjoint events (docs/methods.md).
    Stage 1 selects class 0 with probability 3/4 at C = 2 (n0 = 2: a 1-1 tie goes to class 0) and
    almost surely at C = 10 (n0 = 100 draws against nine classes of 1/18 each)."""
    alpha, trials = 0.2, 20_000
    rate = _false_certificate_rates(num_classes, trials, alpha, n=500, n0=n0)
    slack = 3 * math.sqrt(alpha * (1 - alpha) / trials)
    print(f"\nfalse-certificate rates at alpha = {alpha}, C = {num_classes}: {rate}")
    assert rate["uniform"] <= alpha + slack
    assert rate["harmonic"] > alpha + slack


# ------------------------------------------------------------------------------ sequential cascades

def _adversarial(num_classes: int):
    """The members of the case above: at sigma_1 class 0 on a half-space through x, the other side
    spread over classes 1 .. C - 1; at sigma_2 always class 1."""
    s1, s2 = 1.0, 0.5
    rest = num_classes - 1
    edges = [0.0] + [s1 * norm.ppf(0.5 + 0.5 * i / rest) for i in range(1, rest)]
    return [(s1, Buckets(edges, list(range(num_classes)), num_classes)), (s2, Constant(1, num_classes))]


def _sequential_false_rate(members, num_classes, n0, n, alpha, first, trials, tag):
    x = torch.zeros(1, 2, 2)
    false = 0
    for t in range(trials):
        r = certify_cascade(members, x, num_classes, n0, n, alpha, n,
                            generators=[noise_generator(0, tag, s, t) for s, _ in members],
                            radii=[0.0, 0.25, 0.5], first=first)
        false += r.radius > 0
    return false / trials


def test_a_sequential_cascade_with_one_look_is_the_fixed_n_cascade():
    """n_max equal to first: one look, at the stage's level; the same draws, the same answer."""
    members = [(1.0, Buckets([1.0 * norm.ppf(q) for q in (0.4, 0.75)], [0, 1, 2], 3)), (0.5, Constant(1, 3))]
    for idx in range(5):
        fixed = certify_cascade(members, X, 3, N0, N, ALPHA, 500, generators=gens([1.0, 0.5], idx))
        seq = certify_cascade(members, X, 3, N0, N, ALPHA, 500, generators=gens([1.0, 0.5], idx),
                              radii=[0.0, 0.25], first=N)
        assert (seq.prediction, seq.radius, seq.stage, seq.samples) == \
            (fixed.prediction, fixed.radius, fixed.stage, fixed.samples)


def test_a_sequential_cascade_stops_each_stage_early_and_uses_the_split_level():
    """Top scale confidently goes on (class 0 at 0.3, classes 1 and 2 at 0.35) within a few looks,
    once its off-class bound settles the cap between the targets 0.25 and 1; the second scale says
    class 1 always, so it stops once the largest target under the cap is certified."""
    s1, s2, n = 1.0, 0.5, 100_000
    members = [(s1, Buckets([s1 * norm.ppf(q) for q in (0.3, 0.65)], [0, 1, 2], 3)), (s2, Constant(1, 3))]
    r = certify_cascade(members, X, 3, N0, n, ALPHA, 10_000, generators=gens([s1, s2]),
                        radii=[0.0, 0.25, 1.0])
    assert (r.prediction, r.stage) == (1, 2)
    looks = stats.look_schedule(n)
    level = stats.sequential_levels(len(looks), stage_alpha(ALPHA, 2, 2))
    assert r.p_a_lower == pytest.approx(stats.lower_confidence_bound(r.count_a, r.count_a, level))
    assert r.count_a in looks and r.samples < 2 * (N0 + n) // 10
    assert [s - N0 for s in r.stage_samples][0] in looks and sum(r.stage_samples) == r.samples
    assert 0.25 <= r.radius < 1.0  # the cap at sigma_1 passes 0.25, not 1
    # the cap: stage 1's counts at the look it stopped at (replayed look by look on its stream),
    # every other class's upper bound at the stage-2 level split over the looks, / 2
    g1 = gens([s1])[0]
    smooth = Smooth(members[0][1], 3, s1)
    smooth.sample_counts(X, N0, 10_000, g1)
    counts, drawn = np.zeros(3, dtype=np.int64), 0
    for look in looks:
        if look > r.stage_samples[0] - N0:
            break
        counts += smooth.sample_counts(X, look - drawn, 10_000, g1)
        drawn = look
    assert drawn == r.stage_samples[0] - N0
    cap = -stats.radius(s1, stats.max_other_class_upper_bound(counts, 1, level), 0.5)
    assert r.radius == pytest.approx(min(s2 * norm.ppf(r.p_a_lower), cap))


@pytest.mark.parametrize("num_classes,n0", [(2, 2), (10, 100)])
def test_sequential_cascade_is_sound_where_every_positive_radius_is_false(num_classes, n0):
    """The fixed-n adversarial cascade, certified sequentially: every bound of a stage at its share
    of alpha split over the stage's looks. False certificates stay <= alpha."""
    alpha, trials = 0.2, 2_000
    rate = _sequential_false_rate(_adversarial(num_classes), num_classes, n0, 500, alpha, 10, trials,
                                  "cascade-seq")
    print(f"\nsequential false-certificate rate at alpha = {alpha}, C = {num_classes}: {rate}")
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_a_sequential_cascade_needs_the_per_look_split(monkeypatch):
    """The adversarial cascade's first scale alone (K = 1: its whole alpha rests on the one lower
    bound, so the union bound is nearly tight): with alpha split over the looks the false rate is
    <= alpha; with every look at the stage's full share (no per-look split) it exceeds alpha."""
    members = _adversarial(2)[:1]
    alpha, trials = 0.05, 2_000
    limit = alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    rate = _sequential_false_rate(members, 2, 2, 1000, alpha, 1, trials, "cascade-seq-split")
    monkeypatch.setattr(stats, "sequential_levels", lambda num_looks, level: level)
    naive = _sequential_false_rate(members, 2, 2, 1000, alpha, 1, trials, "cascade-seq-split")
    print(f"\nfalse-certificate rates at alpha = {alpha}: split {rate}, every look at the full share {naive}")
    assert rate <= limit < naive
