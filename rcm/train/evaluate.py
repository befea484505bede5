"""Accuracy of a base classifier on clean and noisy images, for training logs and docs."""

from __future__ import annotations

from typing import Callable

import torch

from rcm import paths
from rcm.data import FileSplit, Split
from rcm.loader import eval_batches

# make_predict(sigma) -> a function mapping images in [0, 1] (B, C, H, W) to logits (B, K)
PredictFactory = Callable[[float], Callable[[torch.Tensor], torch.Tensor]]


@torch.inference_mode()
def noisy_accuracies(make_predict: PredictFactory, split: Split | FileSplit, sigmas: list[float],
                     seed: int = 0, batch_size: int = 500) -> dict[str, float]:
    """{'clean_acc': ..., 'acc_sigma_0.25': ...}: top-1 accuracy on the split's images, clean and plus
    N(0, sigma^2 I) (pixel space) for each sigma in ``sigmas``. Each level's noise comes from its own
    generator seeded with ``seed``; the images are read once, batch by batch."""
    levels = [0.0, *sigmas]
    predictors = [make_predict(s) for s in levels]
    generators = [torch.Generator().manual_seed(seed) for _ in levels]
    correct, total = [0] * len(levels), 0
    for x, y in eval_batches(split, batch_size=batch_size):
        for i, (s, predict, g) in enumerate(zip(levels, predictors, generators)):
            noisy = x + s * torch.randn(x.shape, generator=g) if s > 0 else x
            correct[i] += (predict(noisy).argmax(1) == y).sum().item()
        total += len(y)
    names = ["clean_acc"] + [f"acc_sigma_{paths.fmt_sigma(s)}" for s in sigmas]
    return {name: c / max(1, total) for name, c in zip(names, correct)}
