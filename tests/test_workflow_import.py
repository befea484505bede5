"""The workflow certifying imported models: with `pretrained` set, an import job replaces training
(Snakemake and DVC run the same command), the source file is the job's input, and replacing it reruns
only what depends on it. Data: CIFAR-10 batch files in the real format; models: Cohen et al.'s
checkpoint layout and an improved-diffusion state dict, all written here."""

import re

import pytest
import torch
import yaml

from test_data import _write_cifar
from test_import import RRCM, SMALL_IMPROVED, _cohen_file, _openai_file, _randomise, _reference_state
from test_workflow import (TINY, dry_run, dvc_stages, make_copy, parse_rcm, rcm_tokens, snakemake, tail)

CLEAN = "pretrained/cohen/noise_0.00/checkpoint.pth.tar"
NOISY = "pretrained/cohen/noise_0.25/checkpoint.pth.tar"
DDPM = "pretrained/cifar10_uncond.pt"
RRCM_FT = "pretrained/rrcm/finetuned_0.25.pth"


def write_cohen(repo, path, seed):
    from rcm.models.cohen import CohenClassifier

    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    _cohen_file(repo / path, "cifar_resnet20", _randomise(CohenClassifier(arch="cifar_resnet20").net, seed))


def imports_config(repo) -> dict:
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg.update(dataset="cifar10", methods=["gaussian", "dds", "rrcm"], sigmas=[0.25], cascades=[], sequential_methods=[],
               sequential_cascades=[],
               shard_ids=[0])
    cfg["data"].update(root="cifar", unverified=True)
    cfg["certify"].update(n0=10, n=20, batch_size=20, shards=1, max_images=4)
    cfg["classifier"].update(pretrained=CLEAN, pretrained_format="cohen", pretrained_options="--arch cifar_resnet20",
                             pretrained_noisy=[f"0.25={NOISY}"])
    cfg["denoiser"].update(pretrained=DDPM, pretrained_format="improved-diffusion",
                           pretrained_options=f'--flags "{SMALL_IMPROVED}"')
    cfg["rrcm_finetune"].update(pretrained_noisy=[f"0.25={RRCM_FT}"], pretrained_options="--heads 2")
    return cfg


@pytest.fixture(scope="module")
def imports_repo(tmp_path_factory):
    repo = make_copy(tmp_path_factory.mktemp("imports") / "repo")
    _write_cifar(repo / "cifar", n_train=12, n_test=4)
    write_cohen(repo, CLEAN, seed=1)
    write_cohen(repo, NOISY, seed=2)
    _openai_file(repo / DDPM, SMALL_IMPROVED, "improved-diffusion")
    (repo / RRCM_FT).parent.mkdir(parents=True)
    torch.save(_reference_state(RRCM["finetuned"]["keys"]), repo / RRCM_FT)   # the authors' FinetuneModel layout
    (repo / "config/config.yaml").write_text(yaml.safe_dump(imports_config(repo), sort_keys=False))
    return repo


