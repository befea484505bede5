"""Median-filter smoothing: the noisy image goes through a k x k median filter, then through the clean
classifier that dds and mdds put behind their diffusion denoisers.

A median filter is the classical denoiser for impulsive noise and a cheap, training-free stand-in for a
learned one under Gaussian noise. Because the filter is a fixed function of the noisy image, the
composition is a base classifier like any other and randomized smoothing certifies it unchanged.

This module is what the config names (``examples.custom_method.method:build``); it imports no torch, so
the workflow can check it while it parses. The network lives in ``median_filter.py``.
"""

from __future__ import annotations

# the filter's width at each noise level: a wider window removes more noise and more of the digit
SIZES = {0.12: 3, 0.25: 3, 0.5: 5, 1.0: 5}


def kernel_size(sigma: float) -> int:
    """The window for ``sigma``: that of the nearest listed noise level (3 up to 0.25, 5 above)."""
    nearest = min(SIZES, key=lambda s: abs(s - sigma))
    return SIZES[nearest]


def build(sigma, models, device):
    """rcm's builder signature: (sigma, {role: checkpoint path}, device) -> nn.Module (noisy images in
    [0, 1] -> logits). ``models["classifier"]`` is the clean classifier's checkpoint."""
    from rcm.models import load_model

    from .median_filter import MedianFiltered

    classifier, _ = load_model(models["classifier"], kind="classifier")
    return MedianFiltered(classifier, kernel_size(float(sigma)))


def preset(cfg, sigma):
    """The same network at the config's full size with random weights, for ``rcm plan`` and ``rcm bench
    certify --config``: (cfg, sigma) -> (model, text). The clean classifier is the config's own."""
    from rcm import presets

    from .median_filter import MedianFiltered

    classifier, text = presets.classifier(cfg, 0.0)
    k = kernel_size(float(sigma))
    return MedianFiltered(classifier, k), f"{k}x{k} median filter + {text}"
