"""`rcm dvc`: the DVC stages of a config's own methods (``custom_methods``), written into dvc.yaml.

dvc.yaml is written by hand for the built-in methods and cannot loop over a mapping of methods, each with
its own flags and files. This command appends, after a marker line, one stage per user's method and
role that has a ``train`` command (per sigma when its path names {sigma}), and one ``certify-NAME``
matrix over sigmas and shards whose command is the one Snakemake's certify_custom rule runs. Whatever
followed the marker is replaced; without custom methods the marker and the stages go, leaving the
hand-written file as it was. ``--check`` writes nothing and fails when dvc.yaml is not what this
command would write (tests/test_workflow.py compares the result with Snakemake's DAG).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from rcm import methods
from rcm import stages as model_table
from rcm.errors import ConfigError

MARKER = "  # ---- custom_methods: written by `rcm dvc` from the config; edit the config, not these lines ----"


def _load(files: list[str]) -> dict:
    merged: dict = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        for k, v in data.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
    return merged


def _certify_code(text: str) -> list[str]:
    """The code deps of the hand-written fixed-n certify stages (those of the first built-in)."""
    stages = yaml.safe_load(text)["stages"]
    stage = stages[f"certify-{methods.BUILTIN[0].name}"]
    return [d for d in stage["deps"] if d.startswith("rcm/")]


def _dvc_path(template: str, sigma: str) -> str:
    return template.format(sigma=sigma, results="${results}", dataset="${dataset}")


def stages(cfg: dict, certify_code: list[str]) -> str:
    """The YAML text of the custom methods' stages (indented under ``stages:``), or ''."""
    custom = methods.from_config(cfg.get("custom_methods") or {})
    if not custom:
        return ""
    problems = model_table.custom_file_errors(cfg, custom)
    if problems:
        raise ConfigError(problems[0])
    for i, c in enumerate(cfg.get("cascades") or []):
        if c.get("method") in custom:
            raise ConfigError(f"cascades.{i}.method: dvc.yaml's certify-cascade stage cannot pass a user's "
                              f"method's flags; certify the cascade of '{c['method']}' with Snakemake")
    for i, m in enumerate(cfg.get("sequential_methods") or []):
        if m in custom:
            raise ConfigError(f"sequential_methods.{i}: dvc.yaml's certify-sequential stage cannot pass a "
                              f"user's method's flags; certify '{m}' sequentially with Snakemake")
    out = [MARKER]
    for name, m in custom.items():
        for role, command in m.train.items():
            template = m.templates[role]
            per_sigma = "{sigma}" in template
            sigma = "${item}" if per_sigma else ""
            output = _dvc_path(template, sigma)
            cmd = command.format(sigma=sigma, output=output, python="python", results="${results}",
                                 dataset="${dataset}")
            out.append(f"  train-{name}-{role}:")
            body = [f"cmd: {_scalar(cmd)}", "outs:", f"  - {_scalar(output)}"]
            if per_sigma:
                out += ["    foreach: ${sigmas}", "    do:"] + [f"      {line}" for line in body]
            else:
                out += [f"    {line}" for line in body]
            out.append("")
        flags = ["--custom_base_classifier", m.builder,
                 "--custom_models", *(f"{r}={t}" for r, t in m.templates.items())]
        flags += ["--custom_sigma_conditioned"] if m.sigma_conditioned else []
        flags += ["--custom_noise", m.noise] if m.noise else []
        source = methods.source_file(m)
        deps = ["${results}/${dataset}/data/test.pt"]
        deps += [_dvc_path(t, "${item.sigma}") for t in m.templates.values()]
        deps += certify_code + ([source] if source else [])
        out += [f"  certify-{name}:",
                "    matrix:",
                "      sigma: ${sigmas}",
                "      shard: ${shard_ids}",
                "    cmd: >-",
                f"      rcm certify --dataset ${{dataset}} --results ${{results}} --method {name}",
                "      --sigma ${item.sigma} --shard ${item.shard} ${certify}",
                f"      {' '.join(shlex.quote(f) for f in flags)}",
                "    deps:", *(f"      - {_scalar(d)}" for d in deps),
                "    params:",
                "      - config/config.yaml:",
                "          - certify",
                # what its --custom_* flags carry, not preset or train_gpus (they change no certificate)
                *(f"          - custom_methods.{name}.{key}" for key in CERTIFY_KEYS
                  if key in cfg["custom_methods"][name]),
                "    outs:",
                f"      - ${{results}}/${{dataset}}/certify/{name}/sigma_${{item.sigma}}/shard_${{item.shard}}-of-${{certify.shards}}.tsv",
                ""]
    return "\n".join(out)


CERTIFY_KEYS = ("base_classifier", "models", "sigma_conditioned", "noise")   # those rcm certify is given


def _scalar(text: str) -> str:
    """``text`` as one YAML scalar (quoted when plain YAML would read it otherwise)."""
    return yaml.safe_dump(text, width=10_000).removesuffix("\n...\n").strip()


def render(current: str, cfg: dict) -> str:
    """dvc.yaml's text with the custom methods' stages of ``cfg`` in place of any earlier ones."""
    base = current.split("\n" + MARKER, 1)[0].rstrip("\n") + "\n"
    extra = stages(cfg, _certify_code(base))
    return base + ("\n" + extra if extra else "")


def add_arguments(p) -> None:
    p.add_argument("--config", nargs="+", default=["config/config.yaml"],
                   help="the config files, merged in order (as snakemake --configfile A B)")
    p.add_argument("--dvc_file", default="dvc.yaml", help="the dvc.yaml to update")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")


def main(args) -> None:
    path = Path(args.dvc_file)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run in the repository root)")
    current = path.read_text()
    new = render(current, _load(args.config))
    if args.check:
        if new != current:
            print(f"rcm dvc: {path} does not hold the stages of {' '.join(args.config)}'s custom_methods; "
                  "run `rcm dvc`", file=sys.stderr)
            raise SystemExit(1)
        print(f"{path} is up to date")
        return
    if new != current:
        path.write_text(new)
    print(f"wrote {path}" if new != current else f"{path} is up to date")
