"""The workflow: Snakemake DAG, its DVC mirror, configs, incremental reruns and interruptions.

Fast tests dry-run the workflow in a copy of the repository. Tests marked `slow` share one real run
of .test/config.yaml (the session fixture `tiny_run`, a few minutes on 2 cores) and work on clones
of it, so none of them depends on another's side effects.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / ".test/config.yaml").read_text())["results"]  # the tiny config's results root
BIN = Path(sys.executable).parent
CONFIGS = ["config/config.yaml", "config/cifar10.yaml", "config/imagenet.yaml", ".test/config.yaml"]
# config section -> the option dataclass of the stage whose flags it holds
SECTIONS = {
    "data": ("rcm.data", "PrepareOptions"),
    "denoiser": ("rcm.train.denoiser", "DenoiserOptions"),
    "classifier": ("rcm.train.classifier", "ClassifierOptions"),
    "finetune_denoiser": ("rcm.train.mdds", "FinetuneDenoiserOptions"),
    "rrcm_pretrain": ("rcm.train.rrcm_pretrain", "PretrainOptions"),
    "rrcm_finetune": ("rcm.train.rrcm_finetune", "FinetuneOptions"),
    "certify": ("rcm.certify", "CertifyOptions"),
    "report": ("rcm.report", "ReportOptions"),
    "sequential": ("rcm.certify", "SequentialOptions"),
}
# rcm subcommand -> the config sections rendered into its flags
COMMAND_SECTIONS = {
    "prepare": ["data"], "train-denoiser": ["denoiser"], "train-classifier": ["classifier"],
    "finetune-denoiser": ["finetune_denoiser"], "pretrain-rrcm": ["rrcm_pretrain"],
    "finetune-rrcm": ["rrcm_finetune"], "certify": ["certify"], "report": ["report"],
}
# the rules that make a model by training or by importing, and the code of either way
MODEL_RULES = {"train_classifier", "import_classifier", "train_denoiser", "import_denoiser",
               "pretrain_rrcm", "import_rrcm", "finetune_rrcm", "import_rrcm_classifier"}
TRAIN_OR_IMPORT_CODE = {"rcm/importers", "rcm/models/cohen.py", "rcm/models/library.py", "rcm/models/openai_unet.py",
                        "rcm/train/classifier.py", "rcm/models/classifier.py", "rcm/train/denoiser.py",
                        "rcm/models/denoiser.py", "rcm/train/rrcm_pretrain.py", "rcm/train/rrcm_losses.py",
                        "rcm/train/augment.py", "rcm/models/vit.py", "rcm/train/rrcm_finetune.py"}
REPORT_FILES = {"certified_accuracy.csv", "certified_accuracy.md", "certified_accuracy.tex",
                "certified_accuracy.png", "metrics.json", "plot_certified_accuracy.csv", "paired_tests.csv",
                "cost.csv", "cost.md", "sources.txt"}
# Lints we accept: the package comes from the project's own environment, not a conda env per rule;
# `rcm` takes the results root as a flag (it builds its paths with rcm.paths, like the rules); and
# the interpreter (RCM = `<python> -m rcm`) is a global, not a param, on purpose: a venv at another
# path must not count as changed params and rerun everything.
ACCEPTED_LINTS = ("Specify a conda environment or container", "Param results is a prefix",
                  "Shell command directly uses variable RCM from outside of the rule",
                  "Shell command directly uses variable LAUNCH from outside of the rule",
                  # deliberate: the prepare jobs' params are the data keys each reads (workflow/rules/prepare.smk)
                  "Shell command directly uses variable DATA_FLAGS from outside of the rule")


# ------------------------------------------------------------------------------------------ helpers

def path_without_rcm(path: str) -> str:
    """PATH less every folder that holds an `rcm`: the fresh machine of the README."""
    return os.pathsep.join(d for d in path.split(os.pathsep)
                           if d and not os.access(os.path.join(d, "rcm"), os.X_OK))


def run_env() -> dict:
    """Snakemake's environment: no `rcm` on PATH, so every job must run the project's own (the
    rules call `<the interpreter running Snakemake> -m rcm`)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = path_without_rcm(env.get("PATH", ""))
    assert shutil.which("rcm", path=env["PATH"]) is None
    return env


def dvc_env() -> dict:
    """DVC's environment: its stages call `rcm`, found on PATH as in an activated venv (`source
    .venv/bin/activate`, or the Makefile's `make repro`)."""
    env = run_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def make_copy(dest: Path, config: str | None = ".test/config.yaml") -> Path:
    """The workflow's files in ``dest`` (a git repository, as DVC wants); ``config`` becomes
    config/config.yaml there, so Snakemake and DVC read the same file."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local")
    for item in ["Snakefile", "workflow", "profiles", "config", ".test", "rcm", "examples", "pretrained", "dvc.yaml", ".dvcignore",
                 ".dvc", ".gitignore", "Makefile", "pyproject.toml"]:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        else:
            shutil.copy2(src, dest / item)
    if config and config != "config/config.yaml":
        shutil.copy2(dest / config, dest / "config" / "config.yaml")
    if (yaml.safe_load((dest / "config" / "config.yaml").read_text()) or {}).get("custom_methods"):
        # dvc.yaml's stages of the config's own methods, as a user writes them (`rcm dvc`)
        subprocess.run([sys.executable, "-m", "rcm", "dvc"], cwd=dest, check=True, capture_output=True,
                       env=run_env())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def clone(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run (outputs, Snakemake metadata, DVC lock and cache), mtimes kept."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def snakemake(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """A bare `snakemake` in ``cwd``, as the Makefile and the docs run it (it applies
    profiles/default by itself); put targets before options (--configfile takes several values)."""
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=dvc_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def tail(r: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (r.stdout + r.stderr)[-n:]


def overlay(tmp_path: Path, name: str, data: dict) -> str:
    """A config file merged over config/config.yaml with --configfile (nested keys merge)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@dataclasses.dataclass(frozen=True)
class Job:
    rule: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shell: str
    resources: str = ""


_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n(.*?)(?=^\[|^(?:local)?rule \w+:|^Job stats|\Z)",
                    re.M | re.S)


def parse_jobs(text: str) -> list[Job]:
    """The jobs of a `snakemake -n -p` listing."""
    jobs = []
    for m in _BLOCK.finditer(text):
        body = m.group(2)
        field = lambda key: re.search(rf"^\s+{key}: (.*)$", body, re.M)  # noqa: E731
        files = lambda key: tuple(field(key).group(1).split(", ")) if field(key) else ()  # noqa: E731
        shell = re.search(r"^Shell command: (.*)$", body, re.M)
        resources = field("resources")
        jobs.append(Job(m.group(1), files("input"), files("output"), shell.group(1) if shell else "",
                        resources.group(1) if resources else ""))
    return jobs


def dry_run(cwd: Path, *args: str) -> list[Job]:
    """Jobs that would run, without `all`."""
    r = snakemake(cwd, "-n", "-p", *args)
    assert r.returncode == 0, tail(r)
    if "Nothing to be done" in r.stdout + r.stderr:
        return []
    return [j for j in parse_jobs(r.stdout + r.stderr) if j.rule != "all"]


def rcm_tokens(cmd: str) -> list[str]:
    """A command as `rcm` tokens (Snakemake's `<python> -m rcm` as `rcm`, and a torchrun launch of it,
    on one node or under srun on several, as `rcm`), without `--threads N`, the log redirection and the hiding of GPUs from a job that asked
    for none (`CUDA_VISIBLE_DEVICES=`: DVC runs one stage at a time and counts no GPUs)."""
    tokens = shlex.split(cmd)
    if tokens[0] == "CUDA_VISIBLE_DEVICES=":
        tokens = tokens[1:]
    if "&&" in tokens:  # DVC's prepare checks the config's memory first (Snakemake: while parsing)
        check, tokens = tokens[:tokens.index("&&")], tokens[tokens.index("&&") + 1:]
        assert check == ["rcm", "plan", "--config", "config/config.yaml", "--check"], cmd
    if ">" in tokens:
        tokens = tokens[:tokens.index(">")]
    if tokens[0] == "srun":  # a multi-node stage: srun's flags, then one torchrun agent per node
        tokens = tokens[tokens.index(sys.executable):]
        assert tokens[1:4] == ["-m", "torch.distributed.run", "--nnodes"], cmd
        tokens = [tokens[0], *tokens[tokens.index("rcm") - 1:]]
    if tokens[1:3] == ["-m", "torch.distributed.run"]:
        assert tokens[3:5] == ["--standalone", "--nproc_per_node"] and tokens[6:8] == ["-m", "rcm"], cmd
        tokens = [tokens[0], *tokens[6:]]
    if tokens[1:3] == ["-m", "rcm"]:
        assert tokens[0] == sys.executable, f"a job runs another interpreter: {cmd}"
        tokens = ["rcm", *tokens[3:]]
    if tokens[1:2] == ["--threads"]:
        del tokens[1:3]
    assert tokens[0] == "rcm", cmd
    return tokens


def job_threads(cmd: str) -> int:
    tokens = shlex.split(cmd)
    return int(tokens[tokens.index("--threads") + 1])


