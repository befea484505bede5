"""The certify stage: shard-layout invariance, atomic writes, provenance columns, bad inputs."""

from pathlib import Path

import pytest
import torch
from torch import nn

from crafted import crafted_pickle, runs_when_unpickled
import rcm.certify as certify_mod
from rcm import paths
from rcm.certificate import read_certificate
from rcm.certify import CertifyOptions, certify_shard
from rcm.cli import main as cli
from rcm.errors import ConfigError
from rcm.partial import MAGIC, partial_path


class NoisyDigitGuesser(nn.Module):
    """A base classifier whose answer depends on the noisy input (so noise matters to the rows)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(64, 10)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(10, 64, generator=g))
            self.lin.bias.copy_(torch.randn(10, generator=g))

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.fixture
def stub_models(monkeypatch):
    monkeypatch.setattr(certify_mod, "base_classifier",
                        lambda method, sigma, results, dataset, device, **k: NoisyDigitGuesser(int(sigma * 100)))


def _rows(path):
    # time differs between runs by nature, the models' paths between results roots; NaN (a cascade that
    # never decided) must compare equal
    return read_certificate(path).drop(columns=["time", "models"]).fillna(-999.0).to_dict("records")


@pytest.mark.parametrize("sigma", ["0.25", "cascade"])
def test_shard_layout_invariance(digits_results, stub_models, sigma):
    common = dict(dataset="digits", results=str(digits_results), method="mdds", sigma=sigma,
                  sigmas=[0.5, 0.25] if sigma == "cascade" else None, progress=False)
    by_layout = {}
    for shards in (1, 2, 5):
        o = CertifyOptions(n0=10, n=60, batch_size=32, skip=9, max_images=0, shards=shards)
        rows = []
        for k in range(shards):
            rows += _rows(certify_shard(shard=k, o=o, **common))
        by_layout[shards] = sorted(rows, key=lambda r: r["idx"])
    assert len(by_layout[1]) == 40  # 360 test images, every 9th
    assert by_layout[1] == by_layout[2] == by_layout[5]
    # noise matters: certifying with another seed changes some rows
    other = _rows(certify_shard(shard=0, o=CertifyOptions(n0=10, n=60, batch_size=32, skip=9, seed=1), **common))
    assert sorted(other, key=lambda r: r["idx"]) != by_layout[1]


def test_certificate_columns_and_provenance(digits_results, stub_models):
    o = CertifyOptions(n0=10, n=50, alpha=0.01, batch_size=25, skip=30, seed=3)
    path = certify_shard(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5",
                         shard=0, o=o, progress=False)
    assert path == paths.certificate(digits_results, "digits", "gaussian", 0.5, 0, 1)
    header = path.read_text().splitlines()[0].split("\t")
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    df = read_certificate(path)
    assert set(df.sigma) == {0.5} and set(df.n0) == {10} and set(df.n) == {50}
    assert set(df.alpha) == {0.01} and set(df.seed) == {3}
    assert (df.flops == 2 * 64 * 10 * (o.n0 + o.n)).all()  # a Linear(64, 10) per draw
    assert list(df.idx) == list(range(0, 360, 30))


def test_a_batch_size_of_a_method_this_job_does_not_know_is_said_and_not_used(digits_results, stub_models,
                                                                              capsys):
    """The workflow gives every certify job the whole certify.batch_sizes list; a built-in's job does not
    register a user's method, so an entry naming one is told, not refused, and the job's own entry wins."""
    o = CertifyOptions(n0=10, n=50, batch_size=25, batch_sizes=["mine=3", "gaussian=20"], skip=90)
    path = certify_shard(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5",
                         shard=0, o=o, progress=False)
    assert set(read_certificate(path).batch_size) == {20}
    assert "certify: batch_sizes: mine: no method registered in this process" in capsys.readouterr().err
    o = CertifyOptions(n0=10, n=50, batch_size=25, batch_sizes=["mine=3"], skip=90)
    path = certify_shard(dataset="digits", results=str(digits_results), method="dds", sigma="0.5",
                         shard=0, o=o, progress=False)
    assert set(read_certificate(path).batch_size) == {25}
    assert "dds certifies with batch_size, 25" in capsys.readouterr().err


def test_interrupted_shard_leaves_no_certificate_and_keeps_its_finished_rows(digits_results, monkeypatch):
    calls = {"n": 0}

    class Dies(NoisyDigitGuesser):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 5:
                raise KeyboardInterrupt
            return super().forward(x)

    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: Dies())
    o = CertifyOptions(n0=10, n=50, batch_size=50, skip=10)
    common = dict(dataset="digits", results=str(digits_results), method="rrcm", sigma="0.25", shard=0, o=o,
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        certify_shard(**common)
    out = paths.certificate(digits_results, "digits", "rrcm", 0.25, 0, 1)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [partial_path(out).name]
    assert len(partial_path(out).read_text().splitlines()) == 1 + 2   # fingerprint, 2 images (2 calls each)
    # the rerun resumes: the two finished images are not certified again, and the result is the
    # uninterrupted run's (time aside)
    calls["n"] = -10 ** 9
    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: NoisyDigitGuesser())
    seen = []
    monkeypatch.setattr(certify_mod.Smooth, "certify_with_details",
                        _recording(certify_mod.Smooth.certify_with_details, seen))
    resumed = _rows(certify_shard(**common))
    assert not partial_path(out).exists() and len(seen) == len(resumed) - 2
    fresh = _rows(certify_shard(**{**common, "results": str(_copy_data(digits_results))}))
    assert resumed == fresh


def _recording(method, seen):
    def wrapper(self, x, *args, **kwargs):
        seen.append(1)
        return method(self, x, *args, **kwargs)
    return wrapper


def _copy_data(results):
    """Another results root with the same prepared data and no certificates."""
    import shutil

    other = Path(str(results) + "_copy")
    shutil.copytree(Path(results) / "digits" / "data", other / "digits" / "data")
    return other


def test_a_partial_file_of_other_settings_is_not_resumed(digits_results, stub_models, capsys):
    o = CertifyOptions(n0=10, n=50, batch_size=50, skip=40)
    common = dict(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5", shard=0,
                  progress=False)
    out = paths.certificate(digits_results, "digits", "gaussian", 0.5, 0, 1)
    partial_path(out).parent.mkdir(parents=True)
    partial_path(out).write_text(MAGIC + '{"protocol": "other"}\n{"idx": 0, "label": 0, "predict": 0}\n')
    rows = _rows(certify_shard(o=o, **common))
    assert "starting this shard over" in capsys.readouterr().err
    assert rows == _rows(certify_shard(o=o, **{**common, "results": str(_copy_data(digits_results))}))


def test_a_partial_file_holding_a_pickle_is_started_over_unrun(digits_results, stub_models, tmp_path, capsys):
    """A partial file is read as text, its rows with json.loads: bytes that are no fingerprint line are
    another run's, never unpickled."""
    o = CertifyOptions(n0=10, n=50, batch_size=50, skip=40)
    common = dict(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5", shard=0,
                  progress=False)
    marker, out = tmp_path / "ran", paths.certificate(digits_results, "digits", "gaussian", 0.5, 0, 1)
    partial_path(out).parent.mkdir(parents=True)
    partial_path(out).write_bytes(crafted_pickle(marker))
    rows = _rows(certify_shard(o=o, **common))
    assert "starting this shard over" in capsys.readouterr().err and not marker.exists()
    assert rows == _rows(certify_shard(o=o, **{**common, "results": str(_copy_data(digits_results))}))
    partial_path(out).write_bytes(crafted_pickle(marker))
    assert runs_when_unpickled(partial_path(out), marker)  # the control: the file is live


