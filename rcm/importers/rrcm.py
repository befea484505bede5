"""``--format rrcm``: the networks of the rRCM authors' code (Lei et al. 2025, github.com/jiachenlei/rRCM).

Two kinds of file, both plain state dicts (a DataParallel/accelerate ``module.`` prefix is removed):
- a pretraining state (``nnet.pth``, ``nnet_ema.pth`` or ``target_model.pth`` of their
  ``TrainState.save``): the ViT and its ``projection_head``; it becomes an encoder (no head), the
  input of ``rcm finetune-rrcm``;
- a fine-tuned classifier (the ``FinetuneModel`` state their ``rrcm_tune.py`` saves): the ViT under
  ``base_model.`` and ``linear_head``; it becomes a classifier (the projector, unused by it, is
  dropped). Their CIFAR-10 fine-tuning feeds the head the CLS output *without* the final LayerNorm
  (``layernorm=False`` in configs/cifar10_finetune.py), their ImageNet fine-tuning with it
  (``layernorm=True``): ``--head_norm`` says which, by default that of the config for the file's
  image size (32: false; otherwise true).

The architecture is read from the tensor shapes (width, depth, patch and image size, MLP ratio, qkv
bias, time-token MLP, projector); only the number of attention heads is not in the file: ``--heads``,
by default width / 64 (their ViT-B: 768 / 12, ViT-S: 512 / 8).

Their parameter names map one to one onto `rcm.models.vit.RRCMNet`'s:
``patch_embed.proj`` -> ``patch_embed``, ``blocks.i.attn.{qkv,proj}`` -> ``blocks.i.{qkv,proj}``,
``blocks.i.mlp.fc{1,2}`` -> ``blocks.i.mlp.{0,2}``, ``projection_head`` -> ``projector``,
``linear_head`` -> ``head``.
"""

from __future__ import annotations

import math
import re

from rcm.errors import CheckpointError, ConfigError

_RENAMES = [(r"^patch_embed\.proj\.", "patch_embed."), (r"\.attn\.qkv\.", ".qkv."), (r"\.attn\.proj\.", ".proj."),
            (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.2."), (r"^projection_head\.", "projector."),
            (r"^linear_head\.", "head.")]


def rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    low = str(value).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ConfigError(f"--{name} takes true or false, got '{value}'")


def architecture(state: dict, src) -> dict:
    """RRCMNet arguments from the shapes of a (renamed) state dict."""
    def need(key):
        if key not in state:
            raise CheckpointError(f"{src} is not an rRCM network: it has no '{key}'")
        return state[key]

    pos, patch = need("pos_embed"), need("patch_embed.weight")
    dim, tokens = int(pos.shape[2]), int(pos.shape[1])
    side = math.isqrt(tokens - 2)
    if side * side != tokens - 2:
        raise CheckpointError(f"{src}: pos_embed has {tokens} tokens, not 2 + a square number of patches")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    fc1 = need("blocks.0.mlp.0.weight")
    arch = dict(image_size=side * int(patch.shape[2]), in_channels=int(patch.shape[1]),
                patch_size=int(patch.shape[2]), dim=dim, depth=depth, mlp_ratio=fc1.shape[0] / dim,
                qkv_bias="blocks.0.qkv.bias" in state,
                time_mlp=state["time_embed.0.weight"].shape[0] / dim if "time_embed.0.weight" in state else 0.0)
    if "projector.0.weight" in state:
        last = max(int(k.split(".")[1]) for k in state if k.startswith("projector.") and k.endswith("weight")
                   and state[k].dim() == 2)
        arch.update(proj_hidden=int(state["projector.0.weight"].shape[0]),
                    proj_dim=int(state[f"projector.{last}.weight"].shape[0]),
                    proj_bias="projector.0.bias" in state)
    else:
        arch.update(proj_dim=0)
    return arch


def read(src, options: dict):
    from rcm.importers import load_state_into, read_state
    from rcm.models.vit import RRCMNet

    state = read_state(src)
    finetuned = any(k.startswith("base_model.") for k in state)
    if finetuned:
        if "linear_head.weight" not in state:
            raise CheckpointError(f"{src} has base_model.* keys but no linear_head: not a fine-tuned rRCM classifier")
        state = {k.removeprefix("base_model."): v for k, v in state.items()}
    state = {rename(k): v for k, v in state.items()}
    dropped = []
    if finetuned:
        dropped = sorted(k for k in state if k.startswith("projector."))
        state = {k: v for k, v in state.items() if not k.startswith("projector.")}
    arch = architecture(state, src)
    heads = int(options.get("heads") or arch["dim"] // 64 or 1)
    if arch["dim"] % heads:
        raise ConfigError(f"--heads {heads} does not divide the width {arch['dim']} of {src}")
    if finetuned:
        arch.update(num_classes=int(state["head.weight"].shape[0]), proj_dim=0)
        default_norm = arch["image_size"] != 32
        arch["head_norm"] = _bool(options["head_norm"], "head_norm") if "head_norm" in options else default_norm
    elif "head_norm" in options:
        raise ConfigError(f"--head_norm applies to a fine-tuned classifier; {src} is a pretraining state")
    try:
        model = RRCMNet(**arch, heads=heads)
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{src}: {exc}") from exc
    load_state_into(model, state, src, hint="is it an rRCM ViT state dict?")
    details = {"kind": "fine-tuned classifier" if finetuned else "pretrained encoder", "heads": heads,
               "architecture": {k: v for k, v in model.config.items()}}
    if dropped:
        details["dropped"] = f"{len(dropped)} projection_head tensors (unused by the classifier)"
    return model.eval(), details
