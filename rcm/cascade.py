"""Cascaded multi-scale certification (Jeong & Shin 2023), over any per-sigma family of classifiers.

Scales sigma_1 > sigma_2 > ... > sigma_K are tried from the largest down. Stage k draws n0 selection
and n estimation samples at sigma_k and computes its bounds at level alpha_k (see ALPHA_SPLITS):
- p_L >= p0: predict c = c_hat_k with R_k = sigma_k (Phi^-1(p_L) - Phi^-1(p0)), capped for every
  larger scale j < k by sigma_j (Phi^-1(p0) - Phi^-1(pbar_j)), pbar_j an upper bound on the largest
  probability of any class other than c at sigma_j (each other class's Clopper-Pearson upper bound
  at alpha_k / 2: it fails with probability <= alpha_k for every number of classes, whichever class
  c is; stats.max_other_class_upper_bound). R <= 0 -> ABSTAIN.
- else p_U >= p0: ABSTAIN (undecidable at this scale).
- else (p_U < p0: the selected class c_hat_k is confidently below p0 here; no other class is
  checked, none needs to be: the cap of a later certificate bounds them): next, smaller scale.
  All scales pass -> ABSTAIN.
Why: Phi^-1(p_sigma(x, c)) is 1/sigma-Lipschitz in x, so within R every larger scale keeps every
class other than c below p0 (it abstains or says c) and scale k keeps c above p0. This needs
p0 >= 1/2 (at most one class can then reach p0 at a scale).

The levels. A certificate issued at stage k relies on k bounds: the lower bound on c at sigma_k and
the off-class upper bounds at sigma_1..sigma_{k-1}. Which stage decides depends on the data, so the
bounds that may be relied on over all paths are the K lower bounds and the K - 1 off-class bounds.
- 'uniform' (default): every one of those 2K - 1 bounds at alpha / (2K - 1), so by a union bound the
  certificate is wrong with probability <= alpha whatever path the data take.
- 'harmonic': alpha_k = alpha / k for every bound of stage k, as Jeong & Shin (2023) and DESIGN §4
  state it. A union bound over paths only gives alpha * (2 H_K - 1) (H_K the K-th harmonic number:
  2 alpha for K = 2, 2.67 alpha for K = 3); kept to reproduce the paper's protocol.
The interval's upper end p_U only decides between abstaining and going on, never a certificate.

Sequential (``radii`` given; docs/methods.md, "Sequential cascades"): n is each stage's n_max. A
stage draws its estimation samples at the looks of stats.look_schedule(n, first), and every bound
it computes (the lower and upper bound of c_hat_k, the off-class bounds) is taken at alpha_k / L,
L the number of looks: the stage's share of alpha split again over its looks. It stops at the first
look where p_U < p0 (go on), where p_L >= p0 and stats.sequential_stop says the targets reachable
under the cap are settled, or at n; there it decides as the fixed-n stage does. The off-class bound
at sigma_j uses stage j's counts at the look it stopped at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from rcm import stats
from rcm.smoothing import ABSTAIN, Smooth, check_args

ALPHA_SPLITS = ("uniform", "harmonic")


def stage_alpha(alpha: float, k: int, num_stages: int, split: str = "uniform") -> float:
    """The level of every bound computed at stage k (1-based) of a K-stage cascade."""
    if split == "uniform":
        return alpha / (2 * num_stages - 1)
    if split == "harmonic":
        return alpha / k
    raise ValueError(f"alpha_split must be one of {ALPHA_SPLITS}, got '{split}'")


def guaranteed_alpha(alpha: float, num_stages: int, split: str = "uniform") -> float:
    """The failure probability a K-stage cascade's certificate is guaranteed by the union bound over
    every bound it may rely on: the K lower bounds (stage k's at alpha_k) and, per scale j < K, the
    off-class bound at sigma_j, which a stage k > j computes at alpha_k: its failure at the largest
    of those levels, alpha_{j+1}, contains the others. 'uniform': alpha; 'harmonic' (alpha_k =
    alpha / k): alpha H_K + alpha (H_K - 1) = alpha (2 H_K - 1)."""
    levels = [stage_alpha(alpha, k, num_stages, split) for k in range(1, num_stages + 1)]
    return float(sum(levels) + sum(levels[1:]))


@dataclass
class CascadeResult:
    prediction: int          # class, or ABSTAIN
    radius: float            # certified L2 radius in [0, 1] pixel units (0 when abstaining)
    stage: int               # 1-based stage that decided, 0 if every scale passed
    sigma: float             # sigma of the deciding stage (nan if none)
    count_a: int             # estimation count of the selected class at the deciding stage
    p_a_lower: float         # its lower bound (at the stage's level alpha_k: alpha / (2K - 1) by default)
    samples: int             # noise draws spent on this image, all stages
    stage_samples: tuple[int, ...] = ()  # noise draws of each stage tried (n0 + estimation draws)


def certify_cascade(members: Sequence[tuple[float, nn.Module]], x: torch.Tensor, num_classes: int,
                    n0: int, n: int, alpha: float, batch_size: int, p0: float = 0.5,
                    generators: Sequence[torch.Generator | None] | None = None,
                    alpha_split: str = "uniform", radii: Sequence[float] | None = None,
                    first: int = 100) -> CascadeResult:
    """Certify x (C, H, W) in [0, 1] with the cascade of (sigma, base classifier) ``members``.

    ``members`` must be ordered by decreasing sigma. ``generators[k]`` draws the noise of stage k.
    ``radii``: certify sequentially, stopping each stage on these target radii, with n as n_max and
    the looks of stats.look_schedule(n, first); None: n estimation draws per stage.
    """
    check_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
    sigmas = [float(s) for s, _ in members]
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"cascade sigmas must be strictly decreasing, got {sigmas}")
    if not 0.5 <= p0 < 1:
        raise ValueError(f"p0 must be in [0.5, 1), got {p0} (below 1/2 two classes can pass it)")
    stage_alpha(alpha, 1, len(members), alpha_split)  # reject an unknown split before sampling
    generators = list(generators) if generators is not None else [None] * len(members)
    looks = [n] if radii is None else stats.look_schedule(n, first)
    if radii is not None and (not len(radii) or min(radii) < 0):
        raise ValueError(f"a sequential cascade needs target radii >= 0, got {list(radii)}")
    history: list[tuple[float, np.ndarray]] = []  # (sigma_j, estimation counts at sigma_j)
    spent: list[int] = []
    for k, ((sigma, model), gen) in enumerate(zip(members, generators), start=1):
        smooth = Smooth(model, num_classes, sigma)
        c_hat = stats.top_class(smooth.sample_counts(x, n0, batch_size, gen))
        # every bound of this stage at its level, split over its looks (one look at fixed n)
        level = stats.sequential_levels(len(looks), stage_alpha(alpha, k, len(members), alpha_split))
        cap = math.inf  # sigma_j (Phi^-1(p0) - Phi^-1(p_bar_j)) over the larger scales
        for sigma_j, counts_j in history:
            p_bar = stats.max_other_class_upper_bound(counts_j, c_hat, level)
            cap = min(cap, -stats.radius(sigma_j, p_bar, p0))
        targets = ([] if radii is None else
                   [r for r in stats.reachable_targets(radii, sigma, n, level, p0) if r <= cap])
        counts, drawn = np.zeros(num_classes, dtype=np.int64), 0
        for look in looks:
            counts += smooth.sample_counts(x, look - drawn, batch_size, gen)
            drawn = look
            count = int(counts[c_hat])
            p_lower, p_upper = stats.clopper_pearson_interval(count, drawn, level)
            if p_lower >= p0 and stats.sequential_stop(count, drawn, level, sigma, targets, p0):
                break
            if p_upper < p0 and (radii is None or _cap_settled(counts, drawn, level, sigma, radii, p0)):
                break
        spent.append(n0 + drawn)
        result = dict(stage=k, sigma=sigma, count_a=count, p_a_lower=float(p_lower), samples=sum(spent),
                      stage_samples=tuple(spent))
        if p_lower >= p0:
            r = min(stats.radius(sigma, p_lower, p0), cap)
            if r <= 0:
                return CascadeResult(ABSTAIN, 0.0, **result)
            return CascadeResult(c_hat, r, **result)
        if p_upper >= p0:
            return CascadeResult(ABSTAIN, 0.0, **result)
        history.append((sigma, counts))
    return CascadeResult(ABSTAIN, 0.0, 0, float("nan"), 0, 0.0, sum(spent), tuple(spent))


def _cap_settled(counts: np.ndarray, drawn: int, level: float, sigma: float, radii, p0: float) -> bool:
    """Whether a stage that goes on (its class confidently below p0) may stop drawing: its counts
    become the off-class bound p_bar that caps every later certificate by sigma (Phi^-1(p0) -
    Phi^-1(p_bar)), so stopping as soon as the class drops below p0 would cap them near 0. Stop when
    even the largest class's upper bound (at the off-class level) lets the cap pass the largest
    target, or when the largest class's lower bound shows that the next target the cap does not
    pass yet is out of reach. Only a stopping rule: validity does not depend on it."""
    def cap_at(r):  # the largest p_bar with which the cap reaches r
        return float(norm.cdf(norm.ppf(p0) - r / sigma))
    upper = float(np.max(stats.upper_confidence_bound(counts, drawn, level / 2)))
    lower = float(np.max(stats.lower_confidence_bound(counts, drawn, level / 2)))
    missed = [r for r in sorted(radii) if r > 0 and upper > cap_at(r)]
    return not missed or lower > cap_at(missed[0])
