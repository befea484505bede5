"""The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I) (Cohen et al. 2019).

`Smooth` keeps the reference code's interface so researchers' scripts port unchanged:
``certify(x, n0, n, alpha, batch_size)`` and ``predict(x, n, alpha, batch_size)``, plus an optional
``generator``. Noise is added here and nowhere else; the base classifier owns normalisation,
denoising and noise-level conditioning. sigma is in [0, 1] pixel units, and so are radii.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from rcm import stats
from rcm.stats import ABSTAIN

__all__ = ["ABSTAIN", "Smooth", "check_args", "noise_generator", "noise_seed"]


def noise_seed(seed: int, method: str, sigma: float | str, idx: int) -> int:
    """A 63-bit seed that depends only on (seed, method, sigma, idx), never on sharding."""
    from rcm.paths import fmt_sigma

    key = f"{int(seed)}|{method}|{fmt_sigma(sigma)}|{int(idx)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF


def noise_generator(seed: int, method: str, sigma: float | str, idx: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(noise_seed(seed, method, sigma, idx))


class Smooth:
    """A smoothed classifier around ``base_classifier`` (put in eval mode here)."""

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.base_classifier = base_classifier.eval()
        self.num_classes = num_classes
        self.sigma = float(sigma)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """Prediction and certified L2 radius of g at x (C, H, W) in [0, 1].

        With probability >= 1 - alpha over the noise, if the answer is not ABSTAIN, g predicts that
        class everywhere within the radius. Selection uses n0 draws, estimation n fresh ones.
        """
        prediction, radius, _, _ = self.certify_with_details(x, n0, n, alpha, batch_size, generator)
        return prediction, radius

    def certify_with_details(self, x, n0, n, alpha, batch_size, generator=None):
        """As ``certify``, also returning (count of the selected class, its lower bound p_A)."""
        check_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
        counts_selection = self.sample_counts(x, n0, batch_size, generator)
        counts_estimation = self.sample_counts(x, n, batch_size, generator)
        return stats.certify_from_counts(counts_selection, counts_estimation, alpha, self.sigma)

    def certify_sequential(self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                           radii, generator: torch.Generator | None = None,
                           first: int = 100) -> tuple[int, float, int]:
        """Prediction, certified L2 radius and noise draws used, stopping early (docs/methods.md).

        Selection on n0 draws as in ``certify``; then estimation at the cumulative draw counts of
        ``stats.look_schedule(n_max, first)`` (first, then x1.5, n_max last), each look with a
        Clopper-Pearson lower bound at alpha / (number of looks), so that all looks' bounds hold
        together with probability >= 1 - alpha. It stops when
        the bound certifies the largest of ``radii`` that n_max draws could, when the upper bound
        shows the next radius out of reach, or at n_max. The guarantee is ``certify``'s: with
        probability >= 1 - alpha, a non-abstaining answer is g's prediction within the radius.
        """
        prediction, radius, _, _, samples = self.certify_sequential_with_details(
            x, n0, n_max, alpha, batch_size, radii, generator, first)
        return prediction, radius, samples

    def certify_sequential_with_details(self, x, n0, n_max, alpha, batch_size, radii, generator=None,
                                        first: int = 100):
        """As ``certify_sequential``: (prediction, radius, count of the selected class, its lower
        bound p_A, draws used = n0 + estimation draws)."""
        check_args(n0=n0, n=n_max, alpha=alpha, batch_size=batch_size)
        looks = stats.look_schedule(n_max, first)
        level = stats.sequential_levels(len(looks), alpha)
        targets = stats.reachable_targets(radii, self.sigma, n_max, level)
        if not targets:
            raise ValueError(f"no radius of {list(radii)} can be certified at sigma {self.sigma} with "
                             f"n_max = {n_max} draws at alpha = {alpha}: raise n_max")
        c_hat = stats.top_class(self.sample_counts(x, n0, batch_size, generator))
        count = drawn = 0
        for look in looks:
            count += int(self.sample_counts(x, look - drawn, batch_size, generator)[c_hat])
            drawn = look
            if stats.sequential_stop(count, drawn, level, self.sigma, targets):
                break
        p_lower = float(stats.lower_confidence_bound(count, drawn, level))
        if p_lower < 0.5:
            return ABSTAIN, 0.0, count, p_lower, n0 + drawn
        return c_hat, stats.radius(self.sigma, p_lower), count, p_lower, n0 + drawn

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """g's prediction at x, or ABSTAIN; a non-abstaining answer is wrong with probability <= alpha."""
        check_args(n0=1, n=n, alpha=alpha, batch_size=batch_size)
        return stats.predict_from_counts(self.sample_counts(x, n, batch_size, generator), alpha)

    @torch.inference_mode()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None = None) -> np.ndarray:
        """Class counts of f(x + delta) over ``num`` noise draws, in batches; (num_classes,) int64.

        Noise is drawn on x's device from ``generator`` (which must live there too); counting is a
        bincount on that device, so nothing per-sample runs in Python.
        """
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            noise = torch.randn((b, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
            batch = noise.mul_(self.sigma).add_(x)  # (b, C, H, W) = x + sigma * eps
            predictions = self.base_classifier(batch).argmax(dim=1)
            counts += torch.bincount(predictions, minlength=self.num_classes)
            remaining -= b
        return counts.cpu().numpy()


def check_args(*, n0: int, n: int, alpha: float, batch_size: int) -> None:
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
