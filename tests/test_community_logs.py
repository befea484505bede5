"""`rcm report` reads the certification logs of the four papers' public code as those programs write
and name them: Cohen et al. (no extension), Carlini et al. (a running count in `correct`), Jeong &
Shin (ten columns, -2 for an undecided cascade stage) and Lei et al. (no header, no idx).

The writers below follow each program's line format (column order, `{:.3}` radii, `str(timedelta)`
times); the same underlying results written in every format must give the same report.
"""

from __future__ import annotations

import datetime
import re
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rcm.certificate import read_certificate
from rcm.cli import main as cli
from rcm.errors import CertificateError
from rcm.report import certified_accuracy, distinct_labels, load_entries

FIXTURES = Path(__file__).parent / "fixtures" / "published-certificates" / "cifar10-resnet110-gaussian"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


def results(seed: int = 0, n: int = 200) -> list[dict]:
    """Per image: label, prediction (-1 abstains) and radius, with a mix of every case."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(10))
        u = rng.random()
        predict = -1 if u < 0.15 else label if u < 0.75 else (label + 1) % 10
        radius = 0.0 if predict == -1 else float(rng.uniform(0.001, 1.2))
        rows.append(dict(idx=10 * i, label=label, predict=predict, radius=radius,
                         time=datetime.timedelta(seconds=float(rng.uniform(1, 90)))))
    return rows


def three_digits(x: float) -> float:
    return float(f"{x:.3}")


def write_cohen(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in rows:
        lines.append("{}\t{}\t{}\t{:.3}\t{}\t{}".format(r["idx"], r["label"], r["predict"], r["radius"],
                                                       int(r["predict"] == r["label"]), r["time"]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_carlini(path: Path, rows) -> Path:
    """The same lines, but `correct` accumulates over the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, correct = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"], 0
    for r in rows:
        correct += int(r["predict"] == r["label"])
        lines.append("{}\t{}\t{}\t{:.3}\t{}\t{}".format(r["idx"], r["label"], r["predict"], r["radius"],
                                                       correct, r["time"]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_multiscale(path: Path, rows) -> Path:
    """Ten columns; an abstention is written as -2 (undecided stage) on every other occasion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["idx\tlabel\tpredict\tradius\tr_neg\tcorrect\tpred_uc\tcorr_uc\tstage\ttime"]
    abstained = 0
    for r in rows:
        predict = r["predict"]
        if predict == -1:
            predict = -2 if abstained % 2 == 0 else -1
            abstained += 1
        uc = predict if predict >= 0 else r["label"]
        lines.append("{}\t{}\t{}\t{:.3}\t{:.3}\t{}\t{}\t{}\t{}\t{}".format(
            r["idx"], r["label"], predict, r["radius"], -100.0, int(predict == r["label"]), uc,
            int(uc == r["label"]), 0, r["time"]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_rrcm(path: Path, rows) -> Path:
    """No header, no idx: label predict radius correct time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["{}\t{}\t{:.3}\t{}\t{}".format(r["label"], r["predict"], r["radius"],
                                            int(r["predict"] == r["label"]), r["time"]) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_format_reads_to_the_same_results(tmp_path):
    rows = results()
    expected_correct = [int(r["predict"] == r["label"] and r["predict"] != -1) for r in rows]
    expected_radius = [three_digits(r["radius"]) for r in rows]
    files = {
        "cohen": write_cohen(tmp_path / "cohen" / "noise_0.25" / "test" / "sigma_0.25", rows),
        "carlini": write_carlini(tmp_path / "carlini.txt", rows),
        "multiscale": write_multiscale(tmp_path / "sigma_0.25_N10k.tsv", rows),
        "rrcm": write_rrcm(tmp_path / "certify_result_0.25.txt", rows),
    }
    for fmt, path in files.items():
        frame = read_certificate(path)
        assert frame.attrs["format"] == fmt, path
        assert frame["correct"].tolist() == expected_correct, fmt
        assert frame["radius"].tolist() == expected_radius, fmt
        assert (frame["predict"] == -1).sum() == sum(r["predict"] == -1 for r in rows), fmt
        assert frame["time"].tolist() == pytest.approx([r["time"].total_seconds() for r in rows]), fmt
        idx = [r["idx"] for r in rows] if fmt != "rrcm" else list(range(len(rows)))
        assert frame["idx"].tolist() == idx, fmt

    out = tmp_path / "report"
    assert cli(["report", *map(str, files.values()), "--radii", *map(str, RADII), "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "certified_accuracy.csv")
    names = ["sigma_0.25", "carlini", "sigma_0.25_N10k", "certify_result_0.25"]
    assert sorted(tidy["name"].unique()) == sorted(names)
    curves = {n: tidy[tidy.name == n].sort_values("radius").certified_accuracy.tolist() for n in names}
    assert all(c == curves["sigma_0.25"] for c in curves.values()), curves
    assert set(tidy[tidy.name == "certify_result_0.25"].sigma) == {0.25}
    sources = (out / "sources.txt").read_text()
    for fmt, path in files.items():
        (line,) = [ln for ln in sources.splitlines() if str(path) in ln]
        assert line.split("\t")[2] == str(len(rows)) and line.endswith(f"\t{fmt}")


def test_cohens_published_tree_is_named_by_its_files(tmp_path):
    """Cohen et al.'s logs live at noise_S/test/sigma_S, without an extension: each entry is named
    after its file ('sigma_0.25', not 'sigma_0'), and the numbers are the published ones."""
    tree = tmp_path / "data" / "certify" / "cifar10" / "resnet110"
    files = []
    for src in sorted(FIXTURES.glob("*.tsv")):
        noise, sigma = src.stem.split("_sigma_")
        dest = tree / noise / "test" / f"sigma_{sigma}"
        dest.parent.mkdir(parents=True)
        shutil.copy(src, dest)
        files.append(dest)
    out = tmp_path / "report"
    assert cli(["report", *map(str, files), "--radii", *map(str, RADII), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == ["sigma_0.12", "sigma_0.25", "sigma_0.50", "sigma_1.00"]
    assert metrics["sigma_0.50"]["certified_accuracy"]["r=0.5"] == pytest.approx(0.4279, abs=5e-5)
    entries = load_entries(files)
    assert [e.sigma for e in entries] == [0.12, 0.25, 0.5, 1.0]


def test_colliding_file_names_take_the_folders_that_tell_them_apart(tmp_path):
    rows = results(n=20)
    a = write_cohen(tmp_path / "resnet110" / "noise_0.25" / "test" / "sigma_0.25", rows)
    b = write_cohen(tmp_path / "resnet110" / "noise_0.50" / "test" / "sigma_0.25", rows)
    c = write_cohen(tmp_path / "resnet110" / "noise_0.50" / "test" / "sigma_0.50", rows)
    assert distinct_labels([a, b, c]) == ["noise_0.25/test/sigma_0.25", "noise_0.50/test/sigma_0.25",
                                          "sigma_0.50"]
    assert [e.name for e in load_entries([a, b, c])] == distinct_labels([a, b, c])


@pytest.mark.parametrize("text, message", [
    ("1\t2\t0.5\t1\t0:00:01\t7\n", "no header line, and 6 columns"),
    ("idx\tlabel\tpredict\tradius\ttime\n0\t1\t1\t0.5\t1.0\n", "missing required column(s) correct"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t-2\t0.0\t0\t1.0\n", "column 'predict'"),
    ("1\t1\t0.5\t1\t0:00:01\n1\t2\t0.5\t1\t0:00:01\n", "line 2: column 'correct'"),
])
def test_anything_else_is_an_error_naming_the_file_and_column(tmp_path, text, message):
    """-2 is an abstention only in the multi-scale format; a headerless file must be rRCM's."""
    path = tmp_path / "log"
    path.write_text(text)
    with pytest.raises(CertificateError, match=r"log: .*" + re.escape(message)):
        read_certificate(path)


def test_a_carlini_log_whose_count_breaks_is_refused(tmp_path):
    rows = results(n=30)
    path = write_carlini(tmp_path / "log.txt", rows)
    lines = path.read_text().splitlines()
    cells = lines[-1].split("\t")
    cells[4] = str(int(cells[4]) + 1)  # the last running count off by one
    path.write_text("\n".join(lines[:-1] + ["\t".join(cells)]) + "\n")
    with pytest.raises(CertificateError, match=rf"log.txt: line {len(lines)}: column 'correct'"):
        read_certificate(path)
    assert certified_accuracy(read_certificate(write_carlini(tmp_path / "ok.txt", rows)), [0.0])[0] > 0


def test_baselines_are_named_as_given_or_after_their_files(tmp_path):
    rows = results(n=40)
    ours = write_cohen(tmp_path / "mine.tsv", rows)
    cohen = write_cohen(tmp_path / "cohen" / "noise_0.50" / "test" / "sigma_0.50", results(seed=1, n=40))
    rrcm = write_rrcm(tmp_path / "rrcm" / "certify_result_0.5.txt", results(seed=2, n=40))
    out = tmp_path / "report"
    assert cli(["report", str(ours), "--baselines", f"cohen_resnet110={cohen}", str(rrcm),
                "--radii", "0", "0.5", "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "certified_accuracy.csv")
    kinds = tidy.groupby("name", sort=False)["kind"].first().to_dict()
    assert kinds == {"mine": "entry", "cohen_resnet110": "baseline", "certify_result_0.5": "baseline"}
