"""The methods rcm certifies, as data: one registry entry per method.

An entry says which model files the method reads at each noise level (by role: ``classifier``,
``denoiser``, ``rrcm``, or a user's own roles), which rule or command makes each, how its base
classifier is built from them, whether one model serves every sigma (sigma-conditioned) or each sigma
has its own, and whose noise stream it draws. The four built-in methods are entries here; a
researcher's own method becomes one through the workflow config (``custom_methods``) or
:func:`register`, with the same validation either way.

This module imports no torch: Snakemake reads it while the workflow is parsed. Builders are named as
``"module:attr"`` and imported only when a model is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rcm import paths
from rcm.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9_]*$")          # a method name: a folder, a wildcard, a flag prefix
PLACEHOLDERS = {"sigma", "results", "dataset"}   # what a custom model path template may name
TRAIN_PLACEHOLDERS = {"sigma", "output", "python", "results", "dataset"}


@dataclass(frozen=True)
class Method:
    """One way to build a smoothed classifier.

    ``files(sigma, results, dataset)`` -> {role: path}: the checkpoints its base classifier reads at
    sigma. ``builder`` ("module:attr", or the callable itself) is called as
    ``builder(sigma, models, device)`` with ``models`` that dict and returns the base classifier (an
    nn.Module mapping noisy images in [0, 1] to logits). ``makers``: role -> the workflow rule (or the
    ``train`` command) that makes that file. ``preset`` ("module:attr"): ``(cfg, sigma) -> (model,
    text)``, the same network at full size with random weights (``rcm bench certify --config``).
    ``noise``: the name that keys its noise streams (seed, noise, sigma, idx); its own name unless
    it shares another method's streams."""

    name: str
    files: Callable[[float | str, str | Path, str], dict[str, Path]]
    builder: str | Callable
    sigma_conditioned: bool
    makers: dict[str, str] = field(default_factory=dict)
    preset: str = ""
    noise: str = ""
    builtin: bool = False
    templates: dict[str, str] = field(default_factory=dict)   # a custom method's model path templates
    train: dict[str, str] = field(default_factory=dict)       # a custom method's train command per role
    train_gpus: int = 0                                       # GPUs each of its train jobs asks for

    @property
    def stream(self) -> str:
        return self.noise or self.name

    def build(self, sigma: float, models: dict[str, Path], device="cpu"):
        """The base classifier at sigma, in eval mode on ``device``."""
        fn = resolve(self.builder, f"method '{self.name}'") if isinstance(self.builder, str) else self.builder
        model = fn(sigma, models, device)
        if not callable(getattr(model, "eval", None)) or not callable(getattr(model, "to", None)):
            raise ConfigError(f"method '{self.name}': its base_classifier returned {type(model).__name__}, "
                              "not an nn.Module")
        return model.to(device).eval()


# ------------------------------------------------------------------------------------ built-ins

def _gaussian_files(sigma, results, dataset):
    return {"classifier": paths.classifier(results, dataset, sigma)}


def _dds_files(sigma, results, dataset):
    return {"denoiser": paths.denoiser(results, dataset, finetuned=False),
            "classifier": paths.classifier(results, dataset, 0.0)}


def _mdds_files(sigma, results, dataset):
    return {"denoiser": paths.denoiser(results, dataset, finetuned=True),
            "classifier": paths.classifier(results, dataset, 0.0)}


def _rrcm_files(sigma, results, dataset):
    return {"rrcm": paths.rrcm_finetuned(results, dataset, sigma)}


BUILTIN = (
    # Cohen et al. 2019: a classifier trained with Gaussian augmentation at each sigma
    Method("gaussian", _gaussian_files, "rcm.models.factory:noisy_classifier", sigma_conditioned=False,
           makers={"classifier": "train_classifier | import_classifier"},
           preset="rcm.presets:noisy_classifier", builtin=True),
    # Carlini et al. 2023: one off-the-shelf diffusion denoiser, one clean classifier, for every sigma
    Method("dds", _dds_files, "rcm.models.factory:denoised_classifier", sigma_conditioned=True,
           makers={"denoiser": "train_denoiser | import_denoiser", "classifier": "train_classifier | import_classifier"},
           preset="rcm.presets:denoised_classifier", builtin=True),
    # Jeong & Shin 2023: the denoiser fine-tuned over several sigmas, then as dds
    Method("mdds", _mdds_files, "rcm.models.factory:denoised_classifier", sigma_conditioned=True,
           makers={"denoiser": "finetune_denoiser", "classifier": "train_classifier | import_classifier"},
           preset="rcm.presets:denoised_classifier", builtin=True),
    # Lei et al. 2025: a noise-conditioned ViT, fine-tuned at each sigma
    Method("rrcm", _rrcm_files, "rcm.models.factory:sigma_conditioned_vit", sigma_conditioned=False,
           makers={"rrcm": "finetune_rrcm | import_rrcm_classifier"},
           preset="rcm.presets:rrcm", builtin=True),
)

