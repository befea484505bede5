"""Reports and certificate files: the published-log conformance table and the definitions."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rcm import paths
from rcm.certificate import read_certificate, write_certificate
from rcm.cli import main as cli
from rcm.errors import CertificateError
from rcm.report import (abstain_rate, average_certified_radius, certified_accuracy, load_entries,
                        summary)

FIXTURES = Path(__file__).parent / "fixtures" / "published-certificates" / "cifar10-resnet110-gaussian"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
# The table of fixtures/published-certificates/README.md: certified accuracy at RADII, ACR, abstain.
PUBLISHED = {
    "noise_0.12_sigma_0.12": ([0.8317, 0.5977, 0, 0, 0, 0, 0], 0.2758, 0.0324),
    "noise_0.25_sigma_0.25": ([0.7665, 0.6116, 0.4225, 0.2506, 0, 0, 0], 0.4240, 0.0795),
    "noise_0.50_sigma_0.50": ([0.6568, 0.5491, 0.4279, 0.3245, 0.2197, 0.1412, 0.0826], 0.5251, 0.1523),
    "noise_1.00_sigma_1.00": ([0.4715, 0.4094, 0.3377, 0.2768, 0.2213, 0.1722, 0.1328], 0.5105, 0.2955),
}


def test_published_logs_reproduce_the_table(tmp_path):
    files = sorted(FIXTURES.glob("*.tsv"))
    assert [f.stem for f in files] == list(PUBLISHED)
    assert cli(["report", *map(str, files), "--radii", *map(str, RADII), "--out", str(tmp_path)]) == 0
    tidy = pd.read_csv(tmp_path / "certified_accuracy.csv")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name, (accuracies, acr, abstain) in PUBLISHED.items():
        rows = tidy[tidy.name == name].sort_values("radius")
        assert list(rows.radius) == RADII
        assert np.round(rows.certified_accuracy.to_numpy(), 4).tolist() == accuracies
        frame = read_certificate(FIXTURES / f"{name}.tsv")
        assert len(frame) == 10_000
        assert round(average_certified_radius(frame), 4) == acr
        assert round(abstain_rate(frame), 4) == abstain
        assert json.dumps(metrics).count(name) >= 1
    for produced in ["certified_accuracy.md", "certified_accuracy.tex", "certified_accuracy.png",
                     "plot_certified_accuracy.csv", "cost.csv", "cost.md", "sources.txt"]:
        assert (tmp_path / produced).stat().st_size > 0, produced
    assert all(f.name in (tmp_path / "sources.txt").read_text() for f in files)


def _rows(records):
    return [dict(idx=i, label=l, predict=p, radius=r, time=0.1) for i, (l, p, r) in enumerate(records)]


def test_certified_accuracy_counts_abstentions_as_wrong_and_uses_radius_ge_r(tmp_path):
    # label, predict, radius: correct 0.5, correct 0.25, wrong, abstain
    path = write_certificate(tmp_path / "a.tsv", _rows([(1, 1, 0.5), (2, 2, 0.25), (3, 4, 0.9), (5, -1, 0.0)]))
    frame = read_certificate(path)
    assert frame.correct.tolist() == [1, 1, 0, 0]
    assert certified_accuracy(frame, [0.0, 0.25, 0.26, 0.5, 0.51]).tolist() == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert average_certified_radius(frame) == pytest.approx(0.75 / 4)
    assert abstain_rate(frame) == 0.25


def test_envelope_takes_the_best_sigma_per_radius(tmp_path):
    root = tmp_path / "results"
    small = _rows([(0, 0, 0.2)] * 4)                      # sigma 0.25: all correct, small radii
    large = _rows([(0, 0, 0.9), (0, 0, 0.9), (0, 1, 0.5), (0, -1, 0.0)])  # sigma 1.0: half, large
    for sigma, rows in [(0.25, small), (1.0, large)]:
        write_certificate(paths.certificate(root, "digits", "gaussian", sigma, 0, 1), rows)
    files = sorted((root / "digits" / "certify").rglob("*.tsv"))
    table = summary(load_entries(files), [0.0, 0.5])
    env = table[table.kind == "envelope"].iloc[0]
    assert env["name"] == "gaussian_best_sigma_oracle"
    assert (env[0.0], env[0.5]) == (1.0, 0.5) and env["best_sigma"] == "0.25 1.0"


def test_report_cli_rejects_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.tsv"
    bad.write_text("idx\tlabel\n0\t1\n")
    assert cli(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "missing required column" in capsys.readouterr().err
    assert not (tmp_path / "out" / "certified_accuracy.csv").exists()


def _ours(root, method, sigma, shard, num_shards, records, **extra):
    """Write one shard of our own layout; idx are spread over shards like the certify stage does."""
    rows = [dict(idx=shard + num_shards * i, label=l, predict=p, radius=r, time=0.5, **extra)
            for i, (l, p, r) in enumerate(records)]
    return write_certificate(paths.certificate(root, "digits", method, sigma, shard, num_shards), rows,
                             extra_columns=list(extra))


def test_sequential_certificates_sit_beside_fixed_n_ones(tmp_path):
    """`sigma_{s}_sequential` folders are their own entries, after the method's fixed-n ones, with
    their own envelope (modes are not mixed), a dotted curve in the fixed twin's colour, and the
    cost table's saving = (n0 + n_max) / mean draws."""
    from rcm.report import cost, line_styles

    root = tmp_path / "results"
    fixed = dict(n0=10, n=90, samples=100)
    files = []
    for sigma in (0.25, 0.5):
        files.append(_ours(root, "gaussian", sigma, 0, 1, [(0, 0, 0.6), (1, 1, 0.2)], **fixed))
        rows = [dict(idx=i, label=i, predict=i, radius=r, time=0.1, n0=10, n=90, samples=m, sequential=1)
                for i, (r, m) in enumerate([(0.5, 20), (0.1, 30)])]
        files.append(write_certificate(paths.certificate(root, "digits", "gaussian", sigma, 0, 1, True), rows,
                                       extra_columns=["n0", "n", "samples", "sequential"]))
    entries = load_entries(files)
    assert [e.name for e in entries] == ["gaussian_sigma_0.25", "gaussian_sigma_0.5",
                                         "gaussian_sigma_0.25_sequential", "gaussian_sigma_0.5_sequential"]
    assert [e.sequential for e in entries] == [False, False, True, True]
    table = summary(entries, [0.0, 0.5])
    assert table.name.tolist() == [e.name for e in entries[:2]] + ["gaussian_best_sigma_oracle"] + [
        e.name for e in entries[2:]] + ["gaussian_sequential_best_sigma_oracle"]
    c = cost(entries).set_index("name")
    assert c.loc["gaussian_sigma_0.5_sequential", "draws_per_image"] == 25
    assert c.loc["gaussian_sigma_0.5_sequential", "draws_saving"] == pytest.approx(100 / 25)
    assert np.isnan(c.loc["gaussian_sigma_0.5", "draws_saving"])
    styles = line_styles(entries)
    assert styles["gaussian_sigma_0.5_sequential"]["color"] == styles["gaussian_sigma_0.5"]["color"]
    assert styles["gaussian_sigma_0.5_sequential"]["linestyle"] == ":"
    assert styles["gaussian_sigma_0.25"]["color"] != styles["gaussian_sigma_0.5"]["color"]


