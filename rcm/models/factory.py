"""(method, sigma, checkpoints) -> the base classifier the certification core smooths.

Every base classifier maps noisy images in [0, 1] (B, C, H, W) to logits (B, K); the core adds the
noise and never changes when a method is added.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rcm import paths
from rcm.errors import ConfigError
from rcm.models import load_model

METHODS = paths.METHODS


def checkpoints(method: str, sigma: float, results: str | Path, dataset: str) -> dict[str, Path]:
    """The checkpoint files a method needs at sigma (what the workflow lists as inputs)."""
    if method == "gaussian":
        return {"classifier": paths.classifier(results, dataset, sigma)}
    if method in ("dds", "mdds"):
        return {"denoiser": paths.denoiser(results, dataset, finetuned=(method == "mdds")),
                "classifier": paths.classifier(results, dataset, 0.0)}
    if method == "rrcm":
        return {"rrcm": paths.rrcm_finetuned(results, dataset, sigma)}
    raise ConfigError(f"unknown method '{method}' (known: {', '.join(METHODS)})")


def base_classifier(method: str, sigma: float, results: str | Path, dataset: str,
                    device: torch.device | str = "cpu", files: dict[str, Path] | None = None) -> nn.Module:
    """Load the base classifier of ``method`` at noise level ``sigma`` (pixel units), in eval mode, from
    ``files`` (role -> checkpoint; default: the results root's, ``checkpoints``)."""
    files = files or checkpoints(method, sigma, results, dataset)
    if method == "gaussian":
        model, _ = load_model(files["classifier"], kind="classifier")
    elif method in ("dds", "mdds"):
        from rcm.models.denoiser import DenoisedClassifier

        denoiser, _ = load_model(files["denoiser"], kind="denoiser", use_ema=True)
        classifier, _ = load_model(files["classifier"], kind="classifier")
        model = DenoisedClassifier(denoiser, classifier, sigma)
    else:
        from rcm.models.vit import SigmaConditioned

        net, _ = load_model(files["rrcm"], kind="rrcm")
        model = SigmaConditioned(net, sigma)
    return model.to(device).eval()