def parse_rcm(tokens: list[str]):
    """Parse `rcm ...` exactly as the `rcm` command does (argparse errors end the test)."""
    from rcm.cli import build_parser

    argv = tokens[1:]
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known._module)
    module.add_arguments(parser._subparsers._group_actions[0].choices[known._name])  # noqa: SLF001
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def dvc_stages(cwd: Path) -> list[Stage]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(cwd)) as repo:
        return [Stage(s.addressing, s.cmd,
                      tuple(d.def_path for d in s.deps if not isinstance(d, ParamsDependency)),
                      tuple(o.def_path for o in s.outs))
                for s in repo.index.stages]


def dvc_changed(cwd: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    r = dvc(cwd, "status", "--json")
    return set(json.loads(r.stdout or "{}"))


def glob_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", "[^/]*"))


def load_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def option_fields(section: str) -> dict[str, type]:
    module, cls = SECTIONS[section]
    c = getattr(importlib.import_module(module), cls)
    hints = typing.get_type_hints(c)
    return {f.name: hints[f.name] for f in dataclasses.fields(c)}


def rules_and_outputs(jobs: list[Job]) -> set[tuple[str, str]]:
    return {(j.rule, o) for j in jobs for o in j.outputs}


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("path", CONFIGS)
def test_config_sections_are_the_stage_flags(path):
    """Each section's keys are exactly its stage's option fields: a renamed, added or removed option
    fails here rather than silently falling back to a default."""
    cfg = load_config(REPO / path)
    for section in SECTIONS:
        fields = option_fields(section)
        missing, extra = set(fields) - set(cfg[section]), set(cfg[section]) - set(fields)
        assert not missing and not extra, f"{path} [{section}]: missing {sorted(missing)}, unknown {sorted(extra)}"


def test_schema_sections_are_the_stage_flags():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    json_type = {int: "integer", float: "number", str: "string", bool: "boolean"}
    for section in SECTIONS:
        sub = schema["properties"][section]
        assert sub["additionalProperties"] is False
        fields = option_fields(section)
        assert set(sub["properties"]) == set(fields) == set(sub["required"]), section
        for name, tp in fields.items():
            prop = sub["properties"][name]
            if typing.get_origin(tp) in (list, tuple):
                assert prop["type"] == "array", (section, name)
                assert prop["items"]["type"] == json_type[typing.get_args(tp)[0]], (section, name)
            else:
                assert prop["type"] == json_type[tp], (section, name)


def test_schema_closes_every_object():
    """additionalProperties: false on every object, so a misspelt key anywhere is an error."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, where
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(schema, "schema")
    from rcm.data import DATASETS
    from rcm.paths import METHODS

    assert schema["properties"]["dataset"]["enum"] == list(DATASETS)
    # a method is a built-in or a custom_methods name: the schema checks the spelling, rcm.methods the rest
    method = re.compile(schema["$defs"]["method"]["pattern"])
    assert all(method.fullmatch(m) for m in METHODS)


@pytest.mark.parametrize("path", CONFIGS + ["config/cifar10-cohen.yaml", "config/cifar10-dds.yaml",
                                            "config/imagenet-dds.yaml"])
def test_yaml_1_1_and_1_2_read_the_configs_alike(path):
    """Snakemake reads YAML 1.1 (PyYAML), DVC YAML 1.2 (ruamel): `1e-4` would be a string to one
    and a float to the other, so the two would render different commands."""
    from ruamel.yaml import YAML

    text = (REPO / path).read_text()
    assert yaml.safe_load(text) == YAML(typ="safe", pure=True).load(text)


# ------------------------------------------------------------------------------------------ the DAG

@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A copy of the repository holding the embedded default config, never run."""
    return make_copy(tmp_path_factory.mktemp("fresh") / "repo", config=None)


@pytest.mark.parametrize("config", ["config/config.yaml", ".test/config.yaml"])
def test_snakemake_and_dvc_run_the_same_commands(tmp_path, config):
    """Every Snakemake job has a DVC stage with the same outputs and the same `rcm` command (up to
    --threads and the log), the same code deps, and DVC deps covering the job's inputs."""
    repo = make_copy(tmp_path / "repo", config)
    jobs = dry_run(repo)
    stages = dvc_stages(repo)
    by_out = {frozenset(j.outputs): j for j in jobs}
    stage_by_out = {frozenset(s.outs): s for s in stages}
    assert set(by_out) == set(stage_by_out), (
        f"only Snakemake: {sorted(map(sorted, set(by_out) - set(stage_by_out)))}\n"
        f"only DVC: {sorted(map(sorted, set(stage_by_out) - set(by_out)))}")
    certificates = {o for s in stages for o in s.outs if o.endswith(".tsv") and "/certify/" in o}
    for outs, job in by_out.items():
        stage = stage_by_out[outs]
        ours, theirs = rcm_tokens(job.shell), rcm_tokens(stage.cmd)
        if job.rule == "report":  # DVC cannot list files: it globs the certify/ folder
            files = [t for t in ours if t.endswith(".tsv")]
            (pattern,) = [t for t in theirs if t.endswith(".tsv")]
            assert sorted(files) == sorted(c for c in certificates if glob_regex(pattern).fullmatch(c))
            assert [t for t in ours if t not in files] == [t for t in theirs if t != pattern]
        else:
            assert ours == theirs, f"{job.rule} {sorted(outs)}"
        code = lambda files: {f for f in files if f.startswith("rcm/")}  # noqa: E731
        covered = lambda f, deps: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
        assert all(covered(f, code(stage.deps)) for f in code(job.inputs)), f"code deps of {stage.name}"
        # a DVC stage that trains or imports (one command either way) lists the code of both ways;
        # Snakemake lists the way the config takes. No other stage differs.
        extra = {d for d in code(stage.deps) if not any(covered(f, {d}) for f in code(job.inputs))}
        assert extra <= (TRAIN_OR_IMPORT_CODE if job.rule in MODEL_RULES else set()), (stage.name, extra)
        for f in set(job.inputs) - code(job.inputs):
            assert any(f == d or f.startswith(d.rstrip("/") + "/") for d in stage.deps), (
                f"{stage.name} lacks a dep covering {f}")


def test_dag_shape_of_the_default_config(fresh):
    """prepare -> denoiser -> clean classifier -> fine-tuned denoiser; prepare -> rRCM pretraining ->
    per-sigma fine-tuning; a classifier per sigma; certification per (method, sigma, shard) and per
    (cascade, shard); one report over all of them."""
    from rcm import paths
    from rcm.models.factory import checkpoints

    cfg = load_config(fresh / "config/config.yaml")
    jobs = dry_run(fresh)
    count = lambda rule: sum(j.rule == rule for j in jobs)  # noqa: E731
    n_sig, n_shards = len(cfg["sigmas"]), cfg["certify"]["shards"]
    assert (count("prepare"), count("prepare_train"), count("train_denoiser"), count("finetune_denoiser"),
            count("pretrain_rrcm")) == (1, 1, 1, 1, 1)
    assert count("train_classifier") == n_sig + 1 and count("finetune_rrcm") == n_sig
    assert count("certify") == len(cfg["methods"]) * n_sig * n_shards
    assert count("certify_cascade") == len(cfg["cascades"]) * n_shards
    (report,) = [j for j in jobs if j.rule == "report"]
    certified = [o for j in jobs if j.rule.startswith("certify") for o in j.outputs]
    assert sorted(f for f in report.inputs if f.endswith(".tsv")) == sorted(certified)
    assert {Path(o).name for o in report.outputs} == REPORT_FILES
    # certification inputs are the checkpoints the factory loads (rcm.models.factory.checkpoints)
    for job in jobs:
        if job.rule == "certify":
            method, sigma = Path(job.outputs[0]).parts[-3], Path(job.outputs[0]).parts[-2][len("sigma_"):]
            want = {str(p) for p in checkpoints(method, float(sigma), cfg["results"], cfg["dataset"]).values()}
            assert {f for f in job.inputs if f.endswith(".pt") and "/models/" in f} == want
        if job.rule == "certify_cascade":
            method = Path(job.outputs[0]).parts[-3]
            (cascade,) = [c for c in cfg["cascades"] if c["method"] == method]
            want = {str(p) for s in cascade["flags"]["sigmas"]
                    for p in checkpoints(method, s, cfg["results"], cfg["dataset"]).values()}
            assert {f for f in job.inputs if f.endswith(".pt") and "/models/" in f} == want
    assert str(paths.certificate(cfg["results"], cfg["dataset"], "mdds", "cascade", 0, n_shards)) in certified
    # training reads train and val; only certification reads the test split
    for job in jobs:
        reads_test = any(f.endswith("/test.pt") for f in job.inputs)
        assert reads_test == job.rule.startswith("certify"), job.rule
        if job.rule.startswith(("train_", "finetune_", "pretrain_")):
            assert any(f.endswith("/val.pt") for f in job.inputs), job.rule


@pytest.mark.parametrize("methods, cascades, absent", [
    (["gaussian"], [], {"train_denoiser", "finetune_denoiser", "pretrain_rrcm", "finetune_rrcm",
                        "certify_cascade"}),
    (["dds"], [], {"finetune_denoiser", "pretrain_rrcm", "finetune_rrcm", "certify_cascade"}),
    (["rrcm"], [], {"train_denoiser", "finetune_denoiser", "train_classifier", "certify_cascade"}),
    (["mdds", "rrcm"], None, set()),
])
def test_removing_a_method_removes_its_jobs(fresh, tmp_path, methods, cascades, absent):
    data = {"methods": methods} if cascades is None else {"methods": methods, "cascades": cascades}
    jobs = dry_run(fresh, "--configfile", overlay(tmp_path, "methods", data))
    rules = {j.rule for j in jobs}
    assert not rules & absent
    certified = {Path(o).parts[-3] for j in jobs if j.rule == "certify" for o in j.outputs}
    assert certified == set(methods)
    classifiers = {Path(o).name for j in jobs if j.rule == "train_classifier" for o in j.outputs}
    if "dds" in methods or "mdds" in methods:
        assert "classifier_sigma_0.0.pt" in classifiers  # the clean classifier, for dds/mdds only
    else:
        assert "classifier_sigma_0.0.pt" not in classifiers
    if methods == ["mdds", "rrcm"]:  # gaussian gone: no per-sigma classifiers, the cascade stays
        assert classifiers == {"classifier_sigma_0.0.pt"} and "certify_cascade" in rules


@pytest.mark.parametrize("methods, sequential", [([], ["rrcm"]), (["gaussian"], ["gaussian"])])
def test_sequential_methods_are_certified_beside_or_instead_of_fixed_n(fresh, tmp_path, methods, sequential):
    """`sequential_methods` adds a `sigma_{s}_sequential` certificate per (method, sigma, shard),
    from the same models; with `methods: []` only those are certified, and only their models train."""
    from rcm import paths

    cfg = load_config(fresh / "config/config.yaml")
    data = {"methods": methods, "cascades": [], "sequential_methods": sequential}
    jobs = dry_run(fresh, "--configfile", overlay(tmp_path, "sequential", data))
    shards = cfg["certify"]["shards"]
    seq = {o for j in jobs if j.rule == "certify_sequential" for o in j.outputs}
    assert seq == {str(paths.certificate(cfg["results"], "digits", m, s, k, shards, sequential=True))
                   for m in sequential for s in cfg["sigmas"] for k in range(shards)}
    assert all("_sequential/" in o for o in seq)
    fixed = {o for j in jobs if j.rule == "certify" for o in j.outputs}
    assert {Path(o).parts[-3] for o in fixed} == set(methods)
    (report,) = [j for j in jobs if j.rule == "report"]
    assert {f for f in report.inputs if f.endswith(".tsv")} == seq | fixed
    for job in jobs:
        if job.rule == "certify_sequential":
            tokens = rcm_tokens(job.shell)
            assert "--sequential" in tokens and parse_rcm(tokens).radii == cfg["sequential"]["radii"]
    if not methods:  # rrcm alone: nothing of the denoiser or classifier families runs
        assert {j.rule for j in jobs} == {"prepare", "prepare_train", "pretrain_rrcm", "finetune_rrcm",
                                          "certify_sequential", "report"}


def test_a_sequential_method_certifies_its_cascade_sequentially(fresh, tmp_path):
    """A method of `sequential_methods` with a cascade gets a `sigma_cascade_sequential` certificate
    per shard, from the cascade's flags with --sequential and the `sequential` section; a cascade
    whose method is not sequential gets none. The report reads them."""
    from rcm import paths

    cfg = load_config(fresh / "config/config.yaml")
    mdds = next(c for c in cfg["cascades"] if c["method"] == "mdds")
    data = {"sequential_methods": ["mdds"], "sequential_cascades": [mdds]}
    jobs = dry_run(fresh, "--configfile", overlay(tmp_path, "seq_cascade", data))
    shards = cfg["certify"]["shards"]
    seq = {o for j in jobs if j.rule == "certify_cascade_sequential" for o in j.outputs}
    assert seq == {str(paths.certificate("results", "digits", "mdds", "cascade", k, shards, sequential=True))
                   for k in range(shards)}
    for job in jobs:
        if job.rule == "certify_cascade_sequential":
            args = parse_rcm(rcm_tokens(job.shell))
            assert args.sequential and args.sigma == "cascade" and args.sigmas == mdds["flags"]["sigmas"]
            assert args.radii == cfg["sequential"]["radii"]
    (report,) = [j for j in jobs if j.rule == "report"]
    assert seq <= set(report.inputs)


MINE = {"base_classifier": "examples.custom_method.method:build", "models": {"net": "models/mine_sigma_{sigma}.pt"},
        "train": "{python} -c 'import sys; open(sys.argv[1], \"w\").write(sys.argv[2])' {output} {sigma}",
        "train_gpus": 2}


def test_a_custom_method_trains_certifies_cascades_and_runs_sequentially(tmp_path):
    """A user's method from the config: one job per sigma runs its `train` command ({output}, {sigma}
    filled in); its certificates (fixed n per sigma and shard, its cascade, its sequential ones) read
    those files and its builder's source, carry its --custom_* flags, and join the report."""
    from rcm import methods, paths

    repo = make_copy(tmp_path / "repo")
    cfg = load_config(repo / "config/config.yaml")
    mine_cascade = {"method": "mine", "flags": {"sigmas": [0.5, 0.25], "p0": 0.5}}
    data = {"custom_methods": {"mine": MINE}, "methods": cfg["methods"] + ["mine"],
            "cascades": cfg["cascades"] + [mine_cascade],
            "sequential_methods": ["gaussian", "mine"], "sequential_cascades": [mine_cascade]}
    mine = overlay(tmp_path, "mine", data)
    jobs = dry_run(repo, "--configfile", mine)
    train = sorted((j for j in jobs if j.rule == "train_mine_net"), key=lambda j: j.outputs)
    assert [j.outputs for j in train] == [("models/mine_sigma_0.25.pt",), ("models/mine_sigma_0.5.pt",)]
    assert train[0].shell.startswith(f"({sys.executable} -c 'import sys; open(sys.argv[1], \"w\")")
    # train_gpus: the job asks for them, with the host share per GPU, as a built-in stage's gpus; with
    # none, it sees none
    host = cfg["host"]
    assert {"gpu=2", "nodes=1", f"cpus_per_gpu={host['cpus_per_gpu']}",
            f"mem_mb={2 * host['mem_mb_per_gpu']}"} <= set(train[0].resources.split(", ")), train[0].resources
    no_gpus = overlay(tmp_path, "no_gpus", {**data, "custom_methods": {"mine": {
        k: v for k, v in MINE.items() if k != "train_gpus"}}})
    cpu = next(j for j in dry_run(repo, "--configfile", no_gpus) if j.rule == "train_mine_net")
    assert cpu.shell.startswith(f"(export CUDA_VISIBLE_DEVICES=; {sys.executable} -c ") and "gpu=0" in cpu.resources
    assert train[0].shell.endswith(f" models/mine_sigma_0.25.pt 0.25) > {TINY}/digits/logs/train_mine/net_sigma_0.25.log 2>&1")
    # the job runs the command as written, {output} and {sigma} filled in
    r = snakemake(repo, "--cores", "1", "models/mine_sigma_0.5.pt", "--configfile", mine)
    assert r.returncode == 0, tail(r)
    assert (repo / "models/mine_sigma_0.5.pt").read_text() == "0.5"
    shards = cfg["certify"]["shards"]
    by_rule = lambda rule: [j for j in jobs if j.rule == rule and "/mine/" in j.outputs[0]]  # noqa: E731
    fixed, cascade, sequential, seq_cascade = (by_rule(r) for r in (
        "certify_custom", "certify_custom_cascade", "certify_custom_sequential", "certify_custom_cascade_sequential"))
    assert (len(fixed), len(cascade), len(sequential), len(seq_cascade)) == (2 * shards, shards, 2 * shards, shards)
    assert not [j for j in jobs if j.rule in ("certify", "certify_cascade", "certify_sequential",
                                              "certify_cascade_sequential") and "/mine/" in j.outputs[0]]
    for job in fixed + cascade + sequential + seq_cascade:
        assert "examples/custom_method/method.py" in job.inputs
        want = {"models/mine_sigma_0.25.pt", "models/mine_sigma_0.5.pt"}
        got = {f for f in job.inputs if f.startswith("models/")}
        assert got == want if job in cascade + seq_cascade else len(got) == 1 and got <= want
        args = parse_rcm(rcm_tokens(job.shell))
        assert (args.method, args.custom_base_classifier, args.custom_models) == (
            "mine", MINE["base_classifier"], ["net=models/mine_sigma_{sigma}.pt"])
        assert args.sequential == (job in sequential + seq_cascade)
        assert (args.sigma == "cascade") == (job in cascade + seq_cascade)
        if job in cascade + seq_cascade:
            assert args.sigmas == [0.5, 0.25] and args.p0 == 0.5
    (report,) = [j for j in jobs if j.rule == "report"]
    assert {o for j in fixed + cascade + sequential + seq_cascade for o in j.outputs} <= set(report.inputs)
    assert str(paths.certificate(TINY, "digits", "mine", "cascade", 0, shards)) in report.inputs
    assert str(paths.certificate(TINY, "digits", "mine", "cascade", 0, shards, sequential=True)) in report.inputs
    # DVC: `rcm dvc` writes the train and fixed-n stages, and says which parts only Snakemake runs
    merged = {**cfg, **data}
    from rcm import dvcgen

    with pytest.raises(Exception, match=r"^cascades.1.method: dvc.yaml's certify-cascade stage cannot"):
        dvcgen.stages(merged, [])
    text = dvcgen.stages({**merged, "cascades": cfg["cascades"], "sequential_methods": []}, ["rcm/certify.py"])
    assert "train-mine-net:\n    foreach: ${sigmas}" in text and " models/mine_sigma_${item}.pt ${item}" in text
    methods.unregister("mine")


@pytest.mark.parametrize("methods", [["gaussian"], ["dds"], ["mdds"], ["rrcm"], ["median"], None])
def test_the_model_table_lists_the_training_jobs_snakemake_schedules(tmp_path, methods):
    """rcm.stages (what rcm plan and the config checks read) derives, from the methods' files alone, the
    same training jobs as Snakemake's DAG built from the rules' inputs: for each method on its own (the
    example's median filter reads the clean classifier only) and for the whole tiny config."""
    from rcm import stages

    repo = make_copy(tmp_path / "repo")
    cfg = load_config(repo / "config/config.yaml")
    if methods is not None:
        cfg.update(methods=methods, cascades=[], sequential_methods=[], sequential_cascades=[])
    path = overlay(tmp_path, "only", {k: cfg[k] for k in ("methods", "cascades", "sequential_methods",
                                                          "sequential_cascades")})
    rules = {s.rule for s in stages.STAGES} | {s.import_rule for s in stages.STAGES}
    scheduled = {(j.rule, j.outputs[0]) for j in dry_run(repo, "--configfile", path) if j.rule in rules}
    assert scheduled == {(job.rule, str(job.path)) for job in stages.needed(cfg)}
    assert scheduled  # every method here reads a model that a stage trains


def test_a_custom_methods_sequential_cascade_runs(tmp_path):
    """The example method's cascade, certified sequentially by Snakemake for real: the job trains the
    clean classifier it reads, passes the method's --custom_* flags, and writes a sequential cascade
    certificate (stages, draws per image, the targets) under the method's own folder."""
    from rcm import paths
    from rcm.certificate import read_certificate
    from rcm.importers import sha256

    repo = make_copy(tmp_path / "repo")
    cfg = load_config(repo / "config/config.yaml")
    median = {"method": "median", "flags": {"sigmas": [0.5, 0.25], "p0": 0.5}}
    mine = overlay(tmp_path, "median", {"cascades": cfg["cascades"] + [median],
                                        "sequential_methods": cfg["sequential_methods"] + ["median"],
                                        "sequential_cascades": cfg["sequential_cascades"] + [median]})
    shards = cfg["certify"]["shards"]
    target = str(paths.certificate(TINY, "digits", "median", "cascade", 0, shards, sequential=True))
    r = snakemake(repo, "--cores", "2", target, "--configfile", mine)
    assert r.returncode == 0, tail(r)
    rows = read_certificate(repo / target)
    n0, n = cfg["certify"]["n0"], cfg["certify"]["n"]
    assert len(rows) > 0 and (rows["sequential"] == 1).all()
    assert set(rows["stage"]) <= {0, 1, 2} and (rows["samples"] <= 2 * (n0 + n)).all()
    # the user's method's file, read through its own template (the clean classifier, made by train_classifier)
    assert set(rows["models"]) == {f"classifier={TINY}/digits/models/classifier_sigma_0.0.pt@"
                                   + sha256(repo / TINY / "digits/models/classifier_sigma_0.0.pt")}
    assert not (repo / str(paths.certificate(TINY, "digits", "mdds", "cascade", 0, shards, sequential=True))).exists()


def test_dvc_yaml_is_what_rcm_dvc_writes_for_the_default_config(tmp_path):
    """dvc.yaml as committed is `rcm dvc`'s output for config/config.yaml (no custom methods: the
    hand-written stages alone); the tiny config's own method adds its stages after the marker, and
    writing again, or for the default config, gives back the same files."""
    from rcm import dvcgen

    committed = (REPO / "dvc.yaml").read_text()
    assert dvcgen.render(committed, load_config(REPO / "config/config.yaml")) == committed
    tiny = dvcgen.render(committed, load_config(REPO / ".test/config.yaml"))
    assert tiny.startswith(committed) and dvcgen.MARKER in tiny and "  certify-median:" in tiny
    assert dvcgen.render(tiny, load_config(REPO / ".test/config.yaml")) == tiny
    assert dvcgen.render(tiny, load_config(REPO / "config/config.yaml")) == committed
    repo = make_copy(tmp_path / "repo", config=None)
    r = subprocess.run([sys.executable, "-m", "rcm", "dvc", "--check"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.copy2(REPO / ".test/config.yaml", repo / "config/config.yaml")
    r = subprocess.run([sys.executable, "-m", "rcm", "dvc", "--check"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1 and "run `rcm dvc`" in r.stderr


@pytest.mark.parametrize("config", CONFIGS)
def test_every_command_parses_with_the_stage_flags(tmp_path, config):
    """Each job's command parses with `rcm`'s own parser, and every flag comes back as the config
    value: the renderer, the YAML and the stage options agree."""
    repo = make_copy(tmp_path / "repo", config)
    cfg = load_config(repo / "config/config.yaml")
    args = []
    if cfg["dataset"] == "imagenet":  # its data root must exist before anything runs
        root = tmp_path / "imagenet"
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        args = ["--configfile", overlay(tmp_path, "root", {"data": {"root": str(root)}})]
        cfg["data"]["root"] = str(root)
    jobs = dry_run(repo, *args)
    assert jobs
    for job in jobs:
        tokens = rcm_tokens(job.shell)
        parsed = vars(parse_rcm(tokens))
        sections = COMMAND_SECTIONS[tokens[1]] + (["sequential"] if parsed.get("sequential") else [])
        for section in sections:
            for key, value in cfg[section].items():
                assert parsed[key] == value, f"{tokens[1]} --{key}: {parsed[key]!r} != config {value!r}"
        if "--sigma" in tokens and parsed["sigma"] == "cascade":
            (cascade,) = [c for c in cfg["cascades"] if c["method"] == parsed["method"]]
            assert parsed["sigmas"] == cascade["flags"]["sigmas"] and parsed["p0"] == cascade["flags"]["p0"]


def test_each_job_gets_its_thread_count(fresh):
    """`rcm --threads N` carries each job's own thread count: one by default (small CPU models run
    best as parallel one-thread jobs), what a profile's set-threads asks, capped by --cores."""
    threads = {}
    for cores in ("2", "8"):
        for job in dry_run(fresh, "--cores", cores, "--set-threads", "train_denoiser=4", "certify=3"):
            threads.setdefault((cores, job.rule), set()).add(job_threads(job.shell))
    assert threads[("8", "train_denoiser")] == {4} and threads[("8", "certify")] == {3}
    assert threads[("2", "train_denoiser")] == {2} and threads[("2", "certify")] == {2}
    assert {n for (_, rule), ns in threads.items() if rule not in ("train_denoiser", "certify") for n in ns} == {1}


def test_lint(fresh):
    r = snakemake(fresh, "--lint")
    lints = re.findall(r"^\s+\* (.*)$", r.stdout + r.stderr, re.M)
    unexpected = [line for line in lints if not line.startswith(ACCEPTED_LINTS)]
    assert not unexpected, tail(r)


def test_bare_snakemake_applies_the_default_profile(fresh):
    """No --workflow-profile: Snakemake finds profiles/default beside the Snakefile, whose
    printshellcmds shows each job's command even in a dry run without -p."""
    r = snakemake(fresh, "-n")
    assert r.returncode == 0, tail(r)
    assert "Using workflow specific profile profiles/default" in r.stdout + r.stderr
    assert re.search(r"^Shell command: \S+ -m rcm --threads 1 prepare", r.stdout + r.stderr, re.M), tail(r)


def test_config_overrides_are_read_as_the_schema_types(fresh):
    """`--config` hands nested values over as strings ('100', ['0.25']); the workflow reads them as
    the schema types them, so the commands carry the numbers."""
    jobs = dry_run(fresh, "--config", 'certify={"n": 100, "alpha": 0.01}', "sigmas=[0.25, 1.0]",
                   "cascades=[]", 'classifier={"hflip": true}')
    certify = [vars(parse_rcm(rcm_tokens(j.shell))) for j in jobs if j.rule == "certify"]
    assert certify and all(a["n"] == 100 and a["alpha"] == 0.01 for a in certify)
    assert {a["sigma"] for a in certify} == {"0.25", "1.0"}
    classifier = [vars(parse_rcm(rcm_tokens(j.shell))) for j in jobs if j.rule == "train_classifier"]
    assert classifier and all(a["hflip"] is True for a in classifier)
    r = snakemake(fresh, "-n", "--config", 'certify={"n": "many"}')
    assert r.returncode != 0 and "certify.n: 'many' is not of type 'integer'" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ bad configs

def _custom(builder: str = "build", net: str = "models/mine_sigma_{sigma}.pt", name: str = "mine", **extra) -> dict:
    """A config overlay defining one user's method with the example's module (the bad-config cases)."""
    return {"custom_methods": {name: {"base_classifier": f"examples.custom_method.method:{builder}",
                                      "models": {"net": net}, **extra}}}


BAD_CONFIGS = {
    "unknown key in a section": ({"certify": {"nn": 5}}, "certify.nn: unknown key"),
    "unknown top-level key": ({"sigma": [0.25]}, "sigma: unknown key"),
    "wrong type": ({"certify": {"n": "many"}}, "certify.n: 'many' is not of type 'integer'"),
    "wrong type of a flag": ({"classifier": {"hflip": "yes"}}, "classifier.hflip"),
    "out of range": ({"certify": {"alpha": 1.5}}, "certify.alpha"),
    "sigma written as an integer": ({"sigmas": [0.25, 1]}, "sigmas.1: write the noise level 1 as a float"),
    "shard ids that do not count the shards": ({"shard_ids": [0]}, "shard_ids: must list 0 .. certify.shards - 1"),
    "cascade over an unknown sigma": ({"cascades": [{"method": "mdds", "flags": {"sigmas": [2.0], "p0": 0.5}}]},
                                      "cascades.0.flags.sigmas"),
    "cascade of a method not run": ({"methods": ["gaussian"]}, "cascades.0.method: 'mdds' is not in methods"),
    "sequential cascades that are not those of sequential_methods": (
        {"sequential_methods": ["gaussian"]}, "sequential_cascades: must be the cascades of sequential_methods"),
    "nothing to certify": ({"methods": [], "cascades": [], "sequential_methods": []},
                           "methods: empty, and so is sequential_methods"),
    "negative sequential radius": ({"sequential": {"radii": [-0.5]}}, "sequential.radii.0"),
    "unknown sequential method": ({"sequential_methods": ["cohen"]}, "sequential_methods.0"),
    "missing CIFAR-10 root": ({"dataset": "cifar10", "data": {"root": "no/such/dir"}}, "data.root"),
    "missing ImageNet root": ({"dataset": "imagenet", "data": {"root": "no/such/dir"}}, "data.root"),
    "missing pretrained denoiser": ({"denoiser": {"pretrained": "no/such/ddpm"}}, "denoiser.pretrained"),
    "missing baseline log": ({"report": {"baselines": ["cohen=no/such/sigma_0.25"]}},
                             "report.baselines.0: 'no/such/sigma_0.25' is not a file"),
    # a user's method (custom_methods): each problem one line naming the key, before any job
    "custom method of an unknown module": (
        {"custom_methods": {"mine": {"base_classifier": "no_such_pkg.smoothing:build",
                                     "models": {"net": "models/mine_sigma_{sigma}.pt"}}}},
        "custom_methods.mine.base_classifier: cannot import module 'no_such_pkg.smoothing'"),
    "custom method of an unknown attribute": (
        _custom("nope"),
        "custom_methods.mine.base_classifier: module 'examples.custom_method.method' has no attribute 'nope'"),
    "custom builder of the wrong signature": (
        _custom("kernel_size"),
        "custom_methods.mine.base_classifier: kernel_size(sigma: 'float') -> 'int' must take (sigma, models, device)"),
    "per-sigma custom model without {sigma}": (
        _custom(net="models/mine.pt"),
        "custom_methods.mine.models.net: 'models/mine.pt' has no {sigma}"),
    "custom method named as a built-in": (
        _custom(net="models/dds_sigma_{sigma}.pt", name="dds"),
        "custom_methods.dds: 'dds' is a built-in method's name"),
    "custom train command without {output}": (
        _custom(train="python -m mypkg.train --sigma {sigma}"),
        "custom_methods.mine.train: 'python -m mypkg.train --sigma {sigma}' has no {output}"),
    "custom train command for a file a rule makes": (
        _custom(net="{results}/{dataset}/models/classifier_sigma_{sigma}.pt", train="{python} -m mypkg {output}"),
        "custom_methods.mine.train: '{results}/{dataset}/models/classifier_sigma_{sigma}.pt' is a file the "
        "workflow's rule train_classifier makes"),
    "a built-in's file with a sigma rcm does not write": (
        _custom(net="{results}/{dataset}/models/classifier_sigma_0.50.pt", sigma_conditioned=True),
        "custom_methods.mine.models.net: '{results}/{dataset}/models/classifier_sigma_0.50.pt' names "
        "train_classifier's file with sigma 0.50; rcm writes it 0.5"),
    "custom train GPUs without a train command": (_custom(train_gpus=1),
                                                 "custom_methods.mine.train_gpus: 1, but 'mine' has no train command"),
    "a batch size naming no method": ({"certify": {"batch_sizes": ["my_net2=10"]}},
                                      "certify.batch_sizes.0: 'my_net2=10' names no method"),
    "a batch size of zero": ({"certify": {"batch_sizes": ["dds=0"]}}, "certify.batch_sizes.0: 'dds=0' does not match"),
    "a method nobody defined": ({"methods": ["gaussian", "dds", "mdds", "mine"]},
                                "methods.3: 'mine' is no method"),
    "a batch size of no method": ({"certify": {"batch_sizes": ["ddpm=10"]}},
                                  "certify.batch_sizes.0: 'ddpm=10' names no method (known: gaussian, dds, mdds, rrcm, median)"),
}


def test_bad_configs_fail_before_any_job_naming_the_key(tmp_path):
    """A real run (not a dry run) with each bad config stops while the workflow is parsed: the error
    names the key, and no job has written anything."""
    repo = make_copy(tmp_path / "repo")

    def attempt(item):
        name, (data, message) = item
        r = snakemake(repo, "--cores", "1", "--configfile", overlay(tmp_path, re.sub(r"\W", "_", name), data))
        return name, message, r

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, BAD_CONFIGS.items()))
    failures = [f"{name}: rc={r.returncode}, expected '{message}' in:\n{tail(r, 800)}"
                for name, message, r in results
                if r.returncode == 0 or message not in r.stdout + r.stderr
                or "invalid config" not in r.stdout + r.stderr]
    assert not failures, "\n\n".join(failures)
    assert not (repo / TINY).exists()


def test_cifar10_root_must_hold_the_batches_folder(tmp_path):
    """Parse time: data.root holds cifar-10-batches-py/, and a root that is that folder itself is named
    as such; the control, its parent, parses."""
    from test_data import _write_cifar

    repo = make_copy(tmp_path / "repo")
    _write_cifar(repo / "cifar")
    (repo / "elsewhere").mkdir()
    cases = {"cifar": None,
             "cifar/cifar-10-batches-py": "data.root points at the cifar-10-batches-py folder itself; "
                                          "set it to its parent ('cifar')",
             "elsewhere": "data.root: 'elsewhere' holds no cifar-10-batches-py/ (it must hold "
                          "cifar-10-batches-py/ with data_batch_1"}

    def attempt(root):
        config = overlay(tmp_path, re.sub(r"\W", "_", root), {"dataset": "cifar10", "data": {"root": root, "unverified": True}})
        return snakemake(repo, "-n", "--configfile", config)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(attempt, cases)))
    assert results["cifar"].returncode == 0, tail(results["cifar"])
    for root, message in cases.items():
        if message:
            r = results[root]
            out = r.stdout + r.stderr
            assert r.returncode != 0 and "invalid config" in out and message in out, tail(r)


def test_a_config_tag_that_would_build_a_python_object_is_refused(tmp_path):
    """Snakemake reads a config file with PyYAML's FullLoader, which has no constructor for
    python/object/apply: the workflow stops before parsing, the command never ran. (The control, that
    the tag is live under yaml.unsafe_load, is tests/test_presets.py's.)"""
    repo, marker = make_copy(tmp_path / "repo"), tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"methods: !!python/object/apply:os.system ['touch {marker}']\n")
    r = snakemake(repo, "-n", "--configfile", str(evil))
    assert r.returncode != 0 and "not valid JSON or YAML" in r.stdout + r.stderr, tail(r)
    assert not marker.exists()