def test_a_sequential_cascade_sits_beside_the_fixed_n_cascade_with_its_draws(tmp_path):
    """`sigma_cascade_sequential` is the entry `{method}_cascade_sequential`; the cost table gives
    its draws per image and its saving over the fixed-n cascade's mean draws (stages reached)."""
    from rcm.report import cost, line_styles

    root = tmp_path / "results"
    common = dict(n0=10, n=90, alpha=0.001, alpha_split="uniform", alpha_guaranteed=0.001)
    fixed = [dict(idx=i, label=i, predict=i, radius=0.3, time=0.1, stage=s, samples=100 * s, **common)
             for i, s in enumerate([1, 2, 2, 1])]  # mean 150 draws
    seq = [dict(idx=i, label=i, predict=i, radius=0.25, time=0.1, stage=s, samples=m, sequential=1,
                radii="0 0.25", **common) for i, (s, m) in enumerate([(1, 20), (2, 50), (2, 60), (1, 20)])]
    files = [write_certificate(paths.certificate(root, "digits", "mdds", "cascade", 0, 1, sequential), rows,
                               extra_columns=[c for c in rows[0] if c not in ("idx", "label", "predict",
                                                                              "radius", "time")])
             for sequential, rows in ((True, seq), (False, fixed))]
    entries = load_entries(files)
    assert [e.name for e in entries] == ["mdds_cascade", "mdds_cascade_sequential"]
    assert [e.sequential for e in entries] == [False, True]
    c = cost(entries).set_index("name")
    assert c.loc["mdds_cascade_sequential", "draws_per_image"] == pytest.approx(37.5)
    assert c.loc["mdds_cascade_sequential", "draws_saving"] == pytest.approx(150 / 37.5)
    assert np.isnan(c.loc["mdds_cascade", "draws_saving"])
    assert cost(entries[1:]).set_index("name").draws_saving.isna().all()  # no twin: no saving
    styles = line_styles(entries)
    assert styles["mdds_cascade_sequential"]["color"] == styles["mdds_cascade"]["color"]
    assert styles["mdds_cascade_sequential"]["linestyle"] == ":"
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", "0", "0.25", "--out", str(out)]) == 0
    assert "| mdds_cascade_sequential | off | 4 | 0.1 | 37.5 | 4.0× |" in (out / "cost.md").read_text()


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """The body rows (cells) of each Markdown table in ``text``."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append([c.strip() for c in line.strip("|").split("|")])
        else:
            current = None
    return [t[2:] for t in tables]  # without header and rule


def test_shards_group_into_named_entries_in_method_order(tmp_path):
    root = tmp_path / "results"
    files = [
        _ours(root, "mdds", "cascade", 0, 1, [(0, 0, 0.3)] * 2),
        _ours(root, "gaussian", 0.5, 1, 2, [(0, 0, 0.6), (1, -1, 0.0)], n0=10, n=90, flops=2e6),
        _ours(root, "gaussian", 0.5, 0, 2, [(0, 0, 0.4), (1, 2, 0.1)], n0=10, n=90, flops=2e6),
        _ours(root, "gaussian", 0.25, 0, 1, [(0, 0, 0.4)] * 4),
    ]
    other = write_certificate(tmp_path / "mine.tsv", _rows([(0, 0, 0.1)]))
    baseline = FIXTURES / "noise_0.25_sigma_0.25.tsv"
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), str(other), "--baselines", str(baseline),
                "--radii", "0", "0.5", "--out", str(out)]) == 0

    tables = _markdown_tables((out / "certified_accuracy.md").read_text())
    table = [row[0] for row in tables[0]]
    assert table == ["gaussian_sigma_0.25", "gaussian_sigma_0.5", "mdds_cascade", "mine", "noise_0.25_sigma_0.25"]
    assert [row[0] for row in tables[1]] == ["gaussian_best_sigma_oracle"]  # the oracle apart, never bold
    assert not any("**" in cell for cell in tables[1][0])
    tidy = pd.read_csv(out / "certified_accuracy.csv")
    half = tidy[tidy.name == "gaussian_sigma_0.5"]
    assert half.certified_accuracy.tolist() == [0.5, 0.25]  # 4 images from 2 shards, 1 abstention
    assert set(tidy[tidy.name == "noise_0.25_sigma_0.25"].kind) == {"baseline"}
    assert tidy[tidy.name == "gaussian_best_sigma_oracle"].sigma.astype(str).tolist() == ["0.25", "0.5"]  # best sigma per radius
    assert "mdds_best_sigma_oracle" not in set(tidy.name)  # a cascade is not a per-sigma entry

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gaussian_sigma_0.5"]["abstain_rate"] == 0.25
    assert metrics["gaussian_sigma_0.5"]["acr"] == pytest.approx((0.6 + 0.4) / 4)
    assert metrics["gaussian_best_sigma_oracle"]["certified_accuracy"] == {"r=0": 1.0, "r=0.5": 0.25}
    assert "acr" not in metrics["gaussian_best_sigma_oracle"]

    cost = pd.read_csv(out / "cost.csv").set_index("name")
    assert cost.loc["gaussian_sigma_0.5", "flops_per_image"] == 2e6
    assert cost.loc["gaussian_sigma_0.5", "samples_per_second"] == pytest.approx(100 / 0.5)
    assert np.isnan(cost.loc["gaussian_sigma_0.25", "flops_per_image"])
    assert cost.loc["noise_0.25_sigma_0.25", "seconds_per_image"] == pytest.approx(15.0059415253)

    curves = pd.read_csv(out / "plot_certified_accuracy.csv")  # long: one series per entry
    assert list(curves.columns) == ["name", "radius", "certified_accuracy"]
    assert list(curves.name.unique()) == table  # no envelope curve
    for name, curve in curves.groupby("name", sort=False):
        assert curve.radius.iloc[0] == 0 and (curve.radius.diff().iloc[1:] > 0).all()
        assert (curve.certified_accuracy.diff().iloc[1:] <= 0).all(), name
        frame = next(e.frame for e in load_entries(files + [other], [baseline]) if e.name == name)
        assert curve.certified_accuracy.tolist() == pytest.approx(certified_accuracy(frame, curve.radius))
    sources = (out / "sources.txt").read_text()
    assert all(str(f) in sources for f in files + [other, baseline])
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bold_marks_each_best_but_not_an_all_zero_column(tmp_path):
    a = write_certificate(tmp_path / "a_b.tsv", _rows([(0, 0, 0.3), (1, 1, 0.3)]))
    b = write_certificate(tmp_path / "c.tsv", _rows([(0, 0, 0.4), (1, 2, 0.0)]))
    out = tmp_path / "out"
    assert cli(["report", str(a), str(b), "--radii", "0", "0.35", "1", "--out", str(out)]) == 0
    md = (out / "certified_accuracy.md").read_text().splitlines()
    assert md[2] == "| a_b | 2 | **1.0000 (0.16–1.00)** | 0.0000 (0.00–0.84) | 0.0000 (0.00–0.84) | **0.3000** | 0.0000 |"
    assert md[3] == "| c | 2 | 0.5000 (0.01–0.99) | **0.5000 (0.01–0.99)** | 0.0000 (0.00–0.84) | 0.2000 | 0.0000 |"
    tex = (out / "certified_accuracy.tex").read_text()
    assert "a\\_b & 2 & \\textbf{1.0000 (0.16--1.00)}" in tex and "\\toprule" in tex


def test_a_partial_set_of_shards_or_overlapping_shards_is_refused(tmp_path, capsys):
    root = tmp_path / "results"
    first = _ours(root, "dds", 0.5, 0, 3, [(0, 0, 0.3)])
    third = _ours(root, "dds", 0.5, 2, 3, [(0, 0, 0.3)])
    with pytest.raises(CertificateError, match="shards 1 of 3 are missing"):
        load_entries([first, third])
    second = write_certificate(paths.certificate(root, "digits", "dds", 0.5, 1, 3), _rows([(0, 0, 0.3)]))  # idx 0 again
    assert cli(["report", str(first), str(second), str(third), "--out", str(tmp_path / "out")]) == 2
    assert "idx 0 appears in two shards" in capsys.readouterr().err


def test_names_rename_entries_in_order_and_must_match_their_number(tmp_path):
    a = write_certificate(tmp_path / "a.tsv", _rows([(0, 0, 0.3)]))
    b = write_certificate(tmp_path / "b.tsv", _rows([(0, 0, 0.3)]))
    assert [e.name for e in load_entries([a], [b], names=["ours", "theirs"])] == ["ours", "theirs"]
    with pytest.raises(CertificateError, match="--names gives 1 name"):
        load_entries([a, b], names=["x"])
    with pytest.raises(CertificateError, match="two entries are named 'x'"):
        load_entries([a, b], names=["x", "x"])


def test_no_envelope_over_different_image_sets(tmp_path, capsys):
    """Per-sigma entries of one method that certify different images get no envelope row: each
    sigma's accuracy would have another denominator."""
    root = tmp_path / "results"
    rows = lambda k, r: [dict(idx=i, label=0, predict=0, radius=r, time=0.1) for i in range(k)]  # noqa: E731
    write_certificate(paths.certificate(root, "digits", "rrcm", 0.25, 0, 1), rows(4, 0.2))
    write_certificate(paths.certificate(root, "digits", "rrcm", 0.5, 0, 1), rows(2, 0.9))
    table = summary(load_entries(sorted((root / "digits" / "certify").rglob("*.tsv"))), [0.0])
    assert "envelope" not in set(table["kind"])
    assert "no envelope for 'rrcm'" in capsys.readouterr().err


