"""`rcm import-model`: turn a checkpoint written by the papers' own code into an rcm checkpoint.

``FORMATS`` maps each ``--format`` to the reader of that source (one small module per source), as
``rcm.models.REGISTRY`` maps model kinds to classes. A reader takes the source path and its options
and returns ``(model, details)``: an rcm model (a class of ``rcm.models.REGISTRY``) holding the
original weights and computing the original function, and what it learnt from the file. The rest of
the package only ever sees the rcm checkpoint written here, which records where it came from
(``origin``: format, source file name, sha256, options, details).

Reading never runs code from the file (`rcm.checkpoint.load_weights`), and the output is written
atomically: after an error nothing is left at ``--out``.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from rcm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

# torch and the readers are imported inside the functions: the workflow imports this module (for
# is_placeholder and check_source) every time Snakemake parses the DAG, which must stay quick.

# --format -> ("module:reader", the options it takes)
FORMATS = {
    "cohen": ("rcm.importers.cohen:read", ("arch", "dataset", "mean", "std")),
    "improved-diffusion": ("rcm.importers.openai:read_improved", ("flags",)),
    "guided-diffusion": ("rcm.importers.openai:read_guided", ("flags",)),
    "timm": ("rcm.importers.library:read_timm", ("model", "image_size", "mean", "std", "interpolation", "num_classes")),
    "hf": ("rcm.importers.library:read_hf", ("image_size", "mean", "std", "interpolation")),
    "rrcm": ("rcm.importers.rrcm:read", ("heads", "head_norm")),
    "diffusers": ("rcm.importers.diffusers_folder:read", ()),
}
# The value of a stage's `pretrained` option that means "train, import nothing": an empty file kept
# in the repository, so that dvc.yaml can always list `pretrained` as a dependency.
PLACEHOLDER = "pretrained/train-from-scratch"
ALL_OPTIONS = tuple(dict.fromkeys(o for _, options in FORMATS.values() for o in options))


def _reader(fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}' (known: {', '.join(FORMATS)})")
    path, options = FORMATS[fmt]
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name), options


def sha256(path: str | Path) -> str:
    """Of a file's bytes; of a folder, of each file's relative name and bytes in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_file(src: str | Path):
    """The unpickled file, tensors and plain containers only (never code)."""
    from rcm.checkpoint import load_weights

    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"model file not found: {src}")
    return load_weights(src)


