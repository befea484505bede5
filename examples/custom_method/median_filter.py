"""The network of the median-filter method (see method.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel k x k median of ``x`` (B, C, H, W), borders reflected (replicated where the image is
    smaller than the window)."""
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)          # (B, C, H, W, k, k)
    return windows.reshape(*windows.shape[:4], size * size).median(dim=-1).values


class MedianFiltered(nn.Module):
    """median_filter(x) -> classifier: a base classifier for randomized smoothing."""

    def __init__(self, classifier: nn.Module, size: int):
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"the median window must be odd and >= 1, got {size}")
        self.classifier = classifier
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(median_filter(x, self.size))

    def describe(self, image_size: int) -> str:
        return f"{self.size}x{self.size} median filter at {image_size} px, then the clean classifier"
