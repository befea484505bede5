"""The certify stage: shard-layout invariance, atomic writes, provenance columns, bad inputs."""

import pytest
import torch
from torch import nn

import rcm.certify as certify_mod
from rcm import paths
from rcm.certificate import read_certificate
from rcm.certify import CertifyOptions, certify_shard
from rcm.cli import main as cli
from rcm.errors import ConfigError


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
                        lambda method, sigma, results, dataset, device: NoisyDigitGuesser(int(sigma * 100)))


def _rows(path):
    # time differs between runs by nature; NaN (a cascade that never decided) must compare equal
    return read_certificate(path).drop(columns=["time"]).fillna(-999.0).to_dict("records")


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


def test_interrupted_shard_leaves_no_certificate(digits_results, monkeypatch):
    calls = {"n": 0}

    class Dies(NoisyDigitGuesser):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 5:
                raise KeyboardInterrupt
            return super().forward(x)

    monkeypatch.setattr(certify_mod, "base_classifier", lambda *a, **k: Dies())
    with pytest.raises(KeyboardInterrupt):
        certify_shard(dataset="digits", results=str(digits_results), method="rrcm", sigma="0.25", shard=0,
                      o=CertifyOptions(n0=10, n=50, batch_size=50, skip=10), progress=False)
    folder = paths.certificate(digits_results, "digits", "rrcm", 0.25, 0, 1).parent
    assert not folder.exists() or list(folder.iterdir()) == []


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


def test_sequential_is_refused_for_cascades(digits_results, stub_models):
    with pytest.raises(ConfigError, match="not implemented for cascades"):
        certify_shard(dataset="digits", results=str(digits_results), method="mdds", sigma="cascade",
                      sigmas=[0.5, 0.25], shard=0, o=CertifyOptions(n0=10, n=60), progress=False,
                      sequential=True)