def test_intervals_are_clopper_pearson_and_envelopes_have_none(tmp_path):
    from scipy.stats import binomtest

    from rcm.report import tidy

    root = tmp_path / "results"
    records = [(0, 0, 0.6)] * 7 + [(0, 0, 0.1)] * 5 + [(0, 1, 0.3)] * 3
    files = [_ours(root, "gaussian", s, 0, 1, records) for s in (0.25, 0.5)]
    table = summary(load_entries(files), [0.0, 0.5])
    rows = tidy(table, [0.0, 0.5])
    for _, row in rows[rows.kind == "entry"].iterrows():
        k = round(row.certified_accuracy * 15)
        ci = binomtest(k, 15).proportion_ci(0.95, method="exact")  # SciPy's own Clopper-Pearson
        assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert rows[rows.kind == "envelope"][["ci_low", "ci_high"]].isna().all().all()


def test_paired_tests_are_exact_mcnemar_on_the_same_images(tmp_path):
    from scipy.stats import binomtest

    from rcm.report import paired_tests

    root = tmp_path / "results"
    # 40 images: a certifies at r = 0.5 images 0..29, b images 20..39 (and 10 more at r = 0 only)
    a = [(0, 0, 0.6)] * 30 + [(0, 1, 0.0)] * 10
    b = [(0, 0, 0.1)] * 10 + [(0, 0, 0.0)] * 10 + [(0, 0, 0.7)] * 20
    files = [_ours(root, "gaussian", 0.25, 0, 1, a), _ours(root, "rrcm", 0.25, 0, 1, b),
             _ours(root, "dds", 0.25, 0, 1, a[:39])]  # one image fewer: not paired with the others
    paired = paired_tests(load_entries(files), [0.0, 0.5])
    assert set(zip(paired.a, paired.b)) == {("gaussian_sigma_0.25", "rrcm_sigma_0.25")}
    at = paired.set_index("radius")
    assert (at.loc[0.5, "a_only"], at.loc[0.5, "b_only"]) == (20, 10)
    assert at.loc[0.5, "p_value"] == pytest.approx(binomtest(20, 30, 0.5).pvalue)
    assert (at.loc[0.0, "a_only"], at.loc[0.0, "b_only"]) == (0, 10)
    assert at.loc[0.0, "p_value"] == pytest.approx(2 * 0.5 ** 10)


