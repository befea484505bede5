"""Checkpoints that carry their own provenance.

A checkpoint stores the model's kind and constructor config, the resolved stage config, the step,
and (for resumable training) optimiser and EMA state, so loading needs no flags. Writes are atomic.

Reading never runs code from the file: ``torch.load(weights_only=True)`` unpickles tensors and plain
containers only, so a crafted file placed where a checkpoint is expected (a co-author's, a DVC
remote's, a download) is refused before anything in it executes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from rcm.atomic import atomic_path
from rcm.errors import CheckpointError

FORMAT = "rcm-checkpoint-v1"
REQUIRED = ("kind", "model_config", "model")  # what load_model needs of every payload


def save_checkpoint(path: str | Path, *, kind: str, model_config: dict, model_state: dict,
                    step: int, config: dict | None = None, **extra: Any) -> None:
    """Atomically write a checkpoint. ``extra`` may hold optimizer/ema/metrics state."""
    payload = {"format": FORMAT, "kind": kind, "model_config": dict(model_config),
               "model": model_state, "step": int(step), "config": dict(config or {}), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, *, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint; every failure names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = load_weights(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an rcm checkpoint (no '{FORMAT}' header)")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is an incomplete rcm checkpoint: it lacks {', '.join(missing)}")
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(f"{path} holds a '{payload['kind']}' model, expected '{kind}'")
    return payload


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of a file that may come from anyone: tensors and plain containers only
    (``weights_only=True``). A file that needs any other object unpickled is refused with a
    CheckpointError naming it, and nothing in it has run; so is a truncated or foreign file."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            first = next((line for line in str(exc).splitlines() if "GLOBAL" in line.upper()), "")
            raise CheckpointError(
                f"{path} holds Python objects besides tensors and plain containers: refused before "
                f"any of it ran (rcm never unpickles arbitrary objects, which can run code) "
                f"({first.strip() or 'weights_only load failed'})") from None
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint (UnpicklingError: {exc})") from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def load_state_strict(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict that reports an architecture mismatch as a CheckpointError naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CheckpointError(
            f"{path} does not match the {type(module).__name__} architecture: {first}"
        ) from exc
