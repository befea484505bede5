"""BYOL-style augmentations, vectorised over the batch (rRCM pretraining's two views).

Every sample gets its own random parameters, all drawn from the step's ``torch.Generator`` in a fixed
order (a fixed number of draws whatever the probabilities), so a step's views depend on (seed, step)
alone. A batch is this pass's rows of a global batch (rcm.distributed): the parameters are drawn for
the global batch and this pass's part kept, so a sample's view does not depend on the split. Images go in and come out in [-1, 1], shape (B, C, H, W); the photometric operations work in
[0, 1] internally. Differences from torchvision's per-image transforms, all deliberate:
- RandomResizedCrop sets a side that would exceed the image to the full side and keeps the drawn area
  (changing the aspect ratio) instead of re-drawing, and resamples with one bilinear ``grid_sample``
  (affine_grid) for the whole batch;
- colour jitter applies brightness, contrast, saturation, hue in this fixed order, and shifts hue by
  rotating the chroma plane of YIQ (a close, cheap stand-in for an HSV hue shift);
- Gaussian blur uses a per-sample kernel through one grouped convolution with reflect padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcm.distributed import local, parts

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class ViewConfig:
    """The distribution of one augmented view (BYOL's defaults on ImageNet in brackets).

    ``blur_sigma`` is in pixels of the image as given (BYOL: [0.1, 2.0] at 224 px); scale it down with
    the image size. Saturation, hue and grayscale act on 3-channel images only.
    """

    crop_min_scale: float = 0.08      # RandomResizedCrop area range [crop_min_scale, 1]  [0.08]
    flip_prob: float = 0.5            # horizontal flip                                  [0.5]
    jitter_prob: float = 0.8          # colour jitter applied with this probability       [0.8]
    brightness: float = 0.4           # factor ~ U[1 - b, 1 + b]                          [0.4]
    contrast: float = 0.4             #                                                   [0.4]
    saturation: float = 0.2           #                                                   [0.2]
    hue: float = 0.1                  # shift ~ U[-hue, hue] of a full turn               [0.1]
    gray_prob: float = 0.2            #                                                   [0.2]
    blur_prob: float = 1.0            # view 1: 1.0, view 2: 0.1                           [1.0 / 0.1]
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0        # view 1: 0.0, view 2: 0.2                           [0.0 / 0.2]


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    """(n,) draws from U[lo, hi] for the n rows of this pass: drawn for the whole global batch
    (n x the number of parts, rcm.distributed) on the generator's device, this pass's part kept."""
    return lo + (hi - lo) * local(torch.rand(n * parts(), generator=g, device=g.device))


def _coin(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    """(n,) bool, True with probability p; always draws the global batch's numbers."""
    return local(torch.rand(n * parts(), generator=g, device=g.device)) < p


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) parameters -> (B, 1, 1, 1) on x's device, ready to broadcast over an image batch."""
    return t.to(x.device)[:, None, None, None]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of a [0, 1] image; a 1-channel image is its own luma."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    return torch.einsum("bchw,c->bhw", x, w)[:, None]


def resized_crop_flip(x: torch.Tensor, g: torch.Generator, min_scale: float,
                      flip_prob: float) -> torch.Tensor:
    """Per-sample RandomResizedCrop (area ~ U[min_scale, 1], aspect ~ logU[3/4, 4/3]) and flip,
    resampled back to the input size. x (B, C, H, W), any range."""
    b = x.shape[0]
    area = _uniform(g, b, min_scale, 1.0)
    log_ratio = _uniform(g, b, math.log(3 / 4), math.log(4 / 3))
    u, v = _uniform(g, b, 0.0, 1.0), _uniform(g, b, 0.0, 1.0)
    flip = _coin(g, b, flip_prob)
    w = torch.sqrt(area * log_ratio.exp())                  # crop width / image width
    h = area / w                                            # w * h = area <= 1: one side at most is > 1
    w, h = torch.where(h > 1, area, w.clamp(max=1.0)), torch.where(w > 1, area, h.clamp(max=1.0))
    cx = (2 * u - 1) * (1 - w)                               # crop centre in [-1, 1] coordinates
    cy = (2 * v - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=g.device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Flip each sample left-right with probability p."""
    return torch.where(_per_sample(_coin(g, x.shape[0], p), x), x.flip(-1), x)


def color_jitter(x: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """Brightness, contrast (and for RGB saturation, hue) jitter, applied with prob cfg.jitter_prob.
    x (B, C, H, W) in [0, 1]."""
    b = x.shape[0]
    apply = _per_sample(_coin(g, b, cfg.jitter_prob), x)
    bright = _per_sample(_uniform(g, b, 1 - cfg.brightness, 1 + cfg.brightness), x).to(x.dtype)
    contrast = _per_sample(_uniform(g, b, 1 - cfg.contrast, 1 + cfg.contrast), x).to(x.dtype)
    sat = _per_sample(_uniform(g, b, 1 - cfg.saturation, 1 + cfg.saturation), x).to(x.dtype)
    hue = _uniform(g, b, -cfg.hue, cfg.hue)
    y = (x * bright).clamp(0, 1)
    mean = _gray(y).mean((1, 2, 3), keepdim=True)
    y = (mean + contrast * (y - mean)).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = (gray + sat * (y - gray)).clamp(0, 1)
        y = _hue_shift(y, hue)
    return torch.where(apply, y, x)


def _hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the (I, Q) chroma plane of each RGB image by 2*pi*turns; x (B, 3, H, W) in [0, 1]."""
    yiq = _RGB_TO_YIQ.to(x)
    cos, sin = torch.cos(2 * math.pi * turns).to(x), torch.sin(2 * math.pi * turns).to(x)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(yiq) @ rot @ yiq                          # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Replace RGB images by their luma with probability p (1-channel images draw and pass through)."""
    apply = _per_sample(_coin(g, x.shape[0], p), x)
    if x.shape[1] != 3:
        return x
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma: tuple[float, float]) -> torch.Tensor:
    """Blur with per-sample std ~ U[sigma] (pixels) with probability p; reflect padding, x (B, C, H, W)."""
    b, c, hgt, wid = x.shape
    apply = _per_sample(_coin(g, b, p), x)
    std = _uniform(g, b, *sigma)
    radius = min(math.ceil(3 * sigma[1]), (min(hgt, wid) - 1))
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets[None] / std.to(x)[:, None]) ** 2)   # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c).reshape(b, c, hgt, wid)
    return torch.where(apply, y, x)


def random_solarize(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Invert pixels >= 0.5 with probability p; x in [0, 1]."""
    apply = _per_sample(_coin(g, x.shape[0], p), x)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def augment(x: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """One BYOL view of a batch: crop+flip, jitter, grayscale, blur, solarize. (B, C, H, W) in [-1, 1]."""
    y = resized_crop_flip((x + 1) / 2, g, cfg.crop_min_scale, cfg.flip_prob)
    y = color_jitter(y, g, cfg)
    y = random_grayscale(y, g, cfg.gray_prob)
    y = gaussian_blur(y, g, cfg.blur_prob, cfg.blur_sigma)
    y = random_solarize(y, g, cfg.solarize_prob)
    return (2 * y - 1).clamp(-1, 1)