def _images(certified: set, total: int = 100) -> list:
    """Rows of one entry: image i correct with radius 0.6 if i is in ``certified``, else abstaining."""
    return [(0, 0, 0.6) if i in certified else (0, -1, 0.0) for i in range(total)]


def test_best_means_ahead_of_every_entry_not_just_the_runner_up(tmp_path):
    """The best entry (60 images) leads its runner-up, a near-copy certifying 52 of the same images,
    significantly (8 against 0, p = 0.0078), but not a third, less correlated entry (50 images:
    20 against 10, p = 0.099). One McNemar test against the runner-up would call it best; the
    intersection-union test does not, and names the entry it failed against."""
    from scipy.stats import binomtest

    root = tmp_path / "results"
    best = set(range(60))
    files = [_ours(root, "gaussian", 0.25, 0, 1, _images(best)),
             _ours(root, "dds", 0.25, 0, 1, _images(set(range(52)))),
             _ours(root, "rrcm", 0.25, 0, 1, _images(set(range(40)) | set(range(60, 70))))]
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", "0.5", "--out", str(out)]) == 0
    line = (out / "certified_accuracy.md").read_text().split("- r = 0.5:")[1].splitlines()[0]
    assert line.startswith(" gaussian_sigma_0.25 (0.6000): not shown best")
    assert "rrcm_sigma_0.25 (0.5000, 20 against 10 images" in line
    assert f"McNemar p = {binomtest(20, 30).pvalue:.3g}" in line and "dds_sigma_0.25" not in line
    # the runner-up alone was significantly behind: the old one-test rule would have claimed best
    paired = pd.read_csv(out / "paired_tests.csv")
    runner_up = paired[(paired.a == "gaussian_sigma_0.25") & (paired.b == "dds_sigma_0.25")]
    assert float(runner_up.p_value.iloc[0]) == pytest.approx(2 * 0.5 ** 8) and 2 * 0.5 ** 8 < 0.05

    # a third entry that the best one also beats: now it is best, with the largest pairwise p
    files[2] = _ours(tmp_path / "r2", "rrcm", 0.25, 0, 1, _images(set(range(35)) | {60, 61}))
    files[:2] = [_ours(tmp_path / "r2", m, 0.25, 0, 1, _images(c))
                 for m, c in (("gaussian", best), ("dds", set(range(52))))]
    assert cli(["report", *map(str, files), "--radii", "0.5", "--out", str(out)]) == 0
    line = (out / "certified_accuracy.md").read_text().split("- r = 0.5:")[1].splitlines()[0]
    p_max = max(2 * 0.5 ** 8, binomtest(25, 27).pvalue)
    assert line == (f" gaussian_sigma_0.25 (0.6000): best, ahead of every other entry (intersection-union "
                    f"test: largest pairwise McNemar p = {p_max:.3g} < 5%)")


