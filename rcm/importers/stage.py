"""The training stages' side of importing: a stage whose ``pretrained`` option names a file imports
it (`rcm.importers.import_for_stage`) instead of training, and checks the result against the
prepared data before anything downstream relies on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rcm import paths
from rcm.data import load_split
from rcm.errors import ConfigError
from rcm.importers import import_for_stage, is_placeholder


def import_instead(source: str, fmt: str, options: str, out: Path, role: str, dataset: str, results: str,
                   schedule: dict | None = None) -> bool:
    """Import ``source`` to ``out`` when it names a model (then True), else do nothing (False)."""
    if is_placeholder(source):
        return False
    from rcm import distributed

    if not distributed.is_main():  # under torchrun one process imports; the rest have nothing to train
        return True
    if not Path(source).exists():
        raise ConfigError(f"pretrained '{source}' does not exist")
    # the certification split: what the model will be given, and all `rcm prepare --part test` writes
    test = load_split(paths.prepared(results, dataset, "test"))
    model = import_for_stage(source, fmt, options, out, role, schedule=schedule)
    try:
        fit = check_fits(model, test, role, source)
    except ConfigError as exc:
        Path(out).unlink(missing_ok=True)
        print(f"fit check of {out} on the certification split: failed", file=sys.stderr)
        raise exc
    print(f"fit check of {out} on {fit}: passed", file=sys.stderr)
    return True


@torch.no_grad()
def check_fits(model: torch.nn.Module, split, role: str, source: str) -> str:
    """One forward pass on two of the split's images: channels, size and classes must fit the data.
    Returns what was checked, for the job's log."""
    x = split.float_images(torch.arange(min(2, len(split))))         # (2, C, H, W) in [0, 1]
    c, h = x.shape[1], x.shape[-1]
    config = getattr(model, "config", {})
    if role == "denoiser":
        if config.get("in_channels") != c:
            raise ConfigError(f"pretrained '{source}' denoises {config.get('in_channels')}-channel images; "
                              f"the data has {c} channels")
        model.check_size(h)                              # another size: fully convolutional, if it divides
        model.denoise_one_shot(x, 0.25)
        return f"{len(x)} images of the certification split ({c} channels, {h} px): denoised at sigma 0.25"
    try:
        if role == "rrcm" and model.head is None:        # a pretrained encoder: no classes to check
            model.representation(2 * x - 1, 0.5)
            return f"{len(x)} images of the certification split ({c} channels, {h} px): encoded"
        logits = model(x) if role == "classifier" else model(2 * x - 1, 0.5)
    except RuntimeError as exc:
        raise ConfigError(f"pretrained '{source}' cannot read the data's {c}-channel {h} px images: "
                          f"{str(exc).splitlines()[0]}") from None
    if logits.shape[-1] < split.num_classes:
        raise ConfigError(f"pretrained '{source}' has {logits.shape[-1]} outputs; the data has "
                          f"{split.num_classes} classes")
    return (f"{len(x)} images of the certification split ({c} channels, {h} px): {logits.shape[-1]} outputs "
            f"for {split.num_classes} classes")