@pytest.mark.parametrize("argv,message", [
    (["--method", "bogus", "--sigma", "0.25"], "unknown method 'bogus'"),
    (["--method", "rrcm", "--sigma", "0"], "--sigma must be > 0"),
    (["--method", "rrcm", "--sigma", "-0.5"], "--sigma must be > 0"),
    (["--method", "rrcm", "--sigma", "abc"], "--sigma must be a number"),
    (["--method", "rrcm", "--sigma", "0.25", "--n0", "0"], "n0 and n must be >= 1"),
    (["--method", "rrcm", "--sigma", "0.25", "--n", "0"], "n0 and n must be >= 1"),
    (["--method", "rrcm", "--sigma", "0.25", "--alpha", "1.5"], "alpha must be in (0, 1)"),
    (["--method", "rrcm", "--sigma", "0.25", "--alpha", "0"], "alpha must be in (0, 1)"),
    (["--method", "rrcm", "--sigma", "0.25", "--shard", "2", "--shards", "2"], "--shard must be in [0, 2)"),
    (["--method", "mdds", "--sigma", "cascade"], "a cascade needs --sigmas"),
    (["--method", "rrcm", "--sigma", "0.25", "--amp", "fp8"], "amp must be one of off, bf16, fp16, got 'fp8'"),
    (["--method", "rrcm", "--sigma", "0.25", "--batch_sizes", "dds:10"], "batch_sizes entry 'dds:10'"),
    (["--method", "rrcm", "--sigma", "0.25", "--batch_sizes", "DDS=10"], "batch_sizes entry 'DDS=10'"),
    (["--method", "rrcm", "--sigma", "0.25", "--batch_sizes", "dds=0"], "batch_sizes entry 'dds=0'"),
    (["--method", "rrcm", "--sigma", "0.25", "--batch_sizes", "dds=5", "dds=6"], "batch_sizes names 'dds' twice"),
])
def test_bad_inputs_give_clear_errors(digits_results, argv, message, capsys):
    assert cli(["certify", "--results", str(digits_results), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_named(digits_results, capsys):
    assert cli(["certify", "--results", str(digits_results), "--method", "gaussian", "--sigma", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "classifier_sigma_0.25.pt" in err


def test_validate_rejects_before_loading_models():
    with pytest.raises(ConfigError):
        certify_mod.validate("gaussian", "0.25", 0, CertifyOptions(max_images=-1), [])


def test_sequential_certificates_record_draws_and_match_fixed_n_at_the_targets(digits_results, stub_models,
                                                                                 tmp_path):
    """`rcm certify --sequential`: n is n_max, each row records the draws used, the certificate lies
    beside the fixed-n one (sigma_{s}_sequential), and the report's cost table shows the mean and the
    saving; the prediction is the fixed-n one (same selection draws)."""
    common = ["certify", "--dataset", "digits", "--results", str(digits_results), "--method", "gaussian",
              "--sigma", "0.5", "--n0", "20", "--n", "4000", "--alpha", "0.01", "--batch_size", "500",
              "--skip", "36", "--device", "cpu"]
    fixed = paths.certificate(digits_results, "digits", "gaussian", "0.5", 0, 1)
    sequential = paths.certificate(digits_results, "digits", "gaussian", "0.5", 0, 1, sequential=True)
    assert sequential.parent.name == "sigma_0.5_sequential"
    assert cli(common) == 0
    fixed_rows = read_certificate(fixed)
    assert (fixed_rows["samples"] == 20 + 4000).all()
    assert cli(common + ["--sequential", "--radii", "0", "0.25", "0.5"]) == 0
    assert read_certificate(fixed).equals(fixed_rows)  # the fixed-n certificate is left as it was
    seq = read_certificate(sequential)
    assert (seq["sequential"] == 1).all() and (seq["radii"] == "0 0.25 0.5").all()
    assert (seq["n"] == 4000).all() and (seq["samples"] <= 4020).all() and (seq["samples"] < 4020).any()
    assert seq["flops"].tolist() == pytest.approx((fixed_rows["flops"] / 4020 * seq["samples"]).tolist())
    # abstentions aside, both rules select the same class from the same n0 draws
    both = (seq["predict"] != -1) & (fixed_rows["predict"] != -1)
    assert (seq["predict"][both] == fixed_rows["predict"][both]).all()
    out = tmp_path / "report"
    assert cli(["report", str(fixed), str(sequential), "--out", str(out)]) == 0
    import pandas as pd
    cost = pd.read_csv(out / "cost.csv").set_index("name")
    assert cost.loc["gaussian_sigma_0.5", "draws_per_image"] == 4020
    assert cost.loc["gaussian_sigma_0.5_sequential", "draws_per_image"] == pytest.approx(seq["samples"].mean())
    assert cost.loc["gaussian_sigma_0.5_sequential", "draws_saving"] == pytest.approx(4020 / seq["samples"].mean())
    assert "×" in (out / "cost.md").read_text()


def test_a_cascade_certifies_sequentially_beside_its_fixed_n_certificate(digits_results, stub_models, tmp_path):
    """`rcm certify --method mdds --sigma cascade --sequential`: the certificate lies in
    sigma_cascade_sequential, records each image's draws over every stage it reached (at most
    n0 + n_max per stage, fewer somewhere) and the targets; the report names it
    mdds_cascade_sequential and gives its saving over the fixed-n cascade."""
    common = ["certify", "--dataset", "digits", "--results", str(digits_results), "--method", "mdds",
              "--sigma", "cascade", "--sigmas", "0.5", "0.25", "--n0", "20", "--n", "2000", "--alpha", "0.01",
              "--batch_size", "500", "--skip", "72", "--device", "cpu"]
    fixed = paths.certificate(digits_results, "digits", "mdds", "cascade", 0, 1)
    sequential = paths.certificate(digits_results, "digits", "mdds", "cascade", 0, 1, sequential=True)
    assert sequential.parent.name == "sigma_cascade_sequential"
    assert cli(common) == 0
    fixed_rows = read_certificate(fixed)
    assert (fixed_rows["samples"] == 2020 * fixed_rows["stage"].replace(0, 2)).all()
    assert cli(common + ["--sequential", "--radii", "0", "0.25"]) == 0
    assert read_certificate(fixed).equals(fixed_rows)
    seq = read_certificate(sequential)
    assert (seq["sequential"] == 1).all() and (seq["radii"] == "0 0.25").all() and (seq["n"] == 2000).all()
    reached = seq["stage"].replace(0, 2)
    assert (seq["samples"] <= 2020 * reached).all() and (seq["samples"] < 2020 * reached).any()
    out = tmp_path / "report"
    assert cli(["report", str(fixed), str(sequential), "--out", str(out)]) == 0
    import pandas as pd
    cost = pd.read_csv(out / "cost.csv").set_index("name")
    assert cost.loc["mdds_cascade_sequential", "draws_per_image"] == pytest.approx(seq["samples"].mean())
    assert cost.loc["mdds_cascade_sequential", "draws_saving"] == pytest.approx(
        fixed_rows["samples"].mean() / seq["samples"].mean())


def test_kill_9_mid_shard_then_rerun_equals_an_uninterrupted_run(digits_results, tmp_path):
    """`rcm certify` killed with SIGKILL after a few images: no certificate, the finished rows in the
    partial file; the rerun certifies only the rest, and its certificate is the uninterrupted one."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from rcm.checkpoint import save_checkpoint
    from rcm.models.classifier import Classifier

    torch.manual_seed(0)
    net = Classifier(in_channels=1, num_classes=10, image_size=8, width=4, blocks=1, stages=1)
    save_checkpoint(paths.classifier(digits_results, "digits", 0.5), kind="classifier",
                    model_config=net.config, model_state=net.state_dict(), step=0)
    other = tmp_path / "uninterrupted"
    shutil.copytree(digits_results / "digits", other / "digits")
    argv = ["--method", "gaussian", "--sigma", "0.5", "--n0", "100", "--n", "30000", "--batch_size", "10000",
            "--skip", "30", "--device", "cpu"]

    def certify(results, wait=True):
        cmd = [sys.executable, "-m", "rcm", "--threads", "1", "certify", "--dataset", "digits",
               "--results", str(results), *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-2000:]
            return err
        return proc

    out = paths.certificate(digits_results, "digits", "gaussian", 0.5, 0, 1)
    proc = certify(digits_results, wait=False)
    deadline = time.time() + 300
    while not (partial_path(out).exists() and len(partial_path(out).read_text().splitlines()) >= 1 + 3):
        assert proc.poll() is None and time.time() < deadline, "the shard ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    kept = len(partial_path(out).read_text().splitlines()) - 1
    assert 3 <= kept < 12                                     # 12 images: every 30th of 360
    err = certify(digits_results)
    assert f"resuming after {kept} certified images" in err
    assert not partial_path(out).exists()
    certify(other)
    resumed, fresh = _rows(out), _rows(paths.certificate(other, "digits", "gaussian", 0.5, 0, 1))
    assert len(resumed) == 12 and resumed == fresh


def test_certificates_record_the_arithmetic_after_cohens_columns(digits_results, stub_models):
    """Device model, capability, versions and TF32 switches are columns after Cohen's six (the community's
    scripts read those six by name), and the reader and the report take them."""
    from rcm.certify import PROVENANCE_COLUMNS
    from rcm.precision import arithmetic_provenance

    o = CertifyOptions(n0=10, n=50, batch_size=25, skip=90, tf32=True)
    path = certify_shard(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5",
                         shard=0, o=o, progress=False)
    header = path.read_text().splitlines()[0].split("\t")
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert tuple(header[-len(PROVENANCE_COLUMNS) - 1:]) == (*PROVENANCE_COLUMNS, "models")
    df = read_certificate(path)
    facts = arithmetic_provenance(torch.device("cpu"))
    assert set(df.device_type) == {"cpu"} and set(df.device_name.astype(str)) == {facts["device_name"]}
    assert set(df.torch) == {torch.__version__}
    assert set(df.tf32_matmul) == set(df.tf32_cudnn) == {0}       # TF32 does not exist on a CPU
    assert df.capability.isna().all() and df.cuda.isna().all()
    out = digits_results / "report"
    assert cli(["report", str(path), "--out", str(out)]) == 0


@pytest.fixture
def float32_restored():
    """set_float32 changes process-wide switches: put torch's back after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_tf32_option_sets_both_switches_before_the_models_run(digits_results, monkeypatch, float32_restored):
    seen = []

    class Records(NoisyDigitGuesser):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().forward(x)

    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: Records())
    common = dict(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5", shard=0,
                  progress=False)
    torch.backends.cudnn.allow_tf32 = True             # torch's own default for convolutions
    certify_shard(o=CertifyOptions(n0=10, n=20, batch_size=25, skip=90), **common)
    assert set(seen) == {(False, False)}
    seen.clear()
    certify_shard(o=CertifyOptions(n0=10, n=20, batch_size=25, skip=90, tf32=True), **common)
    assert set(seen) == {(True, True)}


def test_a_partial_file_of_another_gpu_model_or_tf32_setting_is_not_resumed(digits_results, monkeypatch, capsys):
    """CUDA noise depends on the GPU model: a shard interrupted on one GPU and rerun on another starts
    over, so one certificate never mixes two noise streams; on the same model it resumes."""
    from rcm.precision import arithmetic_provenance

    def on(name, tf32=False):
        facts = dict(arithmetic_provenance(torch.device("cpu")), device_name=name, tf32_cudnn=tf32)
        monkeypatch.setattr(certify_mod, "arithmetic_provenance", lambda device: facts)

    calls = {"n": 0}

    class Dies(NoisyDigitGuesser):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 5:          # one pass counts FLOPs, then two per image
                raise KeyboardInterrupt
            return super().forward(x)

    o = CertifyOptions(n0=10, n=50, batch_size=50, skip=30)
    common = dict(dataset="digits", results=str(digits_results), method="rrcm", sigma="0.25", shard=0, o=o,
                  progress=False)
    out = paths.certificate(digits_results, "digits", "rrcm", 0.25, 0, 1)
    seen = []
    monkeypatch.setattr(certify_mod.Smooth, "certify_with_details",
                        _recording(certify_mod.Smooth.certify_with_details, seen))

    def interrupted(name, tf32=False):
        on(name, tf32)
        calls["n"] = 0
        monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: Dies())
        with pytest.raises(KeyboardInterrupt):
            certify_shard(**common)
        assert len(partial_path(out).read_text().splitlines()) == 1 + 2
        monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: NoisyDigitGuesser())
        seen.clear()
        capsys.readouterr()

    interrupted("NVIDIA A100-SXM4-80GB")
    on("NVIDIA A100-SXM4-80GB")                                     # the same GPU model resumes
    rows = read_certificate(certify_shard(**common))
    assert len(seen) == len(rows) - 2 and "resuming after 2" in capsys.readouterr().err
    for name, tf32 in [("NVIDIA H100 80GB HBM3", False), ("NVIDIA A100-SXM4-80GB", True)]:
        interrupted("NVIDIA A100-SXM4-80GB")
        on(name, tf32)                                              # another model, or TF32: start over
        rows = read_certificate(certify_shard(**common))
        assert len(seen) == len(rows) == 12 and "starting this shard over" in capsys.readouterr().err
        assert set(rows.device_name) == {name} and set(rows.tf32_cudnn) == {int(tf32)}


