"""The workflow on SLURM: the profile, and the tiny config run for real on a single-node cluster.

`.ci/slurm.sh` installs (Debian, as root) and starts munge, slurmctld and slurmd on this machine;
the test skips, saying why, only where that cannot be done. The node has no GPU, so the run keeps
the profile's resources but drops its GPU requests (gres) and scales memory and time down.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_workflow import REPO, TINY, dry_run, make_copy, overlay, run_env, tail

PROFILE = REPO / "profiles/slurm/config.yaml"
GPU_RULES = {"train_denoiser", "train_classifier", "finetune_denoiser", "pretrain_rrcm",
             "finetune_rrcm", "certify", "certify_cascade", "certify_sequential", "certify_cascade_sequential",
             "certify_custom", "certify_custom_cascade", "certify_custom_sequential",
             "certify_custom_cascade_sequential"}
CPU_RULES = {"prepare", "prepare_train", "report", "import_classifier", "import_denoiser", "import_rrcm",
             "import_rrcm_classifier"}


def workflow_rules() -> set[str]:
    text = "".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    return set(re.findall(r"^\s*rule (\w+):", text, re.M))  # some rules sit in an if/else on the config


def runtime(res: dict, attempt: int) -> int:
    """A profile runtime at ``attempt``: Snakemake evaluates the expression with ``attempt`` bound."""
    return int(eval(str(res["runtime"]), {"__builtins__": {}}, {"attempt": attempt}))


def test_profile_covers_every_rule_and_asks_gpus_where_they_work():
    """A rule name the profile misspells would silently get the defaults; GPUs are not the profile's
    to set (the rules ask for the config's `gpus` as the plugin's `gpu` resource, tests/test_workflow.py),
    no old-style gres; every time limit grows with the attempt."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert set(profile["set-resources"]) == set(profile["set-threads"]) == workflow_rules() == GPU_RULES | CPU_RULES
    for rule, res in profile["set-resources"].items():
        assert "gpu" not in res and "gres" not in res, rule
        assert 0 < runtime(res, 1) < runtime(res, 2) == 2 * runtime(res, 1), rule
        # a GPU rule's memory is the config's `host` share per GPU (workflow/rules/common.smk)
        assert ("mem_mb" not in res) if rule in GPU_RULES else res["mem_mb"] > 0, rule
    assert "slurm_account" not in profile["default-resources"]  # site-specific: see the profile's notes


def test_runtime_grows_with_the_attempt_in_snakemake_itself(tmp_path):
    """The profile's `"N * attempt"` strings are what Snakemake evaluates per attempt: a rule that fails
    once is resubmitted with twice the time limit (checked with the local executor and this profile's
    resource syntax, so no SLURM is needed)."""
    (tmp_path / "Snakefile").write_text(
        "rule r:\n    output: 'out.txt'\n"
        "    shell: 'echo {resources.runtime} {resources.gpu} >> tries.txt; test $(wc -l < tries.txt) -ge 2 && touch {output}'\n")
    profile = yaml.safe_load(PROFILE.read_text())
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof/config.yaml").write_text(yaml.safe_dump(
        {"retries": 1, "set-resources": {"r": {**profile["set-resources"]["certify"], "gpu": 1}}}))
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--profile", "prof", "--resources", "gpu=1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    base = runtime(profile["set-resources"]["certify"], 1)
    assert (tmp_path / "tries.txt").read_text().split() == [str(base), "1", str(2 * base), "1"]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the local SLURM cluster needs Linux")
    state = tmp_path_factory.mktemp("slurm")
    script = str(REPO / ".ci/slurm.sh")
    r = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip(f"SLURM cannot be set up on this machine: {r.stderr.strip()}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield state
    finally:
        subprocess.run(["bash", script, "stop", str(state)], timeout=120)


def cpu_only_resources() -> dict[str, dict]:
    """The profile's per-rule resources fitted to a 2-CPU node (the tiny config asks for no GPUs)."""
    profile = yaml.safe_load(PROFILE.read_text())
    out = {}
    for rule, res in profile["set-resources"].items():
        res = dict(res)
        res.update(mem_mb=min(res.get("mem_mb", 1500), 1500), runtime=min(runtime(res, 1), 60) // 3)
        out[rule] = res
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_workflow_runs_on_slurm(slurm_cluster, tmp_path):
    """Every rule of the tiny config as a SLURM job (one sigma, one shard: 18 jobs, to keep the
    test short on two cores), submitted with the resources the profile gives its rule."""
    repo = make_copy(tmp_path / "repo")
    cascade = {"method": "mdds", "flags": {"sigmas": [0.25], "p0": 0.5}}
    one_of_each = overlay(tmp_path, "one_of_each", {
        "sigmas": [0.25], "shard_ids": [0], "certify": {"shards": 1},
        "cascades": [cascade], "sequential_cascades": [cascade],
        "report": {"planned": ["mdds_sigma_0.25:dds_sigma_0.25"]}})   # the tiny config's pair is at sigma 0.5
    resources = cpu_only_resources()
    args = ["--executor", "slurm", "--profile", "profiles/slurm",
            # no slurmdbd here: no sacct, and no account to charge
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
            "--retries", "0", "--max-threads", "1",
            "--set-resources", *[f"{rule}:{k}={v}" for rule, res in resources.items() for k, v in res.items()],
            "--configfile", one_of_each]
    r = subprocess.run(["timeout", "-k", "30", "1200", sys.executable, "-m", "snakemake", *args],
                       cwd=repo, env=run_env(), capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, tail(r, 6000)
    report = repo / f"{TINY}/digits/report"
    assert (report / "metrics.json").exists() and (report / "certified_accuracy.md").exists()

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(submitted) == len(re.findall(r"^\s+jobid: \d+$", log, re.M)) - 1 == 18  # all but `all`
    # what SLURM ran: every rule, one CPU each (--max-threads 1), the rule's memory and time limit
    squeue = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%k|%C|%l|%m|%T"],
                            capture_output=True, text=True, check=True).stdout
    jobs = {f[0]: f[1:] for f in (line.split("|") for line in squeue.splitlines())}
    seen = set()
    for job_id in submitted:
        comment, cpus, limit, memory, state = jobs[job_id]
        rule = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment).group(1)
        seen.add(rule)
        assert (state, cpus) == ("COMPLETED", "1"), (rule, state, cpus)
        assert limit == f"{resources[rule]['runtime']}:00" and memory == f"{resources[rule]['mem_mb']}M", rule
    # every rule but the imports of pretrained models (their own test runs them: test_workflow_import), and
    # the cascade and sequential rules of a user's method (the tiny config certifies its method with fixed n;
    # test_workflow runs them)
    assert seen == workflow_rules() - {r for r in CPU_RULES if r.startswith("import_")} - {
        "certify_custom_cascade", "certify_custom_sequential", "certify_custom_cascade_sequential"}

    assert dry_run(repo, "--configfile", one_of_each) == []  # complete, as far as Snakemake knows