def test_ties_and_unpaired_entries_are_not_beaten(tmp_path):
    root = tmp_path / "results"
    files = [_ours(root, "gaussian", 0.25, 0, 1, _images(set(range(60)))),
             _ours(root, "dds", 0.25, 0, 1, _images(set(range(10, 70)))),
             _ours(root, "rrcm", 0.25, 0, 1, _images(set(range(5)), total=99))]
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", "0.5", "--out", str(out)]) == 0
    line = (out / "certified_accuracy.md").read_text().split("- r = 0.5:")[1].splitlines()[0]
    assert "not shown best" in line and "dds_sigma_0.25 (0.6000, 10 against 10 images" in line
    assert "rrcm_sigma_0.25 (0.0505, not certified on the same images)" in line


def test_holm_adjusts_over_the_pairs_of_one_radius():
    from rcm.report import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and len(holm([])) == 0
    # family-wise error under the global null: P(any adjusted p < 5%) <= 5% (15 independent true
    # nulls); unadjusted p-values reject one of them in 1 - 0.95^15 = 54% of the families
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(20_000, 15))
    adjusted = np.apply_along_axis(holm, 1, p)
    assert (adjusted < 0.05).any(axis=1).mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 20_000)
    assert (p < 0.05).any(axis=1).mean() > 0.5


