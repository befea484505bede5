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
    CheckpointError naming it, and nothing in it has run; a file that is no torch checkpoint at all
    (random bytes, a truncated zip, an HTML page saved under a checkpoint's name) is named as such."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line.upper()), "")
        if blocked:
            raise CheckpointError(
                f"{path} holds Python objects besides tensors and plain containers: refused before "
                f"any of it ran (rcm never unpickles arbitrary objects, which can run code) ({blocked})") from None
        reason = next((line for line in lines if "operand" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(_foreign(path, f"UnpicklingError: {reason}")) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0]
        raise CheckpointError(_foreign(path, f"{type(exc).__name__}: {first}".rstrip(": "))) from exc


def _foreign(path: Path, reason: str) -> str:
    """One line saying what a file that torch could not read is, judged by its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = None
    if head is None:
        what = "cannot be read"
    elif not head:
        what = "is empty"
    elif head.startswith(b"PK"):
        what = ("is a zip archive but not one torch.save wrote" if zipfile.is_zipfile(path)
                else "is a truncated or damaged zip archive")
    elif head[0] == 0x80 and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        # a pickle, but not one torch.save writes (or a damaged one): nothing in it was run
        return (f"{path} is a Python pickle that torch's weights-only reader cannot read: refused before "
                f"any of it ran (rcm never unpickles arbitrary objects, which can run code) ({reason})")
    else:
        what = (f"starts with {head[:16]!r}, neither a zip archive (torch.save) nor a pickle"
                + (" (an HTML page saved under a checkpoint's name?)" if head.lstrip()[:1] == b"<" else ""))
    return f"not a torch checkpoint: {path} {what} ({reason})"


def load_state_strict(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict that reports an architecture mismatch as a CheckpointError naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CheckpointError(
            f"{path} does not match the {type(module).__name__} architecture: {first}"
        ) from exc