IMPORT_ONLY = {"dataset", "results", "sigma", "pretrained", "pretrained_format", "pretrained_options",
               "pretrained_noisy", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end"}


def test_imported_models_replace_training_in_both_dags(imports_repo):
    jobs = dry_run(imports_repo)
    rules = sorted(j.rule for j in jobs)
    assert rules == ["certify", "certify", "certify", "import_classifier", "import_classifier", "import_denoiser",
                     "import_rrcm_classifier", "prepare", "report"], rules   # no training, no rRCM pretraining
    sources = {j.outputs[0].rsplit("/", 1)[1]: set(j.inputs) for j in jobs if j.rule.startswith("import_")}
    # rcm.stages (the config checks, rcm plan) derives the same import jobs, each from its source
    from rcm import stages as model_table

    needed = model_table.needed(yaml.safe_load((imports_repo / "config/config.yaml").read_text()))
    assert {(j.rule, str(j.path)) for j in needed} == {(j.rule, j.outputs[0]) for j in jobs
                                                        if j.rule.startswith("import_")}
    assert all(j.source in sources[j.path.name] for j in needed)
    assert CLEAN in sources["classifier_sigma_0.0.pt"] and NOISY in sources["classifier_sigma_0.25.pt"]
    assert DDPM in sources["denoiser.pt"] and RRCM_FT in sources["rrcm_sigma_0.25.pt"]
    stages = {frozenset(s.outs): s for s in dvc_stages(imports_repo)}
    for job in jobs:
        stage = stages[frozenset(job.outputs)]
        if job.rule == "report":  # DVC globs the certificates (test_workflow compares that)
            continue
        if job.rule.startswith("import_"):
            # the import job shows only what an import reads (no training flags, no --device); DVC's
            # stage, which trains or imports, passes the whole section: the same command and values
            ours, theirs = rcm_tokens(job.shell), rcm_tokens(stage.cmd)
            given = {t[2:] for t in ours if t.startswith("--") and " " not in t}   # not a quoted value
            assert given <= IMPORT_ONLY, (job.rule, given - IMPORT_ONLY)
            assert ours[:2] == theirs[:2] and all(
                getattr(parse_rcm(ours), k) == getattr(parse_rcm(theirs), k) for k in given), job.rule
        else:
            assert rcm_tokens(job.shell) == rcm_tokens(stage.cmd), job.rule
        if job.rule == "import_denoiser":
            assert DDPM in stage.deps
        if job.rule == "import_classifier" and "sigma_0.0" in job.outputs[0]:
            assert CLEAN in stage.deps
    for job in jobs:
        if job.rule.startswith("import_"):
            parsed = parse_rcm(rcm_tokens(job.shell))
            assert getattr(parsed, "pretrained_format", "rrcm") in ("cohen", "improved-diffusion", "rrcm")


# each group of settings fails together: every message is in the one error (fewer Snakemake starts)
BAD_SETTINGS = [
    ({"classifier": {"pretrained": "pretrained/absent.pth.tar", "pretrained_noisy": ["0.5=x"]},
      "denoiser": {"pretrained": CLEAN}, "rrcm_finetune": {"pretrained_noisy": [f"0.25={CLEAN}"]}},
     ["classifier.pretrained: 'pretrained/absent.pth.tar' does not exist",
      f"denoiser.pretrained: '{CLEAN}' does not look like a improved-diffusion file",
      "classifier.pretrained_noisy: ignoring the entries for sigma 0.5, which are not in sigmas",
      "rrcm_finetune.pretrained_noisy (0.25): ", "does not look like a rrcm file"]),
    ({"denoiser": {"pretrained_options": "--flags '--image_size 48'"}, "classifier": {"pretrained_format": ""}},
     ["no channel_mult for --image_size 48", "classifier.pretrained_format must say its format"]),
    ({"classifier": {"pretrained_options": "--flags x"}}, ["do not apply to format cohen"]),
]


def test_pretrained_noisy_entries_of_other_sigmas_are_ignored(imports_repo, tmp_path):
    """A preset lists its classifiers for every sigma of the paper; a run of one sigma changes `sigmas`
    alone: the other entries are ignored (one line says which), never checked, never imported."""
    cfg = imports_config(imports_repo)
    cfg["classifier"]["pretrained_noisy"] = ["0.12=pretrained/absent_0.12.pth.tar", f"0.25={NOISY}",
                                             "1.0=pretrained/absent_1.0.pth.tar"]
    one = tmp_path / "one_sigma.yaml"
    one.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = snakemake(imports_repo, "-n", "--configfile", str(one))
    assert r.returncode == 0, tail(r)
    assert (r.stdout + r.stderr).count("classifier.pretrained_noisy: ignoring the entries for sigma 0.12, 1.0, "
                                       "which are not in sigmas [0.25]") >= 1
    imports = [job for job in dry_run(imports_repo, "--configfile", str(one)) if job.rule == "import_classifier"]
    assert sorted(job.outputs[0].rsplit("/", 1)[-1] for job in imports) == ["classifier_sigma_0.0.pt",
                                                                             "classifier_sigma_0.25.pt"]


@pytest.mark.parametrize("change,messages", BAD_SETTINGS)
def test_a_bad_import_setting_fails_before_any_job(imports_repo, tmp_path, change, messages):
    cfg = imports_config(imports_repo)
    for section, values in change.items():
        cfg[section].update(values)
    other = tmp_path / "bad.yaml"
    other.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = snakemake(imports_repo, "-n", "--configfile", str(other))
    assert r.returncode != 0, tail(r)
    for message in messages:
        assert message in r.stdout + r.stderr, (message, tail(r))


@pytest.mark.slow
def test_imported_models_are_certified_and_a_replaced_file_reruns_only_its_dependents(imports_repo):
    from rcm import paths
    from rcm.models import load_model

    r = snakemake(imports_repo, "--cores", "2")
    assert r.returncode == 0, tail(r, 6000)
    models = imports_repo / f"{TINY}/cifar10/models"
    assert load_model(models / "classifier_sigma_0.0.pt")[1]["origin"]["format"] == "cohen"
    assert load_model(models / "denoiser.pt")[1]["origin"]["format"] == "improved-diffusion"
    assert load_model(models / "rrcm_sigma_0.25.pt")[1]["origin"]["details"]["kind"] == "fine-tuned classifier"
    log = (imports_repo / TINY / "cifar10/logs/import_classifier/sigma_0.25.log").read_text()
    assert re.search(r"fit check of \S+classifier_sigma_0.25.pt on 2 images of the certification split "
                     r"\(3 channels, 32 px\): 10 outputs for 10 classes: passed", log), log
    report = paths.report_dir(imports_repo / TINY, "cifar10") / "certified_accuracy.csv"
    text = report.read_text()
    assert "gaussian_sigma_0.25" in text and "dds_sigma_0.25" in text and "rrcm_sigma_0.25" in text
    assert dry_run(imports_repo) == []
    write_cohen(imports_repo, CLEAN, seed=3)                      # a different clean classifier
    rerun = sorted((j.rule, j.outputs[0].rsplit("/", 2)[-2]) for j in dry_run(imports_repo))
    assert rerun == [("certify", "sigma_0.25"), ("import_classifier", "models"), ("report", "report")], rerun
    (job,) = [j for j in dry_run(imports_repo) if j.rule == "certify"]
    assert "/dds/" in job.outputs[0]


PRESETS = {
    "config/cifar10-cohen.yaml": ("config/cifar10.yaml", {"train_classifier"}),
    "config/cifar10-dds.yaml": ("config/cifar10.yaml", {"train_classifier", "train_denoiser"}),
    "config/imagenet-dds.yaml": ("config/imagenet.yaml", {"train_classifier", "train_denoiser"}),
}


def _stand_in(repo, fmt: str, path: str) -> None:
    """A small file in the format's real layout (what the workflow's early check reads: its kind
    and, for torch files, the format's signature key)."""
    import json

    import torch
    from safetensors.torch import save_file

    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "cohen":
        torch.save({"epoch": 1, "arch": "cifar_resnet110", "state_dict": {"1.conv1.weight": torch.zeros(1)},
                    "optimizer": {}}, target)
    elif fmt in ("improved-diffusion", "guided-diffusion"):
        torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, target)
    elif fmt == "hf":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "vit"}))
    elif fmt == "timm":
        save_file({"head.weight": torch.zeros(1)}, str(target))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_and_name_each_missing_file(tmp_path, preset):
    base, trained_otherwise = PRESETS[preset]
    repo = make_copy(tmp_path / "repo", config=None)
    args = ["--configfile", base, preset]
    cfg = yaml.safe_load((repo / preset).read_text())
    if "imagenet" in base:  # val/ only: with every model imported nothing trains, and train/ is never read
        (tmp_path / "imagenet" / "val").mkdir(parents=True)
        (tmp_path / "root.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "imagenet")}}))
        args.append(str(tmp_path / "root.yaml"))
    sources = []
    for section in ("denoiser", "classifier"):
        sec = cfg.get(section, {})
        if sec.get("pretrained"):
            sources.append((section, sec["pretrained_format"], sec["pretrained"]))
        sources += [(section, sec["pretrained_format"], e.partition("=")[2]) for e in sec.get("pretrained_noisy", [])]
    assert sources
    r = snakemake(repo, "-n", *args)
    assert r.returncode != 0
    for section, _, path in sources:
        assert f"'{path}' does not exist" in r.stdout + r.stderr, (path, tail(r))
    for _, fmt, path in sources:
        _stand_in(repo, fmt, path)
    rules = {j.rule for j in dry_run(repo, *args)}
    assert not rules & trained_otherwise, rules
    assert {r.replace("train_", "import_") for r in trained_otherwise} <= rules
    if "imagenet" in base:
        assert "prepare_train" not in rules, rules
        # a method that trains needs the training folder, and says so before any job
        r = snakemake(repo, "-n", *args, "--config", "methods=[dds,gaussian]")
        assert r.returncode != 0 and f"'{tmp_path / 'imagenet' / 'train'}', which does not exist" in r.stdout + r.stderr