def test_paired_tests_carry_holm_and_planned_and_the_report_quotes_only_those(tmp_path):
    from rcm.report import holm

    root = tmp_path / "results"
    files = [_ours(root, "gaussian", 0.25, 0, 1, _images(set(range(60)))),
             _ours(root, "dds", 0.25, 0, 1, _images(set(range(52)))),
             _ours(root, "rrcm", 0.25, 0, 1, _images(set(range(40)) | set(range(60, 70))))]
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", "0", "0.5", "--planned",
                "rrcm_sigma_0.25:dds_sigma_0.25", "--out", str(out)]) == 0
    paired = pd.read_csv(out / "paired_tests.csv")
    assert list(paired.columns) == ["radius", "a", "b", "a_only", "b_only", "p_value", "p_holm", "planned"]
    for r, at in paired.groupby("radius"):
        assert len(at) == 3 and at.p_holm.to_numpy() == pytest.approx(holm(at.p_value.to_numpy()))
    assert set(zip(paired[paired.planned].a, paired[paired.planned].b)) == {("dds_sigma_0.25", "rrcm_sigma_0.25")}
    md = (out / "certified_accuracy.md").read_text()
    planned = md.split("Planned comparisons")[1].split("\n\n")[1]
    assert ("- r = 0.5: rrcm_sigma_0.25 against dds_sigma_0.25: 10 against 12 images, McNemar p = "
            f"{paired[(paired.radius == 0.5) & paired.planned].p_value.iloc[0]:.3g}, not significant at 5% "
            "(planned, unadjusted)") in planned
    holm_part = md.split("after Holm's adjustment")[1]
    at = paired[paired.radius == 0.5].set_index("b")
    assert f"gaussian_sigma_0.25 over dds_sigma_0.25 (p_holm = {at.loc['dds_sigma_0.25', 'p_holm']:.3g})" in holm_part
    assert "- r = 0.5: 1 of 3 pairs:" in holm_part
    # every p-value the Markdown quotes is a planned one, one of a best claim's intersection-union
    # test, or a Holm-adjusted one
    quoted = [line for line in md.splitlines() if line.startswith("- r = ") and " p" in line]
    assert len(quoted) == 6
    for line in quoted:
        assert ("(planned, unadjusted)" in line or "shown best" in line or "best, ahead" in line
                or ("p_holm = " in line and "McNemar" not in line))
    with pytest.raises(CertificateError, match="nosuch"):
        from rcm.report import load_entries as load, write_report
        write_report(load(files), [0.5], tmp_path / "x", ["nosuch:dds_sigma_0.25"])
    with pytest.raises(CertificateError, match="A:B"):
        write_report(load(files), [0.5], tmp_path / "x", ["dds_sigma_0.25"])


