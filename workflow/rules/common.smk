# Config validation, the flag renderer and input functions. No rules here.

import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import update_config

from rcm import methods, paths, stages
from rcm.importers import check_source, denoiser_format, is_placeholder, parse_noisy_entry
from rcm.errors import ConfigError as RcmConfigError
from rcm.paths import parse_baseline


# ------------------------------------------------------------------------------------ validation


class ConfigError(Exception):
    """A bad config value, found while the workflow is parsed: before any job starts."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_errors(cfg: dict, schema: dict) -> list[str]:
    """One line per violation, each naming the config key (dotted, e.g. certify.n)."""
    lines = []
    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path))):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties":
            known = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(known)):
                lines.append(f"{_key([*where, extra])}: unknown key (known here: {', '.join(known)})")
        else:
            lines.append(f"{_key(where)}: {err.message}")
    return lines


def _semantic_errors(cfg: dict) -> list[str]:
    """What a schema cannot say: cross-key consistency and paths that must exist."""
    lines = []
    for name, values in [("sigmas", cfg["sigmas"])] + [
        (f"cascades.{i}.flags.sigmas", c["flags"]["sigmas"]) for i, c in enumerate(cfg["cascades"])
    ]:
        for i, s in enumerate(values):
            # DVC writes a number into a file name as YAML spelled it, rcm.paths as a float.
            if not isinstance(s, float):
                lines.append(f"{name}.{i}: write the noise level {s} as a float ({float(s)!r})")
        if len(set(values)) != len(values):
            lines.append(f"{name}: a noise level is listed twice: {values}")
    lines += _method_errors(cfg)
    if len(set(cfg["methods"])) != len(cfg["methods"]):
        lines.append(f"methods: a method is listed twice: {cfg['methods']}")
    if not cfg["methods"] and not cfg["sequential_methods"]:
        lines.append("methods: empty, and so is sequential_methods: nothing would be certified")
    shards = cfg["certify"]["shards"]
    if cfg["shard_ids"] != list(range(shards)):
        lines.append(f"shard_ids: must list 0 .. certify.shards - 1 = {list(range(shards))} "
                     f"(dvc.yaml iterates over it), got {cfg['shard_ids']}")
    # custom_methods are registered by now (_method_errors)
    lines += methods.batch_size_errors(cfg["certify"]["batch_sizes"], methods.names())
    seen = set()
    for i, c in enumerate(cfg["cascades"]):
        if c["method"] not in cfg["methods"]:
            lines.append(f"cascades.{i}.method: '{c['method']}' is not in methods {cfg['methods']} "
                         "(add it there, or remove this cascade)")
        if c["method"] in seen:
            lines.append(f"cascades.{i}.method: a second cascade of '{c['method']}' "
                         "(its certificates would share one file name)")
        seen.add(c["method"])
        missing = [s for s in c["flags"]["sigmas"] if s not in cfg["sigmas"]]
        if missing:
            lines.append(f"cascades.{i}.flags.sigmas: {missing} not in sigmas {cfg['sigmas']} "
                         "(the per-sigma models of a cascade are those of `sigmas`)")
    lines += _device_errors(cfg)
    wanted = [c for c in cfg["cascades"] if c["method"] in cfg["sequential_methods"]]
    if cfg["sequential_cascades"] != wanted:
        lines.append("sequential_cascades: must be the cascades of sequential_methods, exactly as `cascades` "
                     f"lists them (YAML aliases of those entries; dvc.yaml iterates over it): {wanted}, "
                     f"got {cfg['sequential_cascades']}")
    lines += _noisy_errors(cfg)
    lines += _path_errors(cfg)
    return lines


def _method_errors(cfg: dict) -> list[str]:
    """custom_methods checked and registered (rcm.methods: each problem one line naming the key), then
    every method the grid names must be a built-in or one of them."""
    try:
        methods.register_config(cfg.get("custom_methods") or {})
    except RcmConfigError as exc:
        return [str(exc)]
    lines, known = [], methods.names()
    lines += stages.custom_file_errors(cfg, {name: methods.get(name) for name in cfg.get("custom_methods") or {}})
    named = [(f"methods.{i}", m) for i, m in enumerate(cfg["methods"])]
    named += [(f"sequential_methods.{i}", m) for i, m in enumerate(cfg["sequential_methods"])]
    named += [(f"cascades.{i}.method", c["method"]) for i, c in enumerate(cfg["cascades"])]
    for key, name in named:
        if name not in known:
            lines.append(f"{key}: '{name}' is no method (built-in: {', '.join(paths.METHODS)}; a method of your "
                         "own is defined under custom_methods)")
    return lines


def _device_errors(cfg: dict) -> list[str]:
    """A stage's `device` and its `gpus` (and `nodes`) must agree: the workflow counts and requests
    GPUs by `gpus`, so a job must not use one it did not ask for, nor ask for one it will not use."""
    lines = []
    for section, gpus in cfg["gpus"].items():
        device = cfg[section]["device"]
        if gpus == 0 and device.startswith("cuda"):
            lines.append(f"{section}.device: '{device}', but gpus.{section} is 0 (its jobs would use a GPU the "
                         f"workflow never requests or counts): set gpus.{section} >= 1, or device: auto or cpu")
        if gpus > 0 and device == "cpu":
            lines.append(f"gpus.{section}: {gpus}, but {section}.device is 'cpu': set device: cuda (or auto), "
                         f"or gpus.{section}: 0")
        if gpus > 1 and device.startswith("cuda:"):
            lines.append(f"{section}.device: '{device}' names one GPU, but gpus.{section} is {gpus}: use 'cuda'")
    for section, nodes in cfg["nodes"].items():
        if nodes > 1 and cfg["gpus"].get(section, 0) < 1:
            lines.append(f"nodes.{section}: {nodes} nodes need gpus.{section} >= 1 (the GPUs per node)")
    return lines


def _path_errors(cfg: dict) -> list[str]:
    """Inputs from outside the workflow must exist now, not hours into the run."""
    lines, data = [], cfg["data"]
    root = Path(data["root"]) if data["root"] else None
    if cfg["dataset"] == "cifar10":
        lines += _cifar_root_errors(data, root)
    if cfg["dataset"] == "imagenet":
        for split in ("train", "val") if something_trains(cfg) else ("val",):
            if root is None or not (root / split).is_dir():
                where = root / split if root else f"<data.root>/{split}"
                lines.append(f"data.root: ImageNet needs a class-per-folder directory '{where}', "
                             "which does not exist")
    for i, item in enumerate(cfg["report"]["baselines"]):
        name, path = parse_baseline(item)
        if not path.is_file():
            lines.append(f"report.baselines.{i}: '{path}' is not a file (a published certification "
                         "log: NAME=FILE, or FILE)")
    for section, sigma, source in pretrained_sources(cfg):
        sec = cfg[section]
        if section == "rrcm_finetune":  # only the authors' own fine-tuned classifiers
            fmt = "rrcm"
        elif section == "denoiser":
            fmt = denoiser_format(sec["pretrained_format"], source)
        else:
            fmt = sec["pretrained_format"]
        where = f"{section}.pretrained" if sigma is None else f"{section}.pretrained_noisy ({sigma})"
        if not fmt:
            lines.append(f"{where}: '{source}' is set, so {section}.pretrained_format must say its format")
            continue
        lines += [f"{where}: {problem}" for problem in check_source(source, fmt, sec["pretrained_options"])]
    return lines


def _cifar_root_errors(data: dict, root: Path | None) -> list[str]:
    """data.root must hold cifar-10-batches-py/ (unless torchvision is to download it there)."""
    layout = f"it must hold {paths.CIFAR_FOLDER}/ with {', '.join(paths.CIFAR_FILES)}"
    if root is not None and root.is_dir() and not (root / paths.CIFAR_FOLDER).is_dir():
        found = [name for name in paths.CIFAR_FILES if (root / name).is_file()]
        if found:  # a download would go one level deeper, so this is wrong either way
            held = ", ".join(found[:2]) + (f" and {len(found) - 2} more" if len(found) > 2 else "")
            return [f"data.root: '{data['root']}' holds {held} itself: data.root points at the "
                    f"{paths.CIFAR_FOLDER} folder itself; set it to its parent ('{root.parent}')"]
    if data["download"]:
        return []
    if root is None or not root.is_dir():
        return [f"data.root: CIFAR-10 directory '{data['root']}' does not exist ({layout}; or set "
                "data.download: true)"]
    if not (root / paths.CIFAR_FOLDER).is_dir():
        return [f"data.root: '{data['root']}' holds no {paths.CIFAR_FOLDER}/ ({layout}, torchvision's "
                "format; or set data.download: true)"]
    return []


def pretrained_sources(cfg: dict) -> list[tuple[str, str | None, str]]:
    """(section, sigma text or None, source) of every model the config imports instead of training,
    for the methods it certifies (rcm.stages: the files their base classifiers and training read)."""
    return [(job.stage.section, paths.fmt_sigma(job.sigma) if job.stage.per_sigma and job.sigma else None,
             job.source) for job in stages.needed(cfg) if not job.trains]


def something_trains(cfg: dict) -> bool:
    """Whether the DAG holds a training job (then it needs `prepare_train`, and ImageNet its train/):
    a model file of its methods that a stage trains rather than imports, or a user's method with a
    `train` command of its own."""
    if any(job.trains for job in stages.needed(cfg)):
        return True
    custom = set(stages.certified_methods(cfg)) & set(cfg.get("custom_methods") or {})
    return any(methods.get(name).train for name in custom if name in methods.names())


def _entry_error(entry: str) -> str:
    try:
        parse_noisy_entry(entry)
        return ""
    except RcmConfigError as exc:
        return str(exc)


def _noisy_errors(cfg: dict) -> list[str]:
    return _noisy_list_errors(cfg, "classifier") + _noisy_list_errors(cfg, "rrcm_finetune")


def _noisy_list_errors(cfg: dict, section: str) -> list[str]:
    lines, seen, ignored = [], set(), []
    sigmas = {paths.fmt_sigma(s) for s in cfg["sigmas"]}
    for i, entry in enumerate(cfg[section]["pretrained_noisy"]):
        where = f"{section}.pretrained_noisy.{i}"
        if _entry_error(entry):
            lines.append(f"{where}: {_entry_error(entry)}")
            continue
        sigma = parse_noisy_entry(entry)[0]
        if sigma not in sigmas:
            ignored.append(sigma)
        elif sigma in seen:
            lines.append(f"{where}: sigma {sigma} is listed twice")
        seen.add(sigma)
    if ignored:
        print(f"rcm: {section}.pretrained_noisy: ignoring the entries for sigma {', '.join(ignored)}, which are "
              f"not in sigmas {cfg['sigmas']}", file=sys.stderr)
    return lines


def _resolve(node: dict, schema: dict) -> dict:
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return schema["$defs"][ref[len("#/$defs/"):]]
    return node


def typed_overrides(value, node: dict, schema: dict):
    """``value`` (the ``--config`` overrides) with the strings that Snakemake made of nested values
    read as YAML where the schema wants another type: `certify={"n": 100}` arrives as {"n": "100"},
    and `sigmas=[0.25]` as ["0.25"]. A string that does not read as the wanted type stays as it is,
    so the schema check still names the key. Config files are not touched: a quoted string there is
    meant as one."""
    node = _resolve(node, schema)
    kind = node.get("type")
    if isinstance(value, dict) and kind == "object":
        props = node.get("properties", {})
        return {k: typed_overrides(v, props[k], schema) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and kind == "array" and "items" in node:
        return [typed_overrides(v, node["items"], schema) for v in value]
    if isinstance(value, str) and kind not in (None, "string"):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        wanted = {"integer": int, "number": (int, float), "boolean": bool, "array": list,
                  "object": dict}.get(kind, object)
        if isinstance(parsed, wanted) and not (kind in ("integer", "number") and isinstance(parsed, bool)):
            if kind == "number" and isinstance(parsed, int):
                parsed = float(parsed)  # a number on the command line is the float the schema means
            return typed_overrides(parsed, node, schema)
    return value


def validate_config(cfg: dict, schema_file: Path, overrides: dict) -> None:
    """Check ``cfg`` (config files merged with the ``--config`` ``overrides``) against the schema,
    reading the overrides' strings as the schema types them first."""
    schema = yaml.safe_load(Path(schema_file).read_text())
    update_config(cfg, typed_overrides(overrides, schema, schema))
    for section in cfg.values():  # `amp: off` unquoted is YAML 1.1's false (DVC's YAML 1.2 reads 'off')
        if isinstance(section, dict) and section.get("amp") is False:
            section["amp"] = "off"
    errors = _schema_errors(cfg, schema)
    if not errors:
        errors = _semantic_errors(cfg)
    if not errors:
        errors = _memory_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _memory_errors(cfg: dict) -> list[str]:
    """One line per stage whose planned peak memory per device (rcm plan) exceeds ``gpu_memory_gb``.
    rcm.plan imports torch and traces the configured networks on the meta device (seconds), so it is
    imported only when the key is set: without it, parsing the DAG stays torch-free."""
    if not cfg.get("gpu_memory_gb"):
        return []
    from rcm.plan import memory_errors

    return memory_errors(cfg)