class CountingNet(NoisyDigitGuesser):
    """A network of its own class, so that no other test's compiled code is reused."""


def test_compile_compiles_once_per_shard_whatever_the_batch_shapes(digits_results, monkeypatch):
    """n0 = 7, n = 51, batch 25: batches of 7, 25 and 1 rows; padded to 25, the network is compiled once,
    and the certificate equals the uncompiled one (the padded rows are never counted)."""
    import functools

    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()                 # a backend that counts compilations and runs the graph as is
    shapes = []

    class Net(CountingNet):
        def forward(self, x):
            shapes.append(x.shape[0])
            return super().forward(x)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: Net())
    torch._dynamo.reset()
    common = dict(dataset="digits", results=str(digits_results), method="gaussian", sigma="0.5", shard=0,
                  progress=False)
    o = CertifyOptions(n0=7, n=51, batch_size=25, skip=40)
    plain = _rows(certify_shard(o=o, **common))
    assert {7, 25, 1} <= set(shapes)           # the shard's batch shapes, uncompiled
    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: CountingNet())  # the same weights
    compiled = _rows(certify_shard(o=CertifyOptions(n0=7, n=51, batch_size=25, skip=40, compile=True),
                                   **{**common, "results": str(_copy_data(digits_results))}))
    assert counter.frame_count == 1
    assert compiled == plain
    torch._dynamo.reset()