@pytest.mark.parametrize("unverified", [True, False])
def test_the_prepare_job_refuses_a_crafted_cifar_batch(tmp_path, unverified):
    """The workflow's prepare job on a CIFAR-10 copy whose test_batch runs a command when unpickled
    (tests/test_data.py shows that it does): the job fails with one line in its log, naming the file
    and the global (or, with MD5s checked, the files that are not the official ones); the command
    never ran and no file is written under results/."""
    from test_data import write_crafted_cifar

    repo, marker = make_copy(tmp_path / "repo"), tmp_path / "ran"
    write_crafted_cifar(repo / "cifar", marker)
    config = overlay(tmp_path, "crafted", {"dataset": "cifar10", "data": {"root": "cifar", "unverified": unverified}})
    r = snakemake(repo, f"{TINY}/cifar10/data/test.pt", "--cores", "1", "--configfile", config)
    assert r.returncode != 0, tail(r)
    lines = (repo / TINY / "cifar10/logs/prepare.log").read_text().strip().splitlines()
    expected = ("cifar/cifar-10-batches-py/test_batch refused before any of it ran: it needs the Python global "
                "posix.system" if unverified else "are not the official files (their MD5 differs)")
    assert len(lines) == 1 and lines[0].startswith("rcm prepare: error: ") and expected in lines[0], lines
    assert not marker.exists()
    assert not [p for p in (repo / TINY).rglob("*") if p.is_file() and "logs" not in p.parts]  # its log aside


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real run of .test/config.yaml with `--cores 2`, then `dvc commit` of everything it made.

    CI makes that run once: `.ci/run` runs `make run CONFIG=.test/config.yaml` (the README's command)
    in its checkout first and sets RCM_TINY_RUN to that checkout. Its outputs, logs and Snakemake
    records are then copied here, mtimes kept, as long as Snakemake confirms that this copy of the
    workflow has nothing left to do with them; otherwise the run is made here from scratch."""
    repo = make_copy(tmp_path_factory.mktemp("tiny") / "repo")
    reused = _reuse_tiny_run(Path(os.environ["RCM_TINY_RUN"]), repo) if os.environ.get("RCM_TINY_RUN") else None
    if reused is None:
        start = time.perf_counter()
        r = snakemake(repo, "--cores", "2")
        wall = time.perf_counter() - start
        assert r.returncode == 0, tail(r, 6000)
        reused = SimpleNamespace(path=repo, wall=wall, log=r.stdout + r.stderr)
    dvc(repo, "commit", "-f", "-q")
    return reused


def _logged_wall(log: str) -> float:
    """Seconds from the first to the last timestamp of a Snakemake log ('[Thu Dec  3 16:27:31 2026]')."""
    import datetime

    stamps = [datetime.datetime.strptime(" ".join(m.split()), "%a %b %d %H:%M:%S %Y")
              for m in re.findall(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", log, re.M)]
    return (stamps[-1] - stamps[0]).total_seconds() if stamps else float("nan")


def _reuse_tiny_run(source: Path, repo: Path) -> SimpleNamespace | None:
    """The finished tiny run in ``source`` copied into ``repo``, or None (and ``repo`` as it was).

    Only a run made in this very checkout is taken: Snakemake's check below sees the rules' inputs, not
    the shared code it does not list (rcm.cli, the training loop...), which another checkout may hold
    in another version. The log is the newest one that ran jobs (a later run with nothing to do writes
    an empty one)."""
    copied = [TINY, ".snakemake/metadata", ".snakemake/log"]
    if source.resolve() != REPO.resolve():
        print(f"RCM_TINY_RUN={source} is not this checkout ({REPO}); running the tiny DAG here", file=sys.stderr)
        return None
    logs = sorted((p for p in (source / ".snakemake/log").glob("*.snakemake.log")
                   if "Finished jobid" in p.read_text(errors="replace")), key=lambda p: p.stat().st_mtime)
    if not logs or not all((source / item).exists() for item in copied):
        return None
    for item in copied:
        shutil.copytree(source / item, repo / item, symlinks=True)
    r = snakemake(repo, "-n")
    if r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr:
        log = logs[-1].read_text()
        return SimpleNamespace(path=repo, wall=_logged_wall(log), log=log)
    print(f"RCM_TINY_RUN={source}: this workflow would still run jobs there; running the tiny DAG here",
          file=sys.stderr)
    for item in (TINY, ".snakemake"):
        shutil.rmtree(repo / item, ignore_errors=True)
    return None


@pytest.mark.slow
def test_tiny_run_makes_every_output(tiny_run):
    repo = tiny_run.path
    cfg = load_config(repo / "config/config.yaml")
    report = repo / TINY / cfg["dataset"] / "report"
    assert {p.name for p in report.iterdir() if not p.name.startswith(".")} == REPORT_FILES  # DVC adds .gitignore
    sources = (report / "sources.txt").read_text()
    shards = sorted((repo / TINY / cfg["dataset"] / "certify").rglob("shard_*.tsv"))
    per_shard = ((len(cfg["methods"]) + len(cfg["sequential_methods"])) * len(cfg["sigmas"]) + len(cfg["cascades"])
                 + len(cfg["sequential_cascades"]))
    assert len(shards) == per_shard * cfg["certify"]["shards"]
    assert all(str(p.relative_to(repo)) in sources for p in shards)
    metrics = json.loads((report / "metrics.json").read_text())
    assert {f"{c['method']}_cascade_sequential" for c in cfg["sequential_cascades"]} <= set(metrics)
    # one benchmark table per job; the totals per rule go into docs/workflow.md
    per_rule = {}
    for table in sorted((repo / TINY / "digits/benchmarks").glob("*.tsv")):
        rows = table.read_text().splitlines()
        rule = table.name.split(".")[0]
        per_rule.setdefault(rule, []).append(float(rows[1].split("\t")[0]))
    assert sum(map(len, per_rule.values())) == len(parse_jobs(tiny_run.log)) - 1  # all but `all`
    print(f"\ntiny DAG: {tiny_run.wall:.1f} s wall with --cores 2\n| rule | jobs | mean s | max s | total s |")
    for rule, secs in per_rule.items():
        print(f"| {rule} | {len(secs)} | {sum(secs) / len(secs):.1f} | {max(secs):.1f} | {sum(secs):.1f} |")


@pytest.mark.slow
def test_tiny_run_ran_jobs_in_parallel(tiny_run):
    """With --cores 2, independent one-thread jobs (prepare, certification shards) overlap."""
    running, most = set(), 0
    for m in re.finditer(r"^\s+jobid: (\d+)$|^Finished jobid: (\d+)", tiny_run.log, re.M):
        if m.group(1):
            running.add(m.group(1))
        else:
            running.discard(m.group(2))
        most = max(most, len(running))
    assert most >= 2


@pytest.mark.slow
def test_nothing_changed_nothing_reruns(tiny_run):
    start = time.perf_counter()
    assert dry_run(tiny_run.path) == []
    print(f"\nno-op dry run: {time.perf_counter() - start:.1f} s")
    assert dvc_changed(tiny_run.path) == set()  # `dvc commit` after Snakemake: DVC agrees it is all done


def _edit_config(repo: Path, change) -> str:
    """Edit config/config.yaml in place (DVC reads only that file); returns the original text."""
    path = repo / "config/config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    change(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return original


@pytest.mark.slow
def test_changed_radii_rerun_only_the_report(tiny_run, tmp_path):
    repo = clone(tiny_run.path, tmp_path / "repo")
    _edit_config(repo, lambda c: c["report"].update(radii=[0.0, 0.5]))
    assert {j.rule for j in dry_run(repo)} == {"report"}
    assert dvc_changed(repo) == {"report"}
    # and DVC really reruns just that
    r = dvc(repo, "repro")
    assert re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr) == ["report"]
    table = (repo / f"{TINY}/digits/report/certified_accuracy.csv").read_text()
    assert {float(x.split(",")[4]) for x in table.splitlines()[1:]} == {0.0, 0.5}


@pytest.mark.slow
def test_added_sigma_runs_only_its_jobs(tiny_run, tmp_path):
    repo = clone(tiny_run.path, tmp_path / "repo")
    _edit_config(repo, lambda c: c.update(sigmas=c["sigmas"] + [1.0]))
    jobs = dry_run(repo)
    assert {j.rule for j in jobs} == {"train_classifier", "finetune_rrcm", "certify", "certify_custom",
                                      "certify_sequential", "report"}
    new = [o for j in jobs if j.rule != "report" for o in j.outputs]
    assert all("sigma_1.0" in o for o in new), new
    # four methods and the example's median, and sequential gaussian and mdds, two shards (the
    # cascade's scales are unchanged)
    assert len([o for o in new if "/certify/" in o]) == (5 + 2) * 2
    changed = dvc_changed(repo)
    assert changed == {"train-classifier@1.0", "finetune-rrcm@1.0"} | {
        f"certify-{m}@1.0-{k}" for m in ("gaussian", "dds", "mdds", "rrcm", "median") for k in (0, 1)} | {
        f"certify-sequential@{m}-1.0-{k}" for m in ("gaussian", "mdds") for k in (0, 1)}


@pytest.mark.slow
def test_a_users_method_reruns_for_what_its_certificates_depend_on(tiny_run, tmp_path):
    """Dropping the example's `preset` (read by rcm plan alone) reruns nothing in either tool; sharing
    another method's noise streams reruns exactly that method's certification in both."""
    repo = clone(tiny_run.path, tmp_path / "repo")
    _edit_config(repo, lambda c: c["custom_methods"]["median"].pop("preset"))
    r = subprocess.run([sys.executable, "-m", "rcm", "dvc", "--check"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr      # dvc.yaml's stages of median do not name it
    assert dry_run(repo) == [] and dvc_changed(repo) == set()
    _edit_config(repo, lambda c: c["custom_methods"]["median"].update(noise="gaussian"))
    assert {j.rule for j in dry_run(repo)} == {"certify_custom", "report"}
    assert dvc_changed(repo) == {f"certify-median@{s}-{k}" for s in ("0.25", "0.5") for k in (0, 1)}


@pytest.mark.slow
def test_changed_certify_n_reruns_certification_not_training(tiny_run, tmp_path):
    repo = clone(tiny_run.path, tmp_path / "repo")
    _edit_config(repo, lambda c: c["certify"].update(n=60))
    jobs = dry_run(repo)
    assert {j.rule for j in jobs} == {"certify", "certify_custom", "certify_cascade", "certify_sequential",
                                      "certify_cascade_sequential", "report"}
    assert len(jobs) == 16 + 4 + 2 + 8 + 2 + 1
    changed = dvc_changed(repo)
    assert changed and all(name.startswith("certify-") for name in changed) and len(changed) == 28 + 4


@pytest.mark.slow
@pytest.mark.parametrize("module, rules, certified, stages", [
    ("rcm/train/rrcm_finetune.py", {"finetune_rrcm", "certify", "report"}, {"rrcm"},
     {"finetune-rrcm@0.25", "finetune-rrcm@0.5"}),
    ("rcm/train/mdds.py", {"finetune_denoiser", "certify", "certify_cascade", "certify_sequential",
                           "certify_cascade_sequential", "report"}, {"mdds"},
     {"finetune-denoiser"}),
    ("rcm/report/tables.py", {"report"}, set(), {"report"}),
])
def test_changed_code_reruns_its_stage_and_dependents(tiny_run, tmp_path, module, rules, certified, stages):
    """Editing a stage's module reruns it and what depends on it, nothing else. Snakemake compares
    the checksum of a newer input, so the test edits the file: a bare `touch` reruns nothing (nor
    does it with DVC, which hashes)."""
    repo = clone(tiny_run.path, tmp_path / "repo")
    with open(repo / module, "a") as f:
        f.write("\n# edited\n")
    jobs = dry_run(repo)
    assert {j.rule for j in jobs} == rules
    assert {Path(o).parts[-3] for j in jobs if j.rule.startswith("certify") for o in j.outputs} == certified
    assert dvc_changed(repo) == stages


def _start(repo: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=repo, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the workflow ended before it could be killed"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to Snakemake and its jobs at once: a node failure, not a polite shutdown."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_checkpoint(tiny_run, tmp_path):
    """Kill everything while a classifier trains; the rerun resumes from `<out>.resume` (which is not
    a declared output, so Snakemake leaves it) and ends with the checkpoint of an uninterrupted run."""
    import torch

    repo = make_copy(tmp_path / "repo")
    shutil.copytree(tiny_run.path / f"{TINY}/digits/data", repo / f"{TINY}/digits/data")
    longer = overlay(tmp_path, "longer", {"classifier": {"steps": 400, "checkpoint_every": 40, "eval_every": 400}})
    target = f"{TINY}/digits/models/classifier_sigma_0.25.pt"
    out, resume = repo / target, repo / (target + ".resume")
    proc = _start(repo, target, "--cores", "1", "--configfile", longer)
    _wait_for(resume.exists, proc)
    _kill(proc)
    assert resume.exists() and not out.exists()

    assert snakemake(repo, "--unlock").returncode == 0  # a killed run leaves its lock
    r = snakemake(repo, target, "--cores", "1", "--configfile", longer)
    assert r.returncode == 0, tail(r)
    log = (repo / TINY / "digits/logs/train_classifier/sigma_0.25.log").read_text()
    assert re.search(r"resuming from .*\.resume at step [1-9]", log), log[-2000:]
    assert out.exists() and not resume.exists()

    # the same command, uninterrupted, into another results root
    (job,) = parse_jobs(r.stdout + r.stderr)
    tokens = shlex.split(job.shell)
    tokens = tokens[:tokens.index(">")]
    tokens[tokens.index("--results") + 1] = str(tmp_path / "reference")
    shutil.copytree(repo / f"{TINY}/digits/data", tmp_path / "reference/digits/data")
    subprocess.run(tokens, cwd=repo, env=run_env(), check=True, capture_output=True)
    resumed = torch.load(out, weights_only=False)
    reference = torch.load(tmp_path / "reference/digits/models/classifier_sigma_0.25.pt", weights_only=False)
    assert resumed["step"] == reference["step"] == 400
    for key in reference["model"]:
        assert torch.equal(resumed["model"][key], reference["model"][key]), key


@pytest.mark.slow
def test_killed_certification_keeps_finished_shards(tiny_run, tmp_path):
    """Kill everything while the second of two shards runs: the finished shard stays as it is, the
    interrupted one has left no file that could pass for a certificate, and only it reruns."""
    from rcm.certificate import read_certificate

    repo = make_copy(tmp_path / "repo")
    for part in ("data", "models"):
        shutil.copytree(tiny_run.path / f"{TINY}/digits" / part, repo / f"{TINY}/digits" / part)
    # one image per shard, drawn long enough to be killed while it is being certified
    slower = overlay(tmp_path, "slower", {"certify": {"n": 40000, "batch_size": 4000, "max_images": 2}})
    shards = [repo / f"{TINY}/digits/certify/dds/sigma_0.25/shard_{k}-of-2.tsv" for k in (0, 1)]
    logs = [repo / TINY / f"digits/logs/certify/dds/sigma_0.25/shard_{k}.log" for k in (0, 1)]
    targets = [str(p.relative_to(repo)) for p in shards]
    proc = _start(repo, *targets, "--cores", "1", "--configfile", slower)

    def second_shard_certifying():  # its progress bar is up: models loaded, noise being drawn
        if not any(p.exists() for p in shards):
            return False
        return any(not s.exists() and lg.exists() and "certify dds" in lg.read_text()
                   for s, lg in zip(shards, logs))

    _wait_for(second_shard_certifying, proc)
    _kill(proc)
    done = [p for p in shards if p.exists()]
    assert len(done) == 1, "exactly one shard should have finished"
    (finished,) = done
    (interrupted,) = set(shards) - {finished}
    assert len(read_certificate(finished)) == 1
    leftovers = [p.name for p in interrupted.parent.iterdir() if interrupted.name in p.name]
    # hidden files only: a temporary write, or the partial file a rerun resumes from (rcm.partial)
    assert all(name.startswith(".") and name.endswith((".tmp", ".partial")) for name in leftovers), leftovers
    mtime = finished.stat().st_mtime_ns

    assert snakemake(repo, "--unlock").returncode == 0
    jobs = dry_run(repo, *targets, "--configfile", slower)
    assert [j.outputs for j in jobs] == [(str(interrupted.relative_to(repo)),)]
    r = snakemake(repo, *targets, "--cores", "1", "--configfile", slower)
    assert r.returncode == 0, tail(r)
    assert len(read_certificate(interrupted)) == 1
    assert finished.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------ overrides, plots, reports, sharing

@pytest.mark.slow
def test_config_overrides_rerun_only_what_depends_on_them(tiny_run):
    """`--config` is how a user reruns one setting: n changes certification and the report only; a
    smaller sigma grid (and no cascade) leaves only the report to redo, over fewer certificates."""
    jobs = dry_run(tiny_run.path, "--config", 'certify={"n": 100}')
    assert {j.rule for j in jobs} == {"certify", "certify_custom", "certify_cascade", "certify_sequential",
                                      "certify_cascade_sequential", "report"}
    assert len(jobs) == 16 + 4 + 2 + 8 + 2 + 1
    assert all(vars(parse_rcm(rcm_tokens(j.shell)))["n"] == 100 for j in jobs if j.rule.startswith("certify"))
    jobs = dry_run(tiny_run.path, "--config", "sigmas=[0.25]", "cascades=[]", "sequential_cascades=[]")
    assert [j.rule for j in jobs] == ["report"]
    certificates = [f for f in jobs[0].inputs if f.endswith(".tsv")]
    assert len(certificates) == (5 + 2) * 2 and all("/sigma_0.25" in f for f in certificates)
    # a data key reprepares only the part that reads it: the test split's `skip` retrains nothing...
    jobs = dry_run(tiny_run.path, "--config", 'data={"skip": 2}')
    assert {j.rule for j in jobs} == {"prepare", "certify", "certify_custom", "certify_cascade",
                                      "certify_sequential", "certify_cascade_sequential", "report"}
    # ...and the training splits' `val_fraction` trains again, on the same test split
    rules = {j.rule for j in dry_run(tiny_run.path, "--config", 'data={"val_fraction": 0.2}')}
    assert "prepare_train" in rules and "train_classifier" in rules and "prepare" not in rules


@pytest.mark.slow
def test_dvc_plots_draw_a_curve_per_entry(tiny_run):
    """`dvc plots show` draws one series per report entry (colour = name), not one curve in all."""
    plots = json.loads(dvc(tiny_run.path, "plots", "show", "--json").stdout)["data"]
    (plot,) = plots[f"{TINY}/digits/report/plot_certified_accuracy.csv"]
    content = plot["content"]
    assert content["encoding"]["color"]["field"] == "name"
    series = {row["name"] for row in content["data"]["values"]}
    tidy = pd.read_csv(tiny_run.path / f"{TINY}/digits/report/certified_accuracy.csv")
    assert series == set(tidy[tidy.kind != "envelope"].name)
    # four methods and the example's median, sequential gaussian and mdds at two sigmas, the mdds
    # cascade fixed-n and sequential
    assert len(series) == (5 + 2) * 2 + 2
    assert {"gaussian_sigma_0.25_sequential", "gaussian_sigma_0.5_sequential", "mdds_cascade_sequential"} <= series


@pytest.mark.slow
def test_snakemake_html_report_holds_the_plot_and_tables_with_captions(tiny_run, tmp_path):
    repo = clone(tiny_run.path, tmp_path / "repo")
    r = snakemake(repo, "--report", "report.html")
    assert r.returncode == 0, tail(r)
    html = (repo / "report.html").read_text()
    png = (repo / f"{TINY}/digits/report/certified_accuracy.png").read_bytes()
    assert base64.b64encode(png).decode() in html  # the figure itself, embedded
    for caption in ("Certified accuracy against the L2 radius", "Certified accuracy, one row per",
                    "Cost of certification per entry", "Every certificate file the report read"):
        assert caption in html, caption
    assert "<script src=" not in html  # self-contained: nothing fetched when it is opened


@pytest.mark.slow
def test_configured_baselines_join_the_report(tiny_run, tmp_path):
    """`report.baselines` draws published logs (Cohen et al.'s, as published: no extension) beside
    the methods; adding one reruns the report and nothing else."""
    repo = clone(tiny_run.path, tmp_path / "repo")
    log = Path("published/cifar10/resnet110/noise_0.25/test/sigma_0.25")
    (repo / log).parent.mkdir(parents=True)
    shutil.copy(REPO / "tests/fixtures/published-certificates/cifar10-resnet110-gaussian/noise_0.25_sigma_0.25.tsv",
                repo / log)
    extra = overlay(tmp_path, "baselines", {"report": {"baselines": [f"cohen_resnet110={log}"]}})
    jobs = dry_run(repo, "--configfile", extra)
    assert [j.rule for j in jobs] == ["report"] and str(log) in jobs[0].inputs
    r = snakemake(repo, "--cores", "1", "--configfile", extra)
    assert r.returncode == 0, tail(r)
    tidy = pd.read_csv(repo / f"{TINY}/digits/report/certified_accuracy.csv")
    assert set(tidy[tidy.kind == "baseline"].name) == {"cohen_resnet110"}
    assert str(log) in (repo / f"{TINY}/digits/report/sources.txt").read_text()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=rcm", "-c", "user.email=rcm@localhost", *args], cwd=cwd,
                   check=True, capture_output=True)


def _make_pull(repo: Path) -> subprocess.CompletedProcess:
    """The collaborator's `make pull`, with this test's environment standing in for a new venv."""
    return subprocess.run(["make", "-o", str(BIN / "rcm"), "pull", f"VENV={BIN.parent}"], cwd=repo,
                          env=run_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dvc_push_then_pull_in_a_fresh_clone_leaves_nothing_to_do(tiny_run, tmp_path):
    """A collaborator clones, pulls the checkpoints and certificates from the DVC remote (a local
    folder here), and neither DVC nor Snakemake finds anything to recompute, although every pulled
    file has a new modification time."""
    origin = clone(tiny_run.path, tmp_path / "origin")
    dvc(origin, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "a finished run")
    dvc(origin, "push")
    _git(tmp_path, "clone", "-q", str(origin), "collaborator")
    repo = tmp_path / "collaborator"
    assert not (repo / TINY).exists() and not (repo / ".snakemake").exists()

    r = _make_pull(repo)
    assert r.returncode == 0, tail(r)
    assert dvc_changed(repo) == set()
    assert dry_run(repo) == []
    pulled = sorted(p.relative_to(repo) for p in (repo / TINY).rglob("*")
                    if p.is_file() and not {"logs", "benchmarks"} & set(p.parts))   # job logs are not versioned
    assert any(p.suffix == ".pt" for p in pulled) and any(p.suffix == ".tsv" for p in pulled)
    for p in pulled:
        assert (repo / p).read_bytes() == (origin / p).read_bytes(), p

    # a checkout that DVC does not find up to date is not marked up to date for Snakemake
    _edit_config(repo, lambda c: c["certify"].update(n=60))
    r = _make_pull(repo)
    assert r.returncode != 0 and "dvc status shows changed stages" in r.stderr


def test_gpus_become_job_resources_and_several_launch_torchrun(fresh, tmp_path):
    """`gpus` per stage: each job asks for its stage's GPUs (resources gpu=N, which the SLURM plugin
    submits as --gpus=N and `--resources gpu=K` limits locally); a training stage with N > 1 runs as N
    torchrun processes, one with 1 or 0 as plain `rcm`; certification shards take at most one."""
    gpus = {"denoiser": 2, "classifier": 1, "finetune_denoiser": 0, "rrcm_pretrain": 4, "rrcm_finetune": 1,
            "certify": 1}
    cuda = {section: {"device": "cuda"} for section, n in gpus.items() if n}
    over = overlay(tmp_path, "gpus", {"gpus": gpus, **cuda})
    r = snakemake(fresh, "-n", "-p", "--configfile", over, "--resources", "gpu=4")
    assert r.returncode == 0, tail(r)
    text = r.stdout + r.stderr
    seen = {}
    for m in _BLOCK.finditer(text):
        resources = re.search(r"^\s+resources: (.*)$", m.group(2), re.M)
        shell = re.search(r"^Shell command: (.*)$", m.group(2), re.M)
        if resources and shell:
            gpu = re.search(r"\bgpu=(\d+)", resources.group(1))
            seen.setdefault(m.group(1), set()).add((int(gpu.group(1)) if gpu else 0, shell.group(1)))
    section = {"train_denoiser": "denoiser", "train_classifier": "classifier", "finetune_denoiser": "finetune_denoiser",
               "pretrain_rrcm": "rrcm_pretrain", "finetune_rrcm": "rrcm_finetune", "certify": "certify",
               "certify_cascade": "certify"}
    for rule, key in section.items():
        assert seen.get(rule), rule
        for gpu, shell in seen[rule]:
            assert gpu == gpus[key], rule
            launched = re.search(r"-m torch\.distributed\.run --standalone --nproc_per_node (\d+) -m rcm ", shell)
            assert (int(launched.group(1)) if launched else 1) == max(1, gpus[key] if key != "certify" else 1), rule
    assert all(gpu == 0 for rule, jobs in seen.items() if rule not in section for gpu, _ in jobs)
    bad = overlay(tmp_path, "bad", {"gpus": {**gpus, "certify": 2}, **cuda})
    r = snakemake(fresh, "-n", "--configfile", bad)
    assert r.returncode != 0 and "gpus.certify" in r.stdout + r.stderr


def test_gpu_jobs_take_one_node_and_a_multi_node_stage_runs_one_agent_per_node(fresh, tmp_path):
    """Single-node jobs ask for one node (so SLURM cannot spread a torchrun job's GPUs over several),
    and per GPU the `host` share of CPUs and memory; a training stage with `nodes: 2` renders one
    torchrun agent per node under srun, meeting at a c10d rendezvous on the allocation's first host,
    and asks for 2 nodes of `gpus` GPUs each; a stage with 0 GPUs and device auto sees no GPU."""
    over = overlay(tmp_path, "nodes", {
        "gpus": {"denoiser": 1, "classifier": 0, "finetune_denoiser": 0, "rrcm_pretrain": 8, "rrcm_finetune": 0,
                 "certify": 0},
        "nodes": {"rrcm_pretrain": 2}, "host": {"cpus_per_gpu": 6, "mem_mb_per_gpu": 40000},
        "denoiser": {"device": "cuda"}, "rrcm_pretrain": {"device": "cuda"}, "certify": {"device": "auto"}})
    r = snakemake(fresh, "-n", "-p", "--configfile", over)
    assert r.returncode == 0, tail(r)
    jobs = {}
    for m in _BLOCK.finditer(r.stdout + r.stderr):
        resources = re.search(r"^\s+resources: (.*)$", m.group(2), re.M)
        shell = re.search(r"^Shell command: (.*)$", m.group(2), re.M)
        if resources and shell:
            jobs.setdefault(m.group(1), (dict(kv.split("=", 1) for kv in resources.group(1).split(", ")),
                                         shell.group(1)))
    res, shell = jobs["pretrain_rrcm"]
    python = re.escape(sys.executable)
    assert re.match(r'srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 48 --gres=gpu:8 --kill-on-bad-exit=1 '
                    + python + r' -m torch\.distributed\.run'
                    r' --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d'
                    r' --rdzv-endpoint "\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| head -n 1\)"'
                    r':\$\(\(29500 \+ SLURM_JOB_ID % 1000\)\) --rdzv-id "\$SLURM_JOB_ID" -m rcm --threads \d+ pretrain-rrcm ',
                    shell), shell
    assert (res["nodes"], res["gres"], res["tasks"], res["mpi"], res["cpus_per_task"], res["mem_mb"]) == \
        ("2", "gpu:8", "2", "srun", "48", "320000") and "gpu" not in res
    res, shell = jobs["train_denoiser"]
    assert (res["gpu"], res["nodes"], res["cpus_per_gpu"], res["mem_mb"]) == ("1", "1", "6", "40000")
    assert shell.startswith(sys.executable) and "torch.distributed.run" not in shell
    res, shell = jobs["certify"]
    assert res["gpu"] == "0" and res["nodes"] == "1" and shell.startswith("CUDA_VISIBLE_DEVICES= ")
    res, shell = jobs["train_classifier"]
    assert res["gpu"] == "0" and not shell.startswith("CUDA_VISIBLE_DEVICES")   # device: cpu


def test_a_stage_device_must_agree_with_its_gpus(fresh, tmp_path):
    for config, words in [({"certify": {"device": "cuda"}}, "certify.device: 'cuda', but gpus.certify is 0"),
                          ({"gpus": {"classifier": 1}}, "gpus.classifier: 1, but classifier.device is 'cpu'"),
                          ({"nodes": {"classifier": 2}}, "nodes.classifier: 2 nodes need gpus.classifier >= 1"),
                          ({"nodes": {"certify": 2}}, "nodes.certify: unknown key")]:
        r = snakemake(fresh, "-n", "--configfile", overlay(tmp_path, "bad", config))
        assert r.returncode != 0 and words in r.stdout + r.stderr, (config, tail(r))


def test_the_default_and_the_tiny_run_write_under_their_own_roots(tmp_path):
    """`make run` and `make run CONFIG=.test/config.yaml` in one checkout: every file either DAG writes
    (outputs, logs, benchmark tables) lies under its own results root, and the roots differ, so
    switching between them never overwrites, and so never reruns, the other's finished jobs."""
    repo = make_copy(tmp_path / "repo", config="config/config.yaml")
    written = {}
    for name, args in {"default": (), "tiny": ("--configfile", ".test/config.yaml")}.items():
        r = snakemake(repo, "-n", *args)
        assert r.returncode == 0, tail(r)
        written[name] = {f for m in _BLOCK.finditer(r.stdout + r.stderr)
                         for key in ("output", "log", "benchmark")
                         for line in re.findall(rf"^\s+{key}: (.*)$", m.group(2), re.M) for f in line.split(", ")}
        assert written[name]
    roots = {"default": load_config(REPO / "config/config.yaml")["results"], "tiny": TINY}
    assert roots["default"] != roots["tiny"]
    for name, files in written.items():
        outside = sorted(f for f in files if not f.startswith(roots[name] + "/"))
        assert not outside, (name, outside[:5])
    assert not written["default"] & written["tiny"]
