"""FLOPs of a base classifier per noise sample, counted by torch.utils.flop_counter."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.inference_mode()
def flops_per_sample(model: nn.Module, example: torch.Tensor, batch: int = 2) -> float:
    """FLOPs of one forward pass per image, counted on a batch of ``batch`` copies of ``example`` (C, H, W).

    Counts the operators FlopCounterMode knows (matmuls, convolutions, attention); elementwise work
    is not counted, as is the convention for model FLOPs.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        model(example.unsqueeze(0).expand(batch, *example.shape).contiguous())
    return counter.get_total_flops() / batch


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs per sample of ``model`` on images of ``shape``, counted on a meta-device copy (shapes only:
    no memory for activations, no arithmetic), or on the CPU where an operator has no meta kernel."""
    try:
        meta = copy.deepcopy(model).to("meta")
        return flops_per_sample(meta, torch.zeros(shape, device="meta"))
    except (NotImplementedError, RuntimeError):
        return flops_per_sample(model, torch.rand(shape))
