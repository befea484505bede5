"""Networks, and the registry that rebuilds any of them from a checkpoint without flags.

Every model class takes keyword-only, serialisable constructor arguments and keeps them in
``self.config``; a checkpoint stores (kind, config, state) and ``load_model`` rebuilds it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from rcm.checkpoint import load_checkpoint, load_state_strict
from rcm.errors import CheckpointError

# kind -> "module:Class"; imported lazily so the CLI starts fast.
REGISTRY = {
    "classifier": "rcm.models.classifier:Classifier",
    "rrcm": "rcm.models.vit:RRCMNet",
    "denoiser": "rcm.models.denoiser:Denoiser",
    "cohen_resnet": "rcm.models.cohen:CohenClassifier",
    "timm": "rcm.models.library:TimmClassifier",
    "hf": "rcm.models.library:HFClassifier",
}
# The role a kind plays in the pipeline: any classifier kind serves where a classifier is expected
# (``load_model(path, kind="classifier")`` accepts each of them).
ROLES = {"classifier": "classifier", "cohen_resnet": "classifier", "timm": "classifier", "hf": "classifier",
         "rrcm": "rrcm", "denoiser": "denoiser"}


def model_class(kind: str) -> type[nn.Module]:
    if kind not in REGISTRY:
        raise CheckpointError(f"unknown model kind '{kind}' (known: {', '.join(REGISTRY)})")
    module, name = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), name)


def kind_of(model: nn.Module) -> str:
    """The registry kind of a model instance (what its checkpoint records)."""
    for kind, path in REGISTRY.items():
        if path == f"{type(model).__module__}:{type(model).__name__}":
            return kind
    raise CheckpointError(f"{type(model).__name__} is not a registered rcm model class")


def build_model(kind: str, config: dict) -> nn.Module:
    return model_class(kind)(**config)


def load_model(path: str | Path, *, kind: str | None = None, use_ema: bool = False,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint alone. Returns (model in eval mode, payload).

    ``kind`` is a role ("classifier", "denoiser", "rrcm") or an exact kind; a checkpoint of any kind
    that plays that role is accepted (an imported Cohen et al. ResNet where a classifier is expected)."""
    payload = load_checkpoint(path, map_location=map_location)
    if kind is not None and kind not in (payload["kind"], ROLES.get(payload["kind"])):
        raise CheckpointError(f"{path} holds a '{payload['kind']}' model, expected a {kind}")
    try:
        model = build_model(payload["kind"], payload["model_config"])
    except TypeError as exc:
        raise CheckpointError(f"{path}: its model config does not fit '{payload['kind']}': {exc}") from exc
    state = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    load_state_strict(model, state, path)
    return model.eval(), payload
