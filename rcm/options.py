"""Typed stage configs <-> command-line flags, one definition for both.

A stage's hyperparameters are a dataclass. ``add_options`` turns each field into a flag spelled
exactly like its config key (``--batch_size 64``), which is also how DVC unpacks a params dict
(``cmd: rcm train-classifier ${classifier}``): booleans are ``store_true`` flags, lists take
several values. ``from_args`` rebuilds the dataclass, so library code gets plain typed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _scalar(tp):
    return {int: int, float: float, str: str}.get(tp, str)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, flag = hints[f.name], f"--{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if tp is bool:
            if default:
                raise TypeError(f"{cls.__name__}.{f.name}: boolean options must default to False "
                                "(DVC writes a true value as a bare flag and omits a false one)")
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp)
            parser.add_argument(flag, type=_scalar(inner), nargs="+", default=list(default),
                                help=f"{help_text} (default: {' '.join(map(str, default))})")
        else:
            args = typing.get_args(tp)  # Optional[X]
            inner = next((a for a in args if a is not type(None)), tp)
            parser.add_argument(flag, type=_scalar(inner), default=default,
                                help=f"{help_text} (default: {default})")


def add_stage_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--dataset`` and ``--results`` (where every stage reads and writes, via rcm.paths), then
    the stage's own options."""
    from rcm.paths import DATASETS

    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="data set (default: digits)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    add_options(parser, cls)


def resolve_device(name: str):
    """A stage's ``device`` option as a torch.device: 'auto' is CUDA when present, else the CPU; under
    torchrun, 'cuda' means this process's GPU (LOCAL_RANK)."""
    import torch

    from rcm.distributed import local_device

    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return local_device(torch.device(name))


def from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def option(default, help: str = "", **kw):  # noqa: A002 - mirrors argparse
    """A dataclass field with a help text; lists get a default_factory."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
