"""rcm plan: the JSON interface, its memory estimates against measured steps, and the presets' fit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm import plan, presets
from rcm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [str(ROOT / "config/config.yaml")]
PRESETS = [["config/cifar10.yaml"], ["config/cifar10.yaml", "config/cifar10-dds.yaml"],
           ["config/cifar10.yaml", "config/cifar10-cohen.yaml"], ["config/imagenet.yaml"],
           ["config/imagenet.yaml", "config/imagenet-dds.yaml"]]
RULE_FIELDS = {"rule", "method", "sigma", "jobs", "flops", "peak_memory_gb", "device_hours", "fits"}


def small_cfg() -> dict:
    """The default (digits) config: every stage at the scale the default run trains and certifies."""
    return presets.load_config(DEFAULT)


# ----------------------------------------------------------------------------------- the interface

def test_json_has_the_documented_fields():
    r = subprocess.run([sys.executable, "-m", "rcm", "plan", "--config", *DEFAULT, "--device", "h100-80gb",
                        "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert {"device", "config", "rules", "total_device_hours"} <= set(data)
    assert data["device"] == "h100-80gb" and data["config"] == DEFAULT
    rules = {row["rule"] for row in data["rules"]}
    assert {"train_classifier", "train_denoiser", "finetune_denoiser", "pretrain_rrcm", "finetune_rrcm",
            "certify", "certify_cascade"} <= rules
    for row in data["rules"]:
        assert RULE_FIELDS <= set(row), row
        assert isinstance(row["fits"], bool) and row["jobs"] >= 1 and row["flops"] > 0
        if row["rule"].startswith("certify"):
            assert {"seconds_per_image", "n0", "n"} <= set(row)
            assert (row["n0"], row["n"]) == (100, 1000)
    assert data["total_device_hours"] == pytest.approx(sum(row["device_hours"] for row in data["rules"]))
    # the certification FLOPs per image are those the default run's certificates record (docs/benchmarks.md)
    gauss = next(row for row in data["rules"] if row["rule"] == "certify" and row["method"] == "gaussian")
    assert gauss["flops_per_image"] == pytest.approx(1100 * 1.068e6, rel=0.01)
    by_method = data["certification_device_hours"]
    assert set(by_method) == {row["method"] for row in data["rules"] if row["rule"] == "certify"}
    for method, hours in by_method.items():
        assert hours == pytest.approx(sum(row["device_hours"] for row in data["rules"]
                                          if row["rule"] == "certify" and row["method"] == method))


def test_a_users_method_is_planned_by_its_preset_and_left_out_without_one(tmp_path, monkeypatch):
    """A custom_methods entry with a preset (the example's median filter in front of the clean
    classifier) is traced like a built-in: its certification FLOPs per draw are at least the clean
    classifier's and far below dds's (the same classifier behind a UNet); without a preset it is left out with a note naming it, and so are the train
    commands of users' methods."""
    from rcm import methods

    cfg = presets.load_config(DEFAULT + [str(ROOT / "examples/custom_method/config.yaml")])
    cfg["sigmas"], cfg["cascades"], cfg["sequential_methods"], cfg["sequential_cascades"] = [0.5], [], [], []
    result = plan.plan_config(cfg, DEFAULT, "h100-80gb")
    rows = {(r["rule"], r["method"]): r for r in result.rows}
    median, dds = rows[("certify_custom", "median")], rows[("certify", "dds")]   # the rules that run them
    clean = plan.certify_estimate(plan.certified_network(cfg, "gaussian", 0.5), (1, 8, 8), 1, "off", "cpu")
    assert median["flops_per_draw"] >= clean.flops and median["flops_per_draw"] < dds["flops_per_draw"]
    assert not any("not planned" in n for n in result.notes)
    hours = result.as_json()["certification_device_hours"]
    assert set(hours) == {"gaussian", "dds", "mdds", "rrcm", "median"}
    assert hours["median"] == pytest.approx(median["device_hours"])
    spec = {k: v for k, v in cfg["custom_methods"]["median"].items() if k != "preset"}
    bare = {**cfg, "custom_methods": {"median": {**spec, "train": "{python} -m mypkg {output}"}}}
    result = plan.plan_config(bare, DEFAULT, "h100-80gb")
    assert "median" not in {r["method"] for r in result.rows}
    assert any(n.startswith("not planned: median (a user's method: give its custom_methods entry a preset")
               for n in result.notes)
    assert any(n.startswith("not planned: train_median_classifier") for n in result.notes)
    # a preset that cannot be traced (while it builds, in its forward pass, at one sigma only) leaves the
    # method out with its error, not the plan (nor the workflow's memory check) down
    (tmp_path / "brokenpreset.py").write_text(
        "import torch\n"
        "class ToNumpy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.as_tensor(x.cpu().numpy()).flatten(1)[:, :10]\n"
        "def building(cfg, sigma):\n    raise RuntimeError('no meta kernel')\n"
        "def forward(cfg, sigma):\n    return ToNumpy(), 'numpy inside'\n"
        "def one_sigma(cfg, sigma):\n"
        "    if sigma > 0.3:\n        raise ValueError('not at this sigma')\n"
        "    from examples.custom_method.method import preset\n    return preset(cfg, sigma)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for attr, problem in [("building", "at sigma 0.25: RuntimeError: no meta kernel)"),
                          ("forward", "at sigma 0.25: NotImplementedError: "),
                          ("one_sigma", "at sigma 0.5: ValueError: not at this sigma)")]:
        broken = {**cfg, "sigmas": [0.25, 0.5],
                  "custom_methods": {"median": {**spec, "preset": f"brokenpreset:{attr}"}}}
        result = plan.plan_config(broken, DEFAULT, "h100-80gb")
        assert "median" not in {r["method"] for r in result.rows} and "dds" in {r["method"] for r in result.rows}
        assert any(n.startswith("not planned: median (custom_methods.median.preset could not be traced on the meta "
                                "device ") and problem in n for n in result.notes), (attr, result.notes)
    methods.unregister("median")


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu-v9"], "unknown device 'tpu-v9'"),
    (["--rule", "train_everything"], "no rule 'train_everything'"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    r = subprocess.run([sys.executable, "-m", "rcm", "plan", "--config", *DEFAULT, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_config_that_does_not_validate_is_one_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("certify:\n  n: many\n")
    with pytest.raises(ConfigError, match=r"certify.n: 'many' is not of type 'integer'"):
        plan.make_plan([*DEFAULT, str(bad)], "a100-80gb")


def test_calibration_constant_is_the_published_cifar10_figure():
    """The one GPU fraction rcm.plan_devices states is what the CIFAR-10 DDS figure (121 s) calibrates."""
    from rcm.plan_devices import A100_TF32_FRACTION

    got = plan.calibrate_fraction(["config/cifar10.yaml", "config/cifar10-dds.yaml"], "a100-80gb", "tf32",
                                  "dds", 121.0)
    assert got == pytest.approx(A100_TF32_FRACTION, rel=0.01)


# ----------------------------------------------------------------------------------- memory: planned vs measured

def _options(cls, section: dict, **changes):
    return presets._options(cls, {**section, **changes})


def _train_two_steps(run):
    from rcm.train.loop import train

    run.steps, run.eval_fn, run.checkpoint_every = 2, None, 1000
    return lambda: train(run)


def _measured_training(section: str, results: Path, cfg: dict) -> int:
    from rcm.data import load_split
    from rcm import paths

    sec = cfg[section]
    if section == "classifier":
        from rcm.train.classifier import ClassifierOptions, make_run

        run = make_run(_options(ClassifierOptions, sec, steps=2), "digits", str(results), 0.25)
        return plan.measured_peak(_train_two_steps(run), run.model)
    if section == "denoiser":
        from rcm.train.denoiser import DenoiserOptions, make_run

        run = make_run(_options(DenoiserOptions, sec, steps=2, pretrained=""), "digits", str(results))
        return plan.measured_peak(_train_two_steps(run), run.model, run.ema)
    if section == "finetune_denoiser":
        from rcm.models import load_model
        from rcm.train.classifier import ClassifierOptions
        from rcm.train.classifier import make_run as classifier_run
        from rcm.train.denoiser import DenoiserOptions
        from rcm.train.denoiser import make_run as denoiser_run
        from rcm.train.loop import train
        from rcm.train.mdds import FinetuneDenoiserOptions, make_run

        for r in (denoiser_run(_options(DenoiserOptions, cfg["denoiser"], steps=1, pretrained=""), "digits",
                               str(results)),
                  classifier_run(_options(ClassifierOptions, cfg["classifier"], steps=1), "digits", str(results), 0.0)):
            r.eval_fn = None
            train(r)
        run = make_run(_options(FinetuneDenoiserOptions, sec, steps=2), "digits", str(results))
        frozen, _ = load_model(paths.classifier(results, "digits", 0.0), kind="classifier")
        return plan.measured_peak(_train_two_steps(run), run.model, frozen)
    train_split = load_split(paths.prepared(results, "digits", "train"))
    if section == "rrcm_pretrain":
        from rcm.train.rrcm_pretrain import PretrainOptions, build_run

        run = build_run(_options(PretrainOptions, sec, steps=2), train_split, None, results / "pre.pt")
        return plan.measured_peak(_train_two_steps(run), run.model, run.ema)
    from rcm.train.loop import train
    from rcm.train.rrcm_finetune import FinetuneOptions, build_run
    from rcm.train.rrcm_pretrain import PretrainOptions
    from rcm.train.rrcm_pretrain import build_run as pretrain_run

    pre = pretrain_run(_options(PretrainOptions, cfg["rrcm_pretrain"], steps=1), train_split, None,
                       results / "pre.pt")
    train(pre)
    run = build_run(_options(FinetuneOptions, sec, steps=2), 0.25, results / "pre.pt", train_split, None,
                    results / "fine.pt")
    return plan.measured_peak(_train_two_steps(run), run.model)


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("section", plan.SECTIONS)
def test_training_peak_is_within_25_percent_of_a_measured_step(section, amp, digits_results):
    """The plan's peak (meta device, the estimator used at every scale) against two real optimiser steps
    of the stage itself (rcm.train.loop.train on the CPU, under its autocast for bf16), counted as live
    tensor storage by the same Trace."""
    cfg = small_cfg()
    for name in plan.SECTIONS:
        cfg[name]["amp"] = amp
    est = plan.training_estimate(plan.stage_setup(cfg, section, 0.25), plan.per_device_batch(cfg, section), amp, 1,
                                 "cpu")
    measured = _measured_training(section, digits_results, cfg)
    assert est.peak == pytest.approx(measured, rel=0.25), (est.parts, measured)


@pytest.mark.parametrize("method", ["gaussian", "dds", "rrcm"])
def test_certification_peak_is_within_25_percent_of_a_measured_batch(method):
    from rcm.smoothing import Smooth

    cfg = small_cfg()
    batch = cfg["certify"]["batch_size"]
    est = plan.certify_estimate(plan.certified_network(cfg, method, 0.5), (1, 8, 8), batch, "off", "cpu")
    model, _ = presets.base_classifier(cfg, method, 0.5)
    smooth = Smooth(model, 10, 0.5)
    x = torch.rand(1, 8, 8)
    measured = plan.measured_peak(lambda: smooth.sample_counts(x, batch, batch, torch.Generator().manual_seed(0)),
                                  model)
    assert est.peak == pytest.approx(measured, rel=0.25), (est.parts, measured)


# ----------------------------------------------------------------------------------- fit, devices, the workflow

@pytest.mark.slow
@pytest.mark.parametrize("files", PRESETS, ids=lambda f: "+".join(Path(x).stem for x in f))
def test_every_preset_fits_its_80_gb_gpus(files):
    p = plan.make_plan(files, "a100-80gb")
    assert p.rows
    assert all(r["fits"] for r in p.rows), [(r["rule"], r["method"], r.get("advice"), r["fits_runtime"])
                                           for r in p.rows if not r["fits"]]
    assert plan.memory_errors(files) == []


@pytest.mark.parametrize("device", sorted(plan.DEVICES))
def test_the_default_config_plans_on_every_device(device):
    p = plan.make_plan(DEFAULT, device).as_json()
    assert p["device"] == device and p["total_device_hours"] > 0
    assert all(r["seconds_per_image"] > 0 for r in p["rules"] if r["rule"] == "certify")


def test_imagenet_preset_as_it_was_does_not_fit(tmp_path):
    """The issue's four findings: pretraining at 4096 on 8 GPUs in float32, fine-tuning at 1024 x 2 on one
    GPU, the denoiser at 64 x 224 px on one GPU, dds at batch 400 through guided diffusion."""
    old = tmp_path / "old.yaml"
    old.write_text("gpus: {denoiser: 1, classifier: 1, finetune_denoiser: 1, rrcm_pretrain: 8, rrcm_finetune: 1,"
                   " certify: 1}\nnodes: {rrcm_pretrain: 1}\n"
                   "denoiser: {amp: 'off'}\nrrcm_pretrain: {amp: 'off'}\nrrcm_finetune: {amp: 'off'}\n"
                   "certify: {batch_sizes: []}\n")
    errors = plan.memory_errors(["config/imagenet.yaml", str(old)])
    rules = [line.split(":")[0] for line in errors]
    assert {"train_denoiser", "pretrain_rrcm", "finetune_rrcm"} <= set(rules), errors
    pretrain = next(line for line in errors if line.startswith("pretrain_rrcm"))
    assert "exceeds gpu_memory_gb 80 GB; to fit:" in pretrain and "micro_batches" not in pretrain
    dds = plan.memory_errors(["config/imagenet.yaml", "config/imagenet-dds.yaml", str(old)])
    assert [line.split(":")[0] for line in dds] == ["certify (dds)"], dds


def _oversized(repo: Path) -> None:
    cfg = repo / "config/config.yaml"
    cfg.write_text(cfg.read_text().replace("gpu_memory_gb: 0 ", "gpu_memory_gb: {denoiser: 0.001, certify: 0.02} "))


def test_an_oversized_stage_stops_snakemake_before_any_job(tmp_path):
    from test_workflow import make_copy, snakemake

    repo = make_copy(tmp_path / "repo", config=None)
    _oversized(repo)
    r = snakemake(repo, "-n")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    line = "train_denoiser: planned peak 0.018 GB per device exceeds gpu_memory_gb 0.001 GB; to fit:"
    assert line in out, out[-3000:]
    assert "certify (dds): planned peak" in out and "certify.batch_sizes: [dds=" in out
    assert "Job stats" not in out and not (repo / "results").exists()


@pytest.mark.slow
def test_an_oversized_stage_stops_dvc_repro_before_any_job(tmp_path):
    from test_workflow import BIN, dvc_env, make_copy

    repo = make_copy(tmp_path / "repo", config=None)
    _oversized(repo)
    r = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=dvc_env(), capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "train_denoiser: planned peak 0.018 GB per device exceeds gpu_memory_gb 0.001 GB; to fit:" in out, out
    assert re.findall(r"Running stage '([^']+)'", out) == ["prepare"]  # its first command is the check
    assert not (repo / "results").exists()


# ----------------------------------------------------------------------------------- time on this CPU

def _rcm(results: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "rcm", "--threads", "1", *args, "--dataset", "digits",
                        "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def measured_seconds_per_image(results: Path, method: str, images: int = 20) -> float:
    """The mean `time` column of a real `rcm certify` shard (the default protocol, n0 = 100, n = 1000,
    batch 1000, one thread as the workflow runs it) of ``images`` digits test images."""
    import csv

    _rcm(results, "certify", "--method", method, "--sigma", "0.25", "--shard", "0", "--shards", "4",
         "--max_images", str(4 * images), "--device", "cpu")
    from rcm import paths

    rows = list(csv.DictReader(open(paths.certificate(results, "digits", method, "0.25", 0, 4)), delimiter="\t"))
    return sum(float(r["time"]) for r in rows) / len(rows)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RCM_TIMING") != "1",
                    reason="a timing comparison: RCM_TIMING=1 on an otherwise idle machine (docs/plan.md)")
def test_cpu_plan_predicts_certification_seconds_within_30_percent(digits_results):
    """On `--device cpu` (calibrated now, on this machine) the plan's seconds per certified image of the
    default config against real certificates certified right after it. Weights do not change a fixed-n
    certification's cost, so the models are trained for one step. Wall times move with whatever else the
    machine runs (a shared 2-core CI machine: up to 3x), so this runs only when asked, as a benchmark."""
    r = digits_results
    for sigma in ("0.0", "0.25"):
        _rcm(r, "train-classifier", "--sigma", sigma, "--steps", "1", "--eval_every", "1")
    _rcm(r, "train-denoiser", "--steps", "1", "--eval_every", "1")
    _rcm(r, "pretrain-rrcm", "--steps", "1", "--eval_every", "1")
    _rcm(r, "finetune-rrcm", "--sigma", "0.25", "--steps", "1", "--eval_every", "1")
    rows = plan.make_plan(DEFAULT, "cpu").as_json()["rules"]
    planned = {row["method"]: row["seconds_per_image"] for row in rows
               if row["rule"] == "certify" and row["sigma"] == 0.25}
    measured = {m: measured_seconds_per_image(r, m) for m in ("gaussian", "dds", "rrcm")}
    ratios = {m: planned[m] / measured[m] for m in measured}
    print("planned / measured seconds per image:", ratios, planned, measured)
    assert all(0.7 <= q <= 1.3 for q in ratios.values()), ratios


def test_a_real_run_prints_the_plan_first_and_a_dry_run_does_not(tmp_path):
    from test_workflow import TINY, make_copy, run_env

    repo = make_copy(tmp_path / "repo")
    env = dict(run_env(), RCM_PLAN="a100-80gb")
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert dry.returncode == 0 and "rcm plan on" not in dry.stdout + dry.stderr
    real = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", f"{TINY}/digits/data/test.pt"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr[-2000:]
    assert real.stdout.splitlines()[0].startswith("rcm plan on a100-80gb: "), real.stdout[:500]


def test_plan_check_refuses_batch_sizes_naming_no_method():
    """`rcm plan --check` (DVC's first stage) names a certify.batch_sizes entry that no method of the
    config has, and a repeated one: `rcm certify` itself only logs an entry for a method it does not know."""
    cfg = presets.load_config(DEFAULT + [str(ROOT / "examples/custom_method/config.yaml")])
    for entries, problem in ((["median=50", "ddpm=10"], "certify.batch_sizes.1: 'ddpm=10' names no method"),
                             (["dds=5", "dds=6"], "certify.batch_sizes.1: 'dds=6' repeats a method")):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            plan._validate({**cfg, "certify": {**cfg["certify"], "batch_sizes": entries}}, DEFAULT)
    plan._validate({**cfg, "certify": {**cfg["certify"], "batch_sizes": ["median=50"]}}, DEFAULT)