validate_config(config, Path(workflow.current_basedir).parent / "schemas" / "config.schema.yaml",
                dict(workflow.config_settings.config))

D = config["dataset"]
R = config["results"]
SIGMAS = [paths.fmt_sigma(s) for s in config["sigmas"]]
SHARDS = config["certify"]["shards"]
CASCADES = {c["method"]: c for c in config["cascades"]}
SEQUENTIAL_METHODS = config["sequential_methods"]
SEQUENTIAL_CASCADES = [m for m in CASCADES if m in SEQUENTIAL_METHODS]  # = config["sequential_cascades"] (checked)
# the users' methods the config defines (registered in rcm.methods by the validation above)
CUSTOM = {name: methods.get(name) for name in (config.get("custom_methods") or {})}
BASELINE_FILES = [str(parse_baseline(item)[1]) for item in config["report"]["baselines"]]
# the models imported instead of trained: sigma text -> source (classifiers), or the source (others)
IMPORTED_CLASSIFIERS = {
    **({paths.fmt_sigma(0.0): config["classifier"]["pretrained"]}
       if not is_placeholder(config["classifier"]["pretrained"]) else {}),
    **stages.noisy_imports(config, "classifier"),
}
IMPORTED_DENOISER = "" if is_placeholder(config["denoiser"]["pretrained"]) else config["denoiser"]["pretrained"]
IMPORTED_RRCM_CLASSIFIERS = stages.noisy_imports(config, "rrcm_finetune")
IMPORTED_RRCM = "" if is_placeholder(config["rrcm_pretrain"]["pretrained"]) else config["rrcm_pretrain"]["pretrained"]