def test_a_harmonic_cascade_is_named_and_its_weaker_guarantee_warned(tmp_path, capsys):
    from rcm.cascade import guaranteed_alpha

    root = tmp_path / "results"
    extra = dict(alpha=0.001, alpha_split="harmonic", alpha_guaranteed=guaranteed_alpha(0.001, 3, "harmonic"))
    files = [_ours(root, "mdds", "cascade", 0, 1, [(0, 0, 0.3)] * 4, **extra)]
    assert extra["alpha_guaranteed"] == pytest.approx(0.001 * (2 * (1 + 1 / 2 + 1 / 3) - 1))
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--out", str(out)]) == 0
    md = (out / "certified_accuracy.md").read_text()
    assert "| mdds_cascade_harmonic |" in md and "**Warning**" in md and "0.00267" in md
    assert "mdds_cascade_harmonic" in capsys.readouterr().err
    uniform = [_ours(root, "rrcm", "cascade", 0, 1, [(0, 0, 0.3)] * 4, alpha=0.001, alpha_split="uniform",
                     alpha_guaranteed=guaranteed_alpha(0.001, 3))]
    assert [e.name for e in load_entries(uniform)] == ["rrcm_cascade"]
    assert cli(["report", *map(str, uniform), "--out", str(tmp_path / "u")]) == 0
    assert "Warning" not in (tmp_path / "u" / "certified_accuracy.md").read_text()


def test_a_users_method_is_reported_after_the_built_ins_with_paired_tests(tmp_path):
    """A method folder that is not a built-in (a custom method's certificates) becomes entries after the
    four built-ins (then by name), with an oracle and paired tests like theirs."""
    root = tmp_path / "results"
    files = [
        _ours(root, "zeta", 0.25, 0, 1, [(0, 0, 0.4), (1, 1, 0.2)]),
        _ours(root, "alpha", 0.25, 0, 1, [(0, 0, 0.3), (1, 2, 0.0)]),
        _ours(root, "rrcm", 0.25, 0, 1, [(0, 0, 0.5), (1, 1, 0.1)]),
        _ours(root, "dds", 0.25, 0, 1, [(0, 0, 0.5), (1, 1, 0.1)]),
    ]
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", "0", "0.25", "--out", str(out)]) == 0
    table = [row[0] for row in _markdown_tables((out / "certified_accuracy.md").read_text())[0]]
    assert table == ["dds_sigma_0.25", "rrcm_sigma_0.25", "alpha_sigma_0.25", "zeta_sigma_0.25"]
    paired = pd.read_csv(out / "paired_tests.csv")
    assert {"alpha_sigma_0.25", "zeta_sigma_0.25"} <= set(paired["a"]) | set(paired["b"])


def test_a_planned_pair_whose_entry_was_not_certified_is_left_out_and_said(tmp_path, capsys):
    """A run of fewer sigmas or methods than the config plans for (a one-sigma check, a preset on a
    CPU) reports what it has: the planned pairs it can test, and one line naming those it cannot."""
    root = tmp_path / "results"
    files = [_ours(root, "gaussian", 0.25, 0, 1, _images(set(range(60)))),
             _ours(root, "dds", 0.25, 0, 1, _images(set(range(52))))]
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--planned", "dds_sigma_0.25:gaussian_sigma_0.25",
                "mdds_sigma_0.5:dds_sigma_0.5", "--out", str(out)]) == 0
    assert ("planned comparisons left out, an entry of each is not in this report: mdds_sigma_0.5:dds_sigma_0.5"
            in capsys.readouterr().err)
    paired = pd.read_csv(out / "paired_tests.csv")
    assert {frozenset(p) for p in zip(paired[paired.planned].a, paired[paired.planned].b)} == {
        frozenset({"dds_sigma_0.25", "gaussian_sigma_0.25"})}
