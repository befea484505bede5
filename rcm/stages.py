"""The models the workflow makes, as data: which stage trains each model file, which config option
imports it instead, and which files a stage reads.

A method (rcm.methods) names the files its base classifier reads; this table says where each of
them comes from. From the two, :func:`needed` derives what a config's DAG holds: the training and
import jobs of every file its methods read, and of every file those jobs read in turn (a
fine-tuning stage reads the model it fine-tunes). The workflow's checks (which ``pretrained`` files
must exist, whether anything trains) and ``rcm plan`` read that list; neither names a method.

This module imports no torch: Snakemake reads it while the workflow is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rcm import paths
from rcm.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One way a model file is made. ``output(results, dataset, sigma)`` is the file (``sigma`` None
    for a stage with one output); ``rule``/``section`` the workflow rule that trains it and its
    config section; ``import_rule`` the rule that imports it instead, from the section's
    ``pretrained`` (the file at sigma 0 or of a single-output stage) or ``pretrained_noisy`` (a
    per-sigma file at sigma > 0); ``needs(sigma)`` the (stage rule, sigma) of the files training
    reads."""

    rule: str
    section: str
    output: Callable[[str | Path, str, float | None], Path]
    per_sigma: bool
    import_rule: str = ""
    needs: Callable[[float | None], list[tuple[str, float | None]]] = field(default=lambda sigma: [])

    def imported_from(self, cfg: dict, sigma: float | None) -> str:
        """The source the config imports this stage's file at ``sigma`` from ('' when it trains)."""
        if not self.import_rule:
            return ""
        from rcm.importers import is_placeholder, noisy_sources, parse_noisy_entry

        if self.per_sigma and sigma:
            return noisy_imports(cfg, self.section).get(paths.fmt_sigma(sigma), "")
        from rcm.importers import is_placeholder

        source = cfg[self.section].get("pretrained", "")
        return "" if is_placeholder(source) else source


def noisy_imports(cfg: dict, section: str) -> dict[str, str]:
    """A section's ``pretrained_noisy`` sources by sigma text: the well-formed entries for the configured
    sigmas (what the workflow imports; its checks name a malformed entry and say which are ignored)."""
    from rcm.importers import noisy_sources, parse_noisy_entry

    def wellformed(entry: str) -> bool:
        try:
            parse_noisy_entry(entry)
        except ConfigError:
            return False
        return True

    sigmas = {paths.fmt_sigma(s) for s in cfg["sigmas"]}
    entries = [e for e in cfg[section].get("pretrained_noisy", []) if wellformed(e)]
    return {s: src for s, src in noisy_sources(entries).items() if s in sigmas}


STAGES = (
    Stage("train_denoiser", "denoiser", lambda r, d, s: paths.denoiser(r, d), per_sigma=False,
          import_rule="import_denoiser"),
    Stage("train_classifier", "classifier", lambda r, d, s: paths.classifier(r, d, s), per_sigma=True,
          import_rule="import_classifier"),
    Stage("finetune_denoiser", "finetune_denoiser", lambda r, d, s: paths.denoiser(r, d, finetuned=True),
          per_sigma=False, needs=lambda s: [("train_denoiser", None), ("train_classifier", 0.0)]),
    Stage("pretrain_rrcm", "rrcm_pretrain", lambda r, d, s: paths.rrcm_pretrained(r, d), per_sigma=False,
          import_rule="import_rrcm"),
    Stage("finetune_rrcm", "rrcm_finetune", lambda r, d, s: paths.rrcm_finetuned(r, d, s), per_sigma=True,
          import_rule="import_rrcm_classifier", needs=lambda s: [("pretrain_rrcm", None)]),
)
BY_RULE = {s.rule: s for s in STAGES}


@dataclass(frozen=True)
class Job:
    """One model file of a config's DAG: the stage that makes it, at ``sigma`` (None: a single-output
    stage), and the source it is imported from ('' when the stage trains it)."""

    stage: Stage
    sigma: float | None
    source: str
    path: Path

    @property
    def trains(self) -> bool:
        return not self.source

    @property
    def rule(self) -> str:
        return self.stage.rule if self.trains else self.stage.import_rule


