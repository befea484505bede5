"""Classifiers from the field's model libraries, as rcm base classifiers: timm (`TimmClassifier`) and
transformers (`HFClassifier`), e.g. the BEiT-L and ViT-B/16 that Carlini et al. (2023) put behind
their denoisers.

Both take images in [0, 1] (B, C, H, W), noisy and unclipped, and apply, inside the model, what the
library's preprocessing would: an explicit resize to the network's input size when the input has
another size (``interpolation``, antialiased; recorded in ``self.config``), then the per-channel
normalisation (``mean``, ``std``). The network itself is rebuilt from the recorded library config, so a
checkpoint needs no network access and no files besides itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")


class _Preprocessed(nn.Module):
    def _setup(self, image_size: int, mean, std, interpolation: str) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}' (known: {', '.join(INTERPOLATIONS)})")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config["image_size"]
        if tuple(x.shape[-2:]) != (size, size):
            mode = self.config["interpolation"]
            x = F.interpolate(x, size=(size, size), mode=mode,
                              **({} if mode in ("nearest", "area") else {"align_corners": False, "antialias": True}))
        return (x - self.mean) / self.std


class TimmClassifier(_Preprocessed):
    """``timm.create_model(model_name, **create_kwargs)`` behind its input pipeline."""

    def __init__(self, *, model_name: str, image_size: int, mean: list[float], std: list[float],
                 interpolation: str = "bicubic", num_classes: int = 1000, create_kwargs: dict | None = None):
        super().__init__()
        import timm

        self.config = dict(model_name=model_name, image_size=int(image_size), mean=list(mean), std=list(std),
                           interpolation=interpolation, num_classes=int(num_classes),
                           create_kwargs=dict(create_kwargs or {}))
        self._setup(image_size, mean, std, interpolation)
        self.net = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **self.config["create_kwargs"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


class HFClassifier(_Preprocessed):
    """A transformers ``AutoModelForImageClassification`` rebuilt from its config dict."""

    def __init__(self, *, hf_config: dict, image_size: int, mean: list[float], std: list[float],
                 interpolation: str = "bicubic"):
        super().__init__()
        from transformers import AutoConfig, AutoModelForImageClassification

        self.config = dict(hf_config=dict(hf_config), image_size=int(image_size), mean=list(mean), std=list(std),
                           interpolation=interpolation)
        self._setup(image_size, mean, std, interpolation)
        settings = dict(hf_config)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        self.net = AutoModelForImageClassification.from_config(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=self.preprocess(x)).logits