wildcard_constraints:
    method="|".join(methods.names()),
    sigma=r"\d+\.\d+",
    shard=r"\d+",


# ------------------------------------------------------------------------------------ flags

# Every job runs `rcm` as `<the interpreter running Snakemake> -m rcm`: that interpreter has just
# imported rcm (above), so the jobs run the same installation, and none depends on an `rcm` being on
# PATH. It is a global in the shell commands, not a param, so a venv at another path (a collaborator's
# clone, a cluster's file system) does not count as a change of the rules' code or params.
RCM = f"{shlex.quote(sys.executable)} -m rcm"
# GPUs per job of each stage (config `gpus`), and nodes per job of a training stage (`nodes`): resources
# gpu=N (sbatch --gpus=N on SLURM; a limit with `snakemake --resources gpu=K`), nodes=1, and the host
# share per GPU (`host`: --cpus-per-gpu, --mem). A training stage with N > 1 GPUs runs as N torchrun
# processes in its job (rcm.distributed); with `nodes: M > 1` as one torchrun agent per node under
# srun, meeting at a c10d rendezvous on the allocation's first host (SLURM only). A stage with 0 GPUs
# and `device: auto` runs with no GPU visible, so it never uses a GPU that `--resources gpu=K` does
# not count. None of this is a param, so moving the venv reruns nothing.
GPUS = config["gpus"]
NODES = {section: config["nodes"].get(section, 1) for section in GPUS}
HOST = config["host"]
PYTHON = shlex.quote(sys.executable)


