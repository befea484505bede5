"""The base classifiers of Cohen et al. (2019), "Certified Adversarial Robustness via Randomized
Smoothing", with the parameter names of their released ``checkpoint.pth.tar`` files.

- ``cifar_resnet20`` / ``cifar_resnet110``: the CIFAR ResNet their code takes from bearpaw's
  pytorch-classification: a 3x3 conv to 16 channels, BN, ReLU; three stages of (depth - 2) / 6
  post-activation basic blocks (conv-BN-ReLU-conv-BN, add, ReLU) with 16/32/64 channels, the first
  block of stages 2 and 3 strided with a 1x1 conv + BN projection; 8x8 average pooling; a linear head.
- ``resnet50``: torchvision's ResNet-50 (ImageNet, 224 px).

Their classifier is ``Sequential(NormalizeLayer(mean, std), net)``: noise is added in [0, 1] pixel
space and the dataset normalisation (not stored in the file) is the model's first layer. Here it is
the same: ``forward`` takes [0, 1] images and normalises with the recorded ``mean``/``std``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ARCHS = ("cifar_resnet20", "cifar_resnet110", "resnet50")
# The normalisation of their datasets.py, which their get_architecture puts in front of the network.
NORMALIZATION = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
DEFAULT_DATASET = {"cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10", "resnet50": "imagenet"}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity (or ``downsample``), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet (n basic blocks per stage), 32x32 RGB input."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = [BasicBlock(c, width, 1 if i == 0 else 2)] + [BasicBlock(width, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = width
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(F.avg_pool2d(h, 8).flatten(1))


class CohenClassifier(nn.Module):
    """[0, 1] images (B, 3, H, W) -> logits, as Cohen et al.'s ``Sequential(NormalizeLayer, net)``.

    ``self.config`` rebuilds it; the state dict is the network's, under ``net.``.
    """

    def __init__(self, *, arch: str = "cifar_resnet110", num_classes: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 image_size: int | None = None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown Cohen et al. architecture '{arch}' (known: {', '.join(ARCHS)})")
        default_mean, default_std = NORMALIZATION[DEFAULT_DATASET[arch]]
        imagenet = arch == "resnet50"
        num_classes = num_classes or (1000 if imagenet else 10)
        image_size = image_size or (224 if imagenet else 32)
        mean = [float(m) for m in (mean or default_mean)]
        std = [float(s) for s in (std or default_std)]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std need 3 values, got {len(mean)}/{len(std)}")
        self.config = dict(arch=arch, num_classes=num_classes, mean=mean, std=std, image_size=image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if imagenet:
            from torchvision.models import resnet50

            self.net = resnet50(weights=None, num_classes=num_classes)
        else:
            self.net = CifarResNet(int(arch.removeprefix("cifar_resnet")), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
