"""The benchmark prints its numbers; FLOP counting is exact on a known layer."""

import re

import pytest
import torch
from torch import nn

from rcm.cli import main as cli
from rcm.flops import flops_per_sample


def test_flops_of_a_linear_layer_are_exact():
    assert flops_per_sample(nn.Linear(64, 10), torch.zeros(64)) == 2 * 64 * 10
    conv = nn.Conv2d(1, 4, 3, padding=1)  # 8x8 output, 4 channels, 9 MACs each
    assert flops_per_sample(conv, torch.zeros(1, 8, 8)) == 2 * 8 * 8 * 4 * 9


def test_bench_certify_prints_every_figure(capsys):
    assert cli(["bench", "certify", "--ns", "200", "2000", "--measure_max", "200", "--images", "1",
                "--batch_size", "100", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ["FLOPs per sample", "noise samples/s", "achieved FLOP/s", "measured matmul peak", "fraction of peak"]:
        assert re.search(rf"{label}\s*: [0-9.e+]+", out), label
    assert re.search(r"n=200 \(measured\)", out) and re.search(r"n=2000 \(extrapolated", out)


def test_bench_sequential_prints_both_rules_per_method_and_sigma(digits_results, monkeypatch, capsys):
    import rcm.bench_sequential as bench_sequential
    from stubs import Constant

    monkeypatch.setattr(bench_sequential, "base_classifier",
                        lambda method, sigma, results, dataset, device: Constant(0, 10))
    assert cli(["bench-sequential", "--results", str(digits_results), "--methods", "gaussian", "dds",
                "--sigmas", "0.5", "--n0", "10", "--n", "20000", "--batch_size", "5000", "--skip", "90",
                "--radii", "0", "0.5", "--device", "cpu", "--draws_csv", str(digits_results / "draws.csv")]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| gaussian") or line.startswith("| dds")]
    assert [(r[0].strip("| "), r[2]) for r in rows] == [("gaussian", "fixed"), ("gaussian", "sequential"),
                                                          ("dds", "fixed"), ("dds", "sequential")]
    fixed, seq = rows[0], rows[1]
    assert fixed[3:5] == seq[3:5]  # same certified accuracy at both radii (a constant class-0 model)
    assert float(seq[5]) < 20010 and seq[8].endswith("x") and float(seq[8][:-1]) > 1
    import pandas as pd
    draws = pd.read_csv(digits_results / "draws.csv")
    assert len(draws) == 2 * len(draws.idx.unique()) and set(draws.method) == {"gaussian", "dds"}
    assert float(seq[5]) == pytest.approx(draws[draws.method == "gaussian"].draws.mean(), abs=0.5)
    # the oracle: with p_A = 1 (every draw class 0) a fixed-n bound at alpha reaches t = Phi(r / sigma)
    # after ceil(ln alpha / ln t) draws; the table's mean and ratio are over the certified images
    import math

    from scipy.stats import norm
    g = draws[draws.method == "gaussian"]
    expected = [math.ceil(math.log(0.001) / math.log(norm.cdf(r / 0.5))) for r in g.sequential_radius]
    assert g.oracle_draws.tolist() == pytest.approx(expected, abs=1)
    assert (g.p_a_estimate == 1).all()
    images, seq_draws, oracle, ratio = (c.strip(" |") for c in seq[11:15])
    assert int(images) == len(g) and float(oracle) == pytest.approx(g.oracle_draws.mean(), abs=0.5)
    assert float(seq_draws) == pytest.approx((g.draws - 10).mean(), abs=0.5)
    assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(float(seq_draws) / float(oracle), abs=0.01)
    assert float(ratio[:-1]) >= 1  # no rule at a smaller level beats the oracle at alpha
    assert [int(c) for c in seq[10].split(" / ")] == [  # the draws' spread: <=1k, <=10k, more, all 20010
        (draws.draws <= 1000).sum() // 2, ((draws.draws > 1000) & (draws.draws <= 10000)).sum() // 2,
        ((draws.draws > 10000) & (draws.draws < 20010)).sum() // 2, (draws.draws == 20010).sum() // 2]


def test_bench_certify_measures_amp_against_float32(capsys):
    """--amp/--channels_last run the network as `rcm certify` would; --against_fp32 prints both rates and
    their ratio (numbers vary with the machine; that they are printed, and consistent, is what is tested)."""
    assert cli(["bench", "certify", "--arch", "cifar_resnet20", "--amp", "bf16", "--channels_last",
                "--against_fp32", "--ns", "100", "--measure_max", "100", "--images", "1", "--batch_size", "20",
                "--n0", "10", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"precision\s*: autocast bf16, channels-last", out)
    amp = float(re.search(r"noise samples/s\s*: ([0-9.e+]+)", out).group(1))
    fp32 = float(re.search(r"float32 samples/s\s*: ([0-9.e+]+)", out).group(1))
    ratio = float(re.search(r"speed-up\s*: ([0-9.]+)x over float32", out).group(1))
    assert ratio == pytest.approx(amp / fp32, rel=0.01)
    assert re.search(r"FLOPs per sample\s*: 8\.1[0-9]*e\+07", out)   # ResNet-20: 40.8 M multiply-adds


def test_bench_load_prints_the_rate_of_streamed_batches(tmp_path, monkeypatch, capsys):
    from trees import write_tree

    from rcm import loader
    from rcm.data import prepare

    monkeypatch.setattr(loader, "WORKERS", None)  # restored after --workers
    root = write_tree(tmp_path / "imagenet", per_class=4)
    prepare("imagenet", tmp_path / "results", part="train", root=root, image_size=32, val_fraction=0.25)
    assert cli(["--workers", "1", "bench", "load", "--dataset", "imagenet", "--results", str(tmp_path / "results"),
                "--batch_size", "4", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"load imagenet train \(13 files, streamed, 3 x 32 x 32\), 1 worker\(s\), batch 4: "
                     r"[0-9.e+]+ images/s, [0-9.]+ s per step", out), out


def test_bench_warms_up_every_batch_shape_it_times(monkeypatch, capsys):
    """Every batch size the timed runs use has run before, in a warm-up (compilation, cuDNN's per-shape
    algorithm choice): 250 draws in batches of 100 time shapes 100 and 50; n0 = 30 and n = 170 add 30
    and 70."""
    import rcm.bench as bench
    from rcm.models.classifier import Classifier

    seen, warming = [], []
    net = Classifier(in_channels=1, num_classes=10, image_size=8)
    net.register_forward_pre_hook(lambda m, inputs: seen.append((inputs[0].shape[0], bool(warming))))
    monkeypatch.setattr(bench, "_model", lambda args, device: (net, "a classifier", 10, (1, 8, 8)))
    real = bench.warm_up

    def recording(*a, **k):
        warming.append(1)
        try:
            real(*a, **k)
        finally:
            warming.clear()

    monkeypatch.setattr(bench, "warm_up", recording)
    assert cli(["bench", "certify", "--ns", "170", "--n0", "30", "--measure_max", "250", "--images", "1",
                "--batch_size", "100", "--device", "cpu"]) == 0
    first = next(i for i, (_, w) in enumerate(seen) if w)      # before it: one pass counts the FLOPs
    timed = {b for b, w in seen[first:] if not w}
    assert timed == {100, 50, 30, 70}
    for i, (b, w) in enumerate(seen[first:], first):
        assert w or (b, True) in seen[first:i], f"a batch of {b} timed before any warm-up batch of that size"
    assert bench.batch_shapes(100, 250) == [50, 100] and bench.batch_shapes(100, 30, 170) == [30, 70, 100]