def _launch(section: str) -> str:
    gpus, nodes = GPUS[section], NODES[section]
    if nodes > 1:
        first = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
        # srun takes the CPUs and GPUs again (it does not inherit sbatch's --cpus-per-task since Slurm 22.05)
        return (f"srun --nodes {nodes} --ntasks-per-node 1 --cpus-per-task {gpus * HOST['cpus_per_gpu']}"
                f" --gres=gpu:{gpus} --kill-on-bad-exit=1 {PYTHON} -m torch.distributed.run"
                f" --nnodes {nodes} --nproc_per_node {gpus} --rdzv-backend c10d"
                f' --rdzv-endpoint {first}:$((29500 + SLURM_JOB_ID % 1000)) --rdzv-id "$SLURM_JOB_ID" -m rcm')
    if gpus > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {gpus} -m rcm"
    if gpus == 0 and config[section]["device"] == "auto":
        return f"CUDA_VISIBLE_DEVICES= {RCM}"
    return RCM


LAUNCH = {section: _launch(section) for section in GPUS}


def gpu_resources(section: str) -> dict:
    """A stage's job resources: its GPUs on one node, or `nodes` nodes of them (sbatch --gres=gpu:N per
    node, one task per node), with `host.cpus_per_gpu` CPUs and `host.mem_mb_per_gpu` of memory per GPU
    (a CPU-only job: one share)."""
    return job_resources(GPUS[section], NODES[section])


