"""A config's base classifiers at full size, with random weights: what `rcm bench certify --config` measures.

A preset (config/cifar10.yaml, config/imagenet.yaml and their overlays) says which networks each method
certifies: trained from its own sections (classifier arch, denoiser UNet, rRCM ViT) or imported
(``pretrained_format`` and ``pretrained_options``). This module builds exactly those networks, with
random weights and no checkpoint files, so that cost (FLOPs, parameters, samples per second) can be
measured at paper scale before anything is trained or downloaded. The cost of a forward pass does not
depend on the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from torch import nn

from rcm import paths
from rcm.errors import ConfigError

# dataset -> (channels, image size or None for the configured data.image_size, classes)
SHAPES = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "imagenet": (3, None, 1000)}


def load_config(files: list[str | Path]) -> dict:
    """The config files merged in order, later keys replacing earlier ones section by section (as
    ``snakemake --configfile A B`` merges an overlay onto a preset)."""
    merged: dict = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:  # plain YAML only: a tag that would build a Python object is an error, never a call
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not plain YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a YAML mapping")
        _update(merged, data)
    for key in ("dataset", "classifier", "denoiser", "rrcm_pretrain"):
        if key not in merged:
            raise ConfigError(f"{', '.join(map(str, files))}: no '{key}' section (give the full preset first, "
                              "then any overlay)")
    return merged


def _update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _update(base[k], v)
        else:
            base[k] = v


def image_shape(cfg: dict) -> tuple[int, int, int]:
    """(channels, size, classes) of the config's dataset, as certification feeds it."""
    if cfg["dataset"] not in SHAPES:
        raise ConfigError(f"dataset '{cfg['dataset']}' is not one of {', '.join(SHAPES)}")
    c, size, classes = SHAPES[cfg["dataset"]]
    return c, int(size or cfg["data"]["image_size"]), classes


def _options(cls, section: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})


def _imported(section: dict, sigma: float) -> tuple[str, str, str]:
    """(format, source, options) when the section imports the model at sigma, else ('', '', '')."""
    from rcm.importers import is_placeholder, noisy_sources

    if sigma > 0 and "pretrained_noisy" in section:
        source = noisy_sources(section["pretrained_noisy"]).get(paths.fmt_sigma(sigma), "")
    else:
        source = "" if is_placeholder(section.get("pretrained", "")) else section.get("pretrained", "")
    return (section.get("pretrained_format", ""), source, section.get("pretrained_options", "")) if source else ("", "", "")


def classifier(cfg: dict, sigma: float) -> tuple[nn.Module, str]:
    """The classifier certified at sigma (0: the clean one behind a denoiser)."""
    from rcm.importers import parse_options

    c, size, classes = image_shape(cfg)
    fmt, source, text = _imported(cfg["classifier"], sigma)
    if fmt:
        options = parse_options(text, fmt)
        if fmt == "cohen":
            from rcm.models.cohen import CohenClassifier

            arch = options.get("arch") or "cifar_resnet110"
            return CohenClassifier(arch=arch, num_classes=classes, image_size=size), f"Cohen et al.'s {arch}"
        if fmt == "timm":
            from rcm.importers.library import timm_classifier

            model, _ = timm_classifier(options)
            return model, f"timm {options['model']} at {model.config['image_size']} px"
        if fmt == "hf":
            config_file = Path(source) / "config.json"
            if not config_file.is_file():
                raise ConfigError(f"classifier: the transformers network is described by {config_file}, which "
                                  "is not there; put the model folder (or just its config.json) at that path")
            import json

            from rcm.importers.library import hf_settings
            from rcm.models.library import HFClassifier

            hf = json.loads(config_file.read_text())
            model = HFClassifier(hf_config=hf_settings(hf), image_size=int(hf.get("image_size", 224)), mean=[0.5] * c,
                                 std=[0.5] * c)
            return model, f"transformers {hf.get('model_type')} at {model.config['image_size']} px"
        raise ConfigError(f"classifier: cannot build format '{fmt}' without its file")
    from rcm.train.classifier import ClassifierOptions

    o = _options(ClassifierOptions, cfg["classifier"])
    if o.arch != "preact":
        from rcm.models.cohen import CohenClassifier

        return CohenClassifier(arch=o.arch, num_classes=classes, image_size=size), f"{o.arch} (trained by rcm)"
    from rcm.models.classifier import Classifier

    return (Classifier(in_channels=c, num_classes=classes, image_size=size, width=o.width, blocks=o.blocks,
                       stages=o.stages, mean=[0.5] * c, std=[0.25] * c),
            f"rcm ResNet width {o.width}, {o.blocks} block(s) x {o.stages} stages")