def read_state(src: str | Path) -> dict:
    """A file that is a state dict (name -> tensor), with a DataParallel ``module.`` prefix removed."""
    import torch

    state = read_file(src)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = (f"a dict with keys {', '.join(list(map(str, state))[:5])}" if isinstance(state, dict)
                else type(state).__name__)
        raise CheckpointError(f"{src} is not a state dict of tensors (it holds {kind})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_into(module: torch.nn.Module, state: dict, src: str | Path, hint: str = "") -> None:
    """Strict load; a mismatch names the file and the first keys and shapes at fault."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, network {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:2])}{'; ...' if len(shapes) > 2 else ''})")
    if problems:
        raise CheckpointError(f"{src} does not fit the network: {'; '.join(problems)}" + (f" -- {hint}" if hint else ""))
    module.load_state_dict(state, strict=True)


def import_model(fmt: str, src: str | Path, out: str | Path, *, schedule: dict | None = None,
                 **options) -> tuple[torch.nn.Module, dict]:
    """Read ``src`` in format ``fmt``, write the rcm checkpoint ``out``; returns (model, origin).
    ``schedule``: the noise schedule of a diffusers folder that has no scheduler config."""
    from rcm.checkpoint import save_checkpoint
    from rcm.models import ROLES, kind_of

    reader, accepted = _reader(fmt)
    given = {k: v for k, v in options.items() if v not in (None, "", [], ())}
    foreign = sorted(set(given) - set(accepted))
    if foreign:
        raise ConfigError(f"--format {fmt} takes {', '.join('--' + o for o in accepted) or 'no options'}; "
                          f"{', '.join('--' + o for o in foreign)} does not apply")
    if schedule is not None and fmt == "diffusers":
        given["schedule"] = schedule
    src = Path(src)
    model, details = reader(src, given)
    kind = kind_of(model)
    origin = dict(format=fmt, source=src.name, sha256=sha256(src), options=given, details=details)
    save_checkpoint(out, kind=kind, model_config=model.config, model_state=model.state_dict(), step=0,
                    config={"imported": True}, origin=origin, ema=None, metrics=[])
    return model, {**origin, "kind": kind, "role": ROLES[kind]}


def is_placeholder(source: str) -> bool:
    return source in ("", PLACEHOLDER) or Path(source) == Path(PLACEHOLDER)


def denoiser_format(fmt: str, source: str) -> str:
    """A denoiser's import format: the one given, else ``diffusers`` for a folder ('' for a file)."""
    return fmt or ("diffusers" if Path(source).is_dir() else "")


def parse_noisy_entry(entry: str) -> tuple[str, str]:
    """A ``pretrained_noisy`` entry 'SIGMA=PATH' -> (canonical sigma text, PATH)."""
    from rcm.paths import fmt_sigma

    key, sep, path = entry.partition("=")
    try:
        if sep and path:
            return fmt_sigma(key), path
    except ValueError:
        pass
    raise ConfigError(f"'{entry}' is not SIGMA=PATH")


def noisy_sources(entries: list[str]) -> dict[str, str]:
    """``pretrained_noisy`` entries -> {canonical sigma text: PATH} (a later entry for a sigma wins;
    the workflow's config check refuses repeats)."""
    return dict(parse_noisy_entry(entry) for entry in entries)


def parse_options(text: str, fmt: str) -> dict:
    """A stage's ``pretrained_options`` string (``rcm import-model`` flags) as import options."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog=f"pretrained_options (--format {fmt})", add_help=False, exit_on_error=False)
    add_option_arguments(parser)
    try:
        args, rest = parser.parse_known_args(shlex.split(text or ""))
    except (argparse.ArgumentError, ValueError) as exc:
        raise ConfigError(f"pretrained_options '{text}': {exc}") from None
    if rest:
        raise ConfigError(f"pretrained_options '{text}': not rcm import-model options: {' '.join(rest)}")
    return {k: getattr(args, k) for k in ALL_OPTIONS}


def import_for_stage(source: str, fmt: str, options: str, out: str | Path, role: str,
                     schedule: dict | None = None) -> torch.nn.Module:
    """What a training stage does when its ``pretrained`` option names a file: import it to ``out``
    (the checkpoint the stage would have trained), after checking that it plays ``role``."""
    if not fmt:
        raise ConfigError(f"pretrained '{source}' needs pretrained_format (one of {', '.join(FORMATS)})")
    model, origin = import_model(fmt, source, out, schedule=schedule, **parse_options(options, fmt))
    if origin["role"] != role:
        Path(out).unlink(missing_ok=True)
        raise ConfigError(f"pretrained '{source}' (--format {fmt}) is a {origin['role']}, but this stage "
                          f"needs a {role}")
    print(f"imported {source} ({fmt}, sha256 {origin['sha256'][:12]}) -> {out}: kind '{origin['kind']}', "
          f"no training", file=sys.stderr)
    return model


# a key each format's file must hold (after a DataParallel "module." prefix), for check_source
_SIGNATURE = {"cohen": "state_dict", "improved-diffusion": "input_blocks.0.0.weight",
              "guided-diffusion": "input_blocks.0.0.weight", "rrcm": "pos_embed"}


def check_source(source: str, fmt: str, options: str = "") -> list[str]:
    """Cheap checks of a ``pretrained`` setting, for the workflow to run before any job starts: the
    format and options are valid, the file or folder exists and looks like that format (a torch
    zip file is opened memory-mapped, reading only its key names). One message per problem."""
    if fmt not in FORMATS:
        return [f"unknown format '{fmt}' (known: {', '.join(FORMATS)})"]
    try:
        parsed = parse_options(options, fmt)
        accepted = FORMATS[fmt][1]
        foreign = [o for o, v in parsed.items() if v not in (None, "", [], ()) and o not in accepted]
        if foreign:
            return [f"options {', '.join('--' + o for o in foreign)} do not apply to format {fmt}"]
        if fmt in ("improved-diffusion", "guided-diffusion"):
            from rcm.importers import openai

            defaults = openai.IMPROVED_DEFAULTS if fmt == "improved-diffusion" else openai.GUIDED_DEFAULTS
            if not parsed["flags"]:
                return [f"format {fmt} needs --flags in the options (the model's MODEL_FLAGS and DIFFUSION_FLAGS)"]
            openai.denoiser_config(openai.parse_flags(parsed["flags"], defaults, fmt), fmt)
    except ConfigError as exc:
        return [str(exc)]
    path = Path(source)
    if not path.exists():
        return [f"'{source}' does not exist"]
    if fmt in ("hf", "diffusers"):
        if not path.is_dir():
            return [f"'{source}' must be a folder for format {fmt}"]
        if not ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file()):
            return [f"'{source}' holds no config.json: not a {fmt} folder"]
        return []
    if not path.is_file():
        return [f"'{source}' must be a file for format {fmt}"]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types
            return [f"'{source}' is not a readable safetensors file ({type(exc).__name__})"]
        return []
    if not zipfile.is_zipfile(path):
        return []  # torch's legacy format cannot be opened lazily; the import job checks it
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the message
        return [f"'{source}' cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]
    key = _SIGNATURE.get(fmt)
    if key and isinstance(payload, dict):
        keys = {k.removeprefix("module.").removeprefix("base_model.") for k in map(str, payload)}
        if key not in keys:
            return [f"'{source}' does not look like a {fmt} file (it has no '{key}')"]
    return []


def add_arguments(p) -> None:
    p.add_argument("src", help="the file (or folder) written by the original code")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="the source format")
    p.add_argument("--out", required=True, help="the rcm checkpoint to write")
    p.add_argument("--sigma", type=float, default=None,
                   help="the noise level the model is for (a Gaussian baseline's training sigma; a fine-tuned "
                        "rRCM classifier's): only for the `rcm certify` command printed at the end")
    add_option_arguments(p)


def _reads(method, role: str, sigma: float) -> tuple[bool, bool]:
    """(does ``method`` read a model of ``role``, is that one model per sigma): from its file names at
    ``sigma`` and at another sigma (under a placeholder results root)."""
    here, there = (method.files(s, "RESULTS", "DATASET") for s in (sigma, 2 * sigma))
    return role in here, role in here and here[role] != there.get(role)


def certify_command(role: str, out: str, dataset: str, sigma: float | None, has_head: bool = True) -> str:
    """The `rcm certify` command that certifies with what `rcm import-model` wrote (its --model entry);
    '' for a model that is not certified on its own (one with no classification head: an rRCM encoder
    before fine-tuning) or that no built-in method reads.

    The method is the first of ``rcm.methods.BUILTIN`` (in order) whose files include a model of
    ``role``: for a model trained at a noise level (sigma > 0), first one that reads one such model
    per sigma (Cohen et al.'s classifier, a fine-tuned rRCM classifier), certified at that sigma; for
    one with sigma 0 or none given, first one that reads one such model for every sigma (the clean
    classifier or the denoiser behind dds; the other files come from the results root), at any SIGMA;
    failing that, the first that reads the role at all."""
    from rcm import methods

    if not has_head:
        return ""
    data = f"--dataset {dataset or 'DATASET'}"
    s = "SIGMA" if sigma is None else f"{sigma:g}"
    trained_at_sigma = (sigma or 0) > 0
    probe = sigma if trained_at_sigma else 0.5
    readers = []                                    # (method, one model of the role per sigma)
    for m in methods.BUILTIN:
        reads, per_sigma = _reads(m, role, probe)
        if reads:
            readers.append((m, per_sigma))
    if not readers:
        return ""
    method, per_sigma = next((r for r in readers if r[1] == trained_at_sigma), readers[0])
    return f"rcm certify {data} --method {method.name} --sigma {s if per_sigma else 'SIGMA'} --model {role}={out}"


def add_option_arguments(p) -> None:
    p.add_argument("--flags", default="", help="improved-/guided-diffusion: MODEL_FLAGS and DIFFUSION_FLAGS, "
                                               "as that code's README prints them")
    p.add_argument("--arch", default="", help="cohen: the architecture, when the file does not record it")
    p.add_argument("--dataset", default="", help="cohen: whose normalisation the model applies "
                                                 "(cifar10 or imagenet; default: the architecture's)")
    p.add_argument("--model", default="", help="timm: the architecture name the weights belong to")
    p.add_argument("--image_size", type=int, default=None, help="timm, hf: the network's input size (overrides)")
    p.add_argument("--interpolation", default="", help="timm, hf: how inputs of another size are resized "
                                                       "(antialiased; default: timm's config, bicubic for hf)")
    p.add_argument("--num_classes", type=int, default=None, help="timm: classes of the head (default: the config's)")
    p.add_argument("--heads", type=int, default=None, help="rrcm: attention heads (default: width / 64)")
    p.add_argument("--head_norm", choices=["true", "false"], default=None,
                   help="rrcm, fine-tuned classifier: does the head read the final LayerNorm's output "
                        "(default: as the authors' config for the image size; 32 px: false)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean (cohen, timm, hf; overrides)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std (overrides)")


def main(args) -> None:
    options = {k: getattr(args, k) for k in ALL_OPTIONS}
    model, origin = import_model(args.format, args.src, args.out, **options)
    size = sum(p.numel() for p in model.parameters())
    print(f"imported {args.src} ({args.format}, sha256 {origin['sha256'][:12]}) -> {args.out}: "
          f"a {origin['role']} of kind '{origin['kind']}', {size / 1e6:.2f}M parameters", file=sys.stderr)
    if origin["role"] == "denoiser":
        stars = ", ".join(f"sigma={s}: t*={model.t_star(s)}" for s in (0.25, 0.5, 1.0))
        print(f"  one-shot denoising timesteps: {stars}", file=sys.stderr)
    dataset = args.dataset or (origin.get("details") or {}).get("dataset", "")
    command = certify_command(origin["role"], args.out, dataset, args.sigma, getattr(model, "head", True) is not None)
    if command:   # after `rcm prepare --dataset ...` has written the certification split
        print(f"certify with it: {command}")