def job_resources(gpus: int, nodes: int = 1) -> dict:
    """The resources of a job of `gpus` GPUs on each of `nodes` nodes (gpu_resources)."""
    mem = lambda wildcards, attempt: max(1, gpus) * HOST["mem_mb_per_gpu"]  # noqa: E731
    if nodes > 1:
        return dict(nodes=nodes, gres=f"gpu:{gpus}", mpi="srun", tasks=nodes, tasks_per_gpu=0,
                    cpus_per_task=gpus * HOST["cpus_per_gpu"], mem_mb=mem)
    if gpus == 0:
        return dict(gpu=0, nodes=1, mem_mb=mem)
    return dict(gpu=gpus, nodes=1, cpus_per_gpu=HOST["cpus_per_gpu"], mem_mb=mem)

def flags(section: dict) -> str:
    """A config section as `rcm` flags, exactly as DVC renders `${section}` in a cmd.

    `--key value` per key, `--key` alone for true, nothing for false, `--key v1 v2` for a list;
    strings shell-quoted; nested dicts flattened to dotted keys.
    """
    out = []
    for key, value in _flatten(section).items():
        if isinstance(value, bool):
            out += [f"--{key}"] if value else []
        elif isinstance(value, str):
            out.append(f"--{key} {shlex.quote(value)}")
        elif isinstance(value, (list, tuple)):
            if value:
                out.append(" ".join([f"--{key}", *(shlex.quote(v) if isinstance(v, str) else str(v)
                                                     for v in value)]))
        else:
            out.append(f"--{key} {value}")
    return " ".join(out)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# What an import job's command carries: the options an import reads (rcm.importers.stage), and a
