"""(method, sigma, checkpoints) -> the base classifier the certification core smooths (rcm.methods says
which files and which builder; the built-in builders are here).

Every base classifier maps noisy images in [0, 1] (B, C, H, W) to logits (B, K); the core adds the
noise and never changes when a method is added.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rcm import methods, paths
from rcm.models import load_model

METHODS = paths.METHODS


def checkpoints(method: str, sigma: float, results: str | Path, dataset: str) -> dict[str, Path]:
    """The checkpoint files a method needs at sigma (what the workflow lists as inputs)."""
    return methods.files(method, sigma, results, dataset)


def base_classifier(method: str, sigma: float, results: str | Path, dataset: str,
                    device: torch.device | str = "cpu", files: dict[str, Path] | None = None) -> nn.Module:
    """Load the base classifier of ``method`` at noise level ``sigma`` (pixel units), in eval mode, from
    ``files`` (role -> checkpoint; default: the results root's, ``checkpoints``)."""
    entry = methods.get(method)
    return entry.build(sigma, files or checkpoints(method, sigma, results, dataset), device)


# The built-in methods' builders (rcm.methods names them): (sigma, {role: file}, device) -> nn.Module.

def noisy_classifier(sigma: float, files: dict[str, Path], device) -> nn.Module:
    """A classifier trained on noisy inputs at sigma (Cohen et al.)."""
    model, _ = load_model(files["classifier"], kind="classifier")
    return model


def denoised_classifier(sigma: float, files: dict[str, Path], device) -> nn.Module:
    """A denoiser at the timestep of sigma, then the clean classifier (dds, mdds)."""
    from rcm.models.denoiser import DenoisedClassifier

    denoiser, _ = load_model(files["denoiser"], kind="denoiser", use_ema=True)
    classifier, _ = load_model(files["classifier"], kind="classifier")
    return DenoisedClassifier(denoiser, classifier, sigma)


def sigma_conditioned_vit(sigma: float, files: dict[str, Path], device) -> nn.Module:
    """The noise-conditioned ViT fine-tuned at sigma (rRCM)."""
    from rcm.models.vit import SigmaConditioned

    net, _ = load_model(files["rrcm"], kind="rrcm")
    return SigmaConditioned(net, sigma)