def test_certify_with_model_files_of_ones_own(digits_results, tmp_path, capsys):
    """`rcm certify --model ROLE=FILE` certifies with that file instead of the results root's, and the
    certificate records each model file used with its sha256; a role the method lacks, a missing file
    and a cascade are refused with one line."""
    import hashlib
    import shutil

    assert cli(["train-classifier", "--results", str(digits_results), "--sigma", "0.5", "--steps", "2",
                "--eval_every", "2", "--batch_size", "16", "--eval_sigmas", "0.5"]) == 0
    mine = tmp_path / "mine.pt"
    shutil.move(paths.classifier(digits_results, "digits", 0.5), mine)        # not under the results root
    common = ["certify", "--results", str(digits_results), "--method", "gaussian", "--sigma", "0.5", "--n0", "10",
              "--n", "30", "--batch_size", "20", "--skip", "180", "--device", "cpu"]
    assert cli([*common, "--model", f"classifier={mine}"]) == 0
    out = paths.certificate(digits_results, "digits", "gaussian", "0.5", 0, 1)
    digest = hashlib.sha256(mine.read_bytes()).hexdigest()
    assert set(read_certificate(out).models) == {f"classifier={mine}@{digest}"}
    for bad, words in [(["--model", f"denoiser={mine}"], "gaussian has no model of that role (its roles: classifier)"),
                       (["--model", f"classifier={tmp_path / 'none.pt'}"], "no such file"),
                       (["--model", "classifier"], "expected ROLE=FILE")]:
        capsys.readouterr()
        assert cli([*common, *bad]) == 2
        assert words in capsys.readouterr().err, bad
    capsys.readouterr()
    assert cli([*common[:6], "cascade", "--sigmas", "0.5", *common[7:], "--model", f"classifier={mine}"]) == 2
    assert "a cascade reads each sigma's models from the results root" in capsys.readouterr().err