# denoiser's schedule (which a diffusers folder's own scheduler config overrides). No training flags
# and no --device: `rcm train-*` with `pretrained` set imports on the CPU and trains nothing.
IMPORT_KEYS = ("pretrained", "pretrained_format", "pretrained_options", "pretrained_noisy",
               "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


def import_flags(section: str) -> str:
    return flags({k: v for k, v in config[section].items() if k in IMPORT_KEYS})


# `rcm prepare`'s flags: a global, like RCM, so that each prepare job's params (the data keys it
# reads) alone decide when it reruns
DATA_FLAGS = flags(config["data"])


# ------------------------------------------------------------------------------------ files

# The package modules whose code decides each stage's numbers, as inputs (and as DVC deps): editing
# one reruns that stage and what depends on it (Snakemake: newer and a different checksum; DVC: a
# different hash). Shared plumbing (cli, options, atomic, checkpoint, train/loop) is deliberately
# not listed; see docs/workflow.md.
IMPORTERS = ["rcm/importers/__init__.py", "rcm/importers/stage.py", "rcm/importers/cohen.py",
             "rcm/importers/openai.py", "rcm/importers/library.py", "rcm/importers/rrcm.py",
             "rcm/importers/diffusers_folder.py"]
CODE = {
    "prepare": ["rcm/data.py"],
    "train_denoiser": ["rcm/train/denoiser.py", "rcm/models/denoiser.py"],
    "train_classifier": ["rcm/train/classifier.py", "rcm/models/classifier.py"],
    "finetune_denoiser": ["rcm/train/mdds.py"],
    "pretrain_rrcm": ["rcm/train/rrcm_pretrain.py", "rcm/train/rrcm_losses.py", "rcm/train/augment.py",
                      "rcm/models/vit.py"],
    "finetune_rrcm": ["rcm/train/rrcm_finetune.py"],
    # a stage that imports instead of training: the readers, and the models they build
    "import_classifier": [*IMPORTERS, "rcm/models/cohen.py", "rcm/models/library.py"],
    "import_denoiser": [*IMPORTERS, "rcm/models/denoiser.py", "rcm/models/openai_unet.py"],
    "import_rrcm": [*IMPORTERS, "rcm/models/vit.py"],
    "certify": ["rcm/certify.py", "rcm/smoothing.py", "rcm/precision.py", "rcm/stats.py", "rcm/models/factory.py"],
    "certify_cascade": ["rcm/certify.py", "rcm/smoothing.py", "rcm/precision.py", "rcm/stats.py",
                        "rcm/models/factory.py", "rcm/cascade.py"],
    "report": ["rcm/report/__init__.py", "rcm/report/entries.py", "rcm/report/tables.py",
               "rcm/report/significance.py", "rcm/report/render.py", "rcm/report/plot.py",
               "rcm/certificate.py"],
}

REPORT_FILES = [
    "certified_accuracy.csv", "certified_accuracy.md", "certified_accuracy.tex",
    "certified_accuracy.png", "metrics.json", "plot_certified_accuracy.csv", "paired_tests.csv",
    "cost.csv", "cost.md", "sources.txt",
]


def log(rule: str, name: str = "") -> str:
    # under the results root, like everything a run writes: runs with other roots never share a file
    return f"{R}/{D}/logs/{rule}/{name}.log" if name else f"{R}/{D}/logs/{rule}.log"


def bench(rule: str, name: str = "") -> str:
    # flat file names, one table per job: {results}/{dataset}/benchmarks/{rule}[.{job}].tsv
    return f"{R}/{D}/benchmarks/{rule}.{name}.tsv" if name else f"{R}/{D}/benchmarks/{rule}.tsv"


def models(method: str, sigma: str) -> list[str]:
    """Checkpoints the base classifier of `method` at `sigma` loads (rcm.methods: its files)."""
    return [str(f) for f in methods.files(method, sigma, R, D).values()]


def custom_code(method: str) -> list[str]:
    """The source file of a user's method's builder, when it lies under the working directory: editing
    it reruns that method's certification (as CODE does for the built-ins)."""
    source = methods.source_file(CUSTOM[method])
    return [source] if source else []


def custom_flags(method: str) -> str:
    """`rcm certify`'s --custom_* flags describing a user's method (rcm.certify.register_custom)."""
    m = CUSTOM[method]
    out = [f"--custom_base_classifier {shlex.quote(m.builder if isinstance(m.builder, str) else '')}",
           "--custom_models " + " ".join(shlex.quote(f"{r}={t}") for r, t in m.templates.items())]
    if m.sigma_conditioned:
        out.append("--custom_sigma_conditioned")
    if m.noise:
        out.append(f"--custom_noise {shlex.quote(m.noise)}")
    return " ".join(out)


def certify_models(wildcards) -> list[str]:
    return models(wildcards.method, wildcards.sigma)


def cascade_models(wildcards) -> list[str]:
    files = []
    for s in CASCADES[wildcards.method]["flags"]["sigmas"]:
        files += [f for f in models(wildcards.method, paths.fmt_sigma(s)) if f not in files]
    return files


def certificates() -> list[str]:
    """Every certificate shard of the configured methods, sigmas and cascades, and the sequential
    ones of `sequential_methods`, their cascades included."""
    files = [str(paths.certificate(R, D, m, s, k, SHARDS))
             for m in config["methods"] for s in SIGMAS for k in range(SHARDS)]
    files += [str(paths.certificate(R, D, m, s, k, SHARDS, sequential=True))
              for m in SEQUENTIAL_METHODS for s in SIGMAS for k in range(SHARDS)]
    files += [str(paths.certificate(R, D, m, paths.CASCADE, k, SHARDS))
              for m in CASCADES for k in range(SHARDS)]
    files += [str(paths.certificate(R, D, m, paths.CASCADE, k, SHARDS, sequential=True))
              for m in SEQUENTIAL_CASCADES for k in range(SHARDS)]
    return files


def _report_file(name: str) -> str:
    return str(paths.report_dir(R, D) / name)


def report_files() -> list[str]:
    return [_report_file(name) for name in REPORT_FILES]