_REGISTRY: dict[str, Method] = {m.name: m for m in BUILTIN}


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered method: the built-ins first, then the registered ones in order."""
    return tuple(_REGISTRY)


def rank(name: str) -> int:
    """A method's place in reports: the built-ins in registry order, every other method after them."""
    order = [m.name for m in BUILTIN]
    return order.index(name) if name in order else len(order)


def files(name: str, sigma: float | str, results: str | Path, dataset: str) -> dict[str, Path]:
    """The checkpoint files ``name`` reads at ``sigma`` (what the workflow lists as its inputs)."""
    return get(name).files(sigma, results, dataset)


# ------------------------------------------------------------------------------------ user methods

def resolve(spec: str, where: str) -> Callable:
    """``"module:attr"`` -> the callable; ConfigError naming ``where`` when it is not there."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{where}: '{spec}' is not MODULE:ATTRIBUTE")
    _working_dir_importable()
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module '{module}' ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module '{module}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: '{spec}' is not callable")
    return obj


def _working_dir_importable() -> None:
    """Modules under the working directory import, as under ``python -m`` (the workflow's jobs)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def source_file(method: Method) -> str:
    """The file of a method's builder module, relative to the working directory, when it lies under it
    ('' otherwise, or for a callable)."""
    if not isinstance(method.builder, str):
        return ""
    _working_dir_importable()
    try:
        spec = importlib.util.find_spec(method.builder.partition(":")[0])
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return ""
    try:
        return str(Path(spec.origin).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return ""


def check_signature(fn: Callable, where: str, args: tuple = (0.25, {}, "cpu"),
                    takes: str = "(sigma, models, device)") -> None:
    """``fn`` must accept ``args`` positionally (a builder's by default; a preset's: ``({}, 0.25)``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return                                     # a builtin without a signature: trust it
    try:
        sig.bind(*args)
    except TypeError:
        raise ConfigError(f"{where}: {getattr(fn, '__name__', fn)}{sig} must take {takes}") from None


def batch_size_errors(entries: list[str], known) -> list[str]:
    """One line per ``certify.batch_sizes`` entry that names no method of ``known``, or one named
    before it (the workflow's check and ``rcm plan --check``; ``rcm certify`` itself only logs an entry
    for a method it does not know)."""
    lines, named = [], set()
    for i, entry in enumerate(entries):
        method = entry.partition("=")[0]
        if method not in known:
            lines.append(f"certify.batch_sizes.{i}: '{entry}' names no method (known: {', '.join(known)})")
        elif method in named:
            lines.append(f"certify.batch_sizes.{i}: '{entry}' repeats a method: '{method}' is given a batch size twice")
        named.add(method)
    return lines


def _fields(template: str, where: str, allowed: set[str]) -> set[str]:
    try:
        found = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"{where}: '{template}' is not a valid template ({exc})") from None
    unknown = found - allowed
    if unknown:
        raise ConfigError(f"{where}: '{template}' names {{{sorted(unknown)[0]}}} (a template may name "
                          f"{', '.join('{' + a + '}' for a in sorted(allowed))})")
    return found


def custom(name: str, *, base_classifier: str | Callable, models: dict[str, str],
           sigma_conditioned: bool = False, noise: str = "", train: str | dict[str, str] = "",
           preset: str = "", train_gpus: int = 0, where: str = "") -> Method:
    """A user's method, validated: each problem raises ConfigError in one line naming the key
    (``where`` is the key's prefix, e.g. ``custom_methods.mine``)."""
    where = where or f"method '{name}'"
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}: a method name is lower-case letters, digits and '_', starting with a "
                          f"letter; got '{name}'")
    if name in {m.name for m in BUILTIN} or name == paths.CASCADE:
        raise ConfigError(f"{where}: '{name}' is a built-in method's name; choose another")
    fn = resolve(base_classifier, f"{where}.base_classifier") if isinstance(base_classifier, str) else base_classifier
    if not callable(fn):
        raise ConfigError(f"{where}.base_classifier: {fn!r} is not callable")
    check_signature(fn, f"{where}.base_classifier")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{where}.models: give at least one ROLE: PATH_TEMPLATE")
    for role, template in models.items():
        key = f"{where}.models.{role}"
        if not NAME.match(str(role)):
            raise ConfigError(f"{key}: a role is lower-case letters, digits and '_'")
        if not isinstance(template, str) or not template:
            raise ConfigError(f"{key}: a path template, e.g. models/{name}_sigma_{{sigma}}.pt")
        found = _fields(template, key, PLACEHOLDERS)
        if "sigma" not in found and not sigma_conditioned:
            raise ConfigError(f"{key}: '{template}' has no {{sigma}}, but '{name}' is per-sigma (one model per "
                              "noise level); put {sigma} in the path, or set sigma_conditioned: true")
    builtins = [m.name for m in BUILTIN]
    if noise and noise not in builtins and noise != name:   # a built-in's streams, or the method's own
        raise ConfigError(f"{where}.noise: '{noise}' is no built-in method (streams to share: {', '.join(builtins)})")
    commands = train if isinstance(train, dict) else {role: train for role in models} if train else {}
    for role, command in commands.items():
        key = f"{where}.train" + (f".{role}" if isinstance(train, dict) else "")
        if role not in models:
            raise ConfigError(f"{key}: no model of role '{role}' (roles: {', '.join(models)})")
        if "output" not in _fields(command, key, TRAIN_PLACEHOLDERS):
            raise ConfigError(f"{key}: '{command}' has no {{output}}: the command must write the file it is "
                              "given there")
    if not isinstance(train_gpus, int) or isinstance(train_gpus, bool) or train_gpus < 0:
        raise ConfigError(f"{where}.train_gpus: a number of GPUs >= 0, got {train_gpus!r}")
    if train_gpus and not commands:
        raise ConfigError(f"{where}.train_gpus: {train_gpus}, but '{name}' has no train command to run on them")
    if preset:
        if not isinstance(preset, str):
            raise ConfigError(f"{where}.preset: MODULE:ATTR of a function (cfg, sigma) -> (model, text)")
        check_signature(resolve(preset, f"{where}.preset"), f"{where}.preset", ({}, 0.25), "(cfg, sigma)")
    templates = dict(models)

    def files_at(sigma, results, dataset):
        return {role: Path(t.format(sigma=paths.fmt_sigma(sigma), results=results, dataset=dataset))
                for role, t in templates.items()}

    builder = base_classifier if isinstance(base_classifier, str) else fn   # the spec, for flags and docs
    return Method(name, files_at, builder, sigma_conditioned=sigma_conditioned, noise=noise or "",
                  makers={role: "train_custom" if role in commands else "(expected)" for role in models},
                  templates=templates, train=commands, preset=preset, train_gpus=train_gpus)


def register(name: str, *, base_classifier: str | Callable, models: dict[str, str],
             sigma_conditioned: bool = False, noise: str = "", train: str | dict[str, str] = "",
             preset: str = "", replace: bool = False) -> Method:
    """Register a user's method for code that certifies without the workflow
    (``rcm.certify.certify_shard(method=name, ...)``). ``base_classifier`` is ``"module:attr"`` or a
    callable ``(sigma, models: dict[str, Path], device) -> nn.Module``; ``models`` maps roles to path
    templates ({sigma}, {results}, {dataset}); ``noise`` names the method whose noise streams it
    draws (default: its own); ``preset``, ``"module:attr"`` of ``(cfg, sigma) -> (model, text)``, its base
    classifier at full size with random weights (``rcm plan``, ``rcm bench certify --config``).
    Validated as the config's ``custom_methods``."""
    method = custom(name, base_classifier=base_classifier, models=models, sigma_conditioned=sigma_conditioned,
                    noise=noise, train=train, preset=preset)
    if name in _REGISTRY and not replace:
        raise ConfigError(f"method '{name}' is registered already (pass replace=True)")
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    if name in {m.name for m in BUILTIN}:
        raise ConfigError(f"'{name}' is a built-in method")
    _REGISTRY.pop(name, None)


def from_config(section: dict, prefix: str = "custom_methods") -> dict[str, Method]:
    """The config's ``custom_methods`` mapping as validated methods (not registered)."""
    out = {}
    for name, spec in (section or {}).items():
        where = f"{prefix}.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a mapping with base_classifier and models")
        unknown = set(spec) - set(SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known here: {', '.join(SPEC_KEYS)})")
        for key in ("base_classifier", "models"):
            if key not in spec:
                raise ConfigError(f"{where}.{key}: missing")
        out[name] = custom(name, where=where, **spec)
    return out


SPEC_KEYS = ("base_classifier", "models", "sigma_conditioned", "noise", "train", "preset", "train_gpus")


def register_config(section: dict) -> dict[str, Method]:
    """Validate and register the config's ``custom_methods`` (replacing earlier registrations)."""
    methods = from_config(section)
    for name, m in methods.items():
        _REGISTRY[name] = m
    return methods