def denoiser(cfg: dict) -> tuple[nn.Module, str]:
    from rcm.importers import denoiser_format

    c, size, _ = image_shape(cfg)
    fmt, source, text = _imported(cfg["denoiser"], 0.0)
    fmt = denoiser_format(fmt, source) if source else fmt   # a folder defaults to diffusers
    if fmt in ("improved-diffusion", "guided-diffusion"):
        from rcm.importers import parse_options
        from rcm.importers.openai import GUIDED_DEFAULTS, IMPROVED_DEFAULTS, denoiser_config, parse_flags
        from rcm.models.denoiser import Denoiser

        defaults = IMPROVED_DEFAULTS if fmt == "improved-diffusion" else GUIDED_DEFAULTS
        flags = parse_flags(parse_options(text, fmt).get("flags") or "", defaults, fmt)
        model = Denoiser(**denoiser_config(flags, fmt))
        return model, f"{fmt} UNet {flags['image_size']} px, {flags['num_channels']} channels"
    if fmt:
        raise ConfigError(f"denoiser: cannot build format '{fmt}' without its files")
    from rcm.train.denoiser import DenoiserOptions, build

    o = _options(DenoiserOptions, cfg["denoiser"])
    return build(o, size, c), f"rcm UNet {o.block_out_channels}"


def rrcm(cfg: dict, sigma: float) -> tuple[nn.Module, str]:
    from rcm.models.vit import RRCMNet, SigmaConditioned
    from rcm.train.rrcm_pretrain import PretrainOptions

    c, size, classes = image_shape(cfg)
    o = _options(PretrainOptions, cfg["rrcm_pretrain"])
    net = RRCMNet(image_size=size, in_channels=c, patch_size=o.patch_size, dim=o.dim, depth=o.depth,
                  heads=o.heads, mlp_ratio=o.mlp_ratio, proj_dim=0, num_classes=classes)
    return (SigmaConditioned(net, sigma),
            f"rRCM ViT dim {o.dim}, depth {o.depth}, patch {o.patch_size} ({(size // o.patch_size) ** 2} tokens)")


def base_classifier(cfg: dict, method: str, sigma: float) -> tuple[nn.Module, str]:
    """The base classifier ``method`` certifies at ``sigma`` under ``cfg``, random weights, eval mode
    (the method's ``preset`` builder in rcm.methods)."""
    from rcm import methods

    entry = methods.get(method)
    if not entry.preset:
        raise ConfigError(f"method '{method}' has no preset builder: its cost cannot be measured from a config")
    torch.manual_seed(0)
    model, text = methods.resolve(entry.preset, f"method '{method}'")(cfg, sigma)
    return model.eval(), text


def noisy_classifier(cfg: dict, sigma: float) -> tuple[nn.Module, str]:
    """Cohen et al.'s base classifier: the classifier at sigma."""
    return classifier(cfg, sigma)


def denoised_classifier(cfg: dict, sigma: float) -> tuple[nn.Module, str]:
    """A denoiser, then the clean classifier (dds, mdds)."""
    from rcm.models.denoiser import DenoisedClassifier

    den, den_text = denoiser(cfg)
    clf, clf_text = classifier(cfg, 0.0)
    return DenoisedClassifier(den, clf, sigma), f"{den_text} + {clf_text}"


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