def _spelled(path: str | Path, results: str | Path, dataset: str) -> tuple[Stage, str | None] | None:
    """The stage whose output ``path`` is, with the sigma as the name spells it (None: one output)."""
    path = Path(path)
    for stage in STAGES:
        if not stage.per_sigma:
            if stage.output(results, dataset, None) == path:
                return stage, None
            continue
        pattern = re.escape(Path(stage.output(results, dataset, "{sigma}")).as_posix())
        hit = re.fullmatch(pattern.replace(re.escape("{sigma}"), r"(\d+\.\d+)"), path.as_posix())
        if hit:
            return stage, hit.group(1)
    return None


def made_by(path: str | Path, results: str | Path, dataset: str) -> tuple[Stage, float | None] | None:
    """The (stage, sigma) whose output is ``path`` (a per-sigma stage's at the sigma its name spells,
    whether or not the config lists it); None when no stage makes it (a user's own file, or a sigma
    spelled otherwise than rcm writes it, which :func:`custom_file_errors` refuses)."""
    hit = _spelled(path, results, dataset)
    if hit is None or hit[1] is None:
        return hit
    stage, text = hit
    return (stage, float(text)) if paths.fmt_sigma(float(text)) == text else None


def custom_file_errors(cfg: dict, custom: dict) -> list[str]:
    """One line per problem with the files of users' methods (``custom``: name -> rcm.methods.Method)
    that only the stages can see: a file a workflow rule makes given a ``train`` command of its own (two
    rules would make it), or named with a sigma spelled otherwise than rcm writes it (``0.50``: the rule
    would write ``0.5``)."""
    lines, results, dataset = [], cfg["results"], cfg["dataset"]
    for name, method in custom.items():
        for role, template in method.templates.items():
            for s in cfg["sigmas"]:
                hit = _spelled(method.files(s, results, dataset)[role], results, dataset)
                if hit and hit[1] is not None and paths.fmt_sigma(float(hit[1])) != hit[1]:
                    lines.append(f"custom_methods.{name}.models.{role}: '{template}' names {hit[0].rule}'s file "
                                 f"with sigma {hit[1]}; rcm writes it {paths.fmt_sigma(float(hit[1]))}")
                    break
                if hit and role in method.train:
                    lines.append(f"custom_methods.{name}.train: '{template}' is a file the workflow's rule "
                                 f"{hit[0].rule} makes; give role '{role}' no train command (that rule makes it)")
                    break
    return lines


def certified_methods(cfg: dict) -> list[str]:
    """Every method the config certifies (fixed n, sequentially, in a cascade), in first-named order."""
    names = list(cfg.get("methods", [])) + list(cfg.get("sequential_methods", []))
    names += [c["method"] for c in cfg.get("cascades", [])]
    return list(dict.fromkeys(names))


def method_files(cfg: dict) -> list[Path]:
    """Every model file the config's methods read at its sigmas (a user's method from the config's
    ``custom_methods``, validated, when it is not registered)."""
    from rcm import methods

    try:
        custom = methods.from_config(cfg.get("custom_methods") or {})
    except ConfigError:
        custom = {}                              # the workflow's checks name the problem
    out = []
    for name in certified_methods(cfg):
        if name not in custom and name not in methods.names():
            continue                             # no method of that name: named by the checks too
        method = custom.get(name) or methods.get(name)
        for s in cfg["sigmas"]:
            out += method.files(float(s), cfg["results"], cfg["dataset"]).values()
    return out


def needed(cfg: dict) -> list[Job]:
    """The model files of the config's DAG that a stage makes: those its methods read and those their
    training reads, each once, in the order of STAGES then sigma. A file imported from a
    ``pretrained`` source needs nothing more."""
    results, dataset = cfg["results"], cfg["dataset"]
    todo = [hit for f in method_files(cfg) if (hit := made_by(f, results, dataset))]
    seen: dict[tuple[str, float | None], Job] = {}
    while todo:
        stage, sigma = todo.pop()
        if (stage.rule, sigma) in seen:
            continue
        job = Job(stage, sigma, stage.imported_from(cfg, sigma), stage.output(results, dataset, sigma))
        seen[(stage.rule, sigma)] = job
        if job.trains:
            todo += [(BY_RULE[rule], s) for rule, s in stage.needs(sigma)]
    order = {s.rule: i for i, s in enumerate(STAGES)}
    return sorted(seen.values(), key=lambda j: (order[j.stage.rule], -1.0 if j.sigma is None else j.sigma))
