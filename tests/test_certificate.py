"""Certificate TSVs: Cohen-format writing (atomic, full precision) and reading (ours and published logs)."""

from pathlib import Path

import pytest

from crafted import crafted_pickle, runs_when_unpickled
from rcm.certificate import (COLUMNS, merge_shards, parse_seconds, read_certificate,
                             write_certificate)
from rcm.errors import CertificateError

PUBLISHED = Path(__file__).parent / "fixtures" / "published-certificates" / "cifar10-resnet110-gaussian"


def rows(records, **extra):
    """(label, predict, radius) triples -> certificate rows with idx 0, 1, ..."""
    return [dict(idx=i, label=l, predict=p, radius=r, time=0.1, **extra)
            for i, (l, p, r) in enumerate(records)]


# ---------------------------------------------------------------------------------------------- write

def test_header_order_correct_column_and_abstain(tmp_path):
    path = write_certificate(tmp_path / "c.tsv", rows([(1, 1, 0.5), (2, -1, 0.0), (3, 4, 0.2)], sigma=0.25,
                                                      n=1000), extra_columns=["sigma", "n"])
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS) + ["sigma", "n"]
    assert [line.split("\t")[4] for line in lines[1:]] == ["1", "0", "0"]  # correct
    assert lines[2].split("\t")[2] == "-1"


def test_empty_rows_write_the_header_only(tmp_path):
    path = write_certificate(tmp_path / "e.tsv", [], extra_columns=["sigma"])
    assert path.read_text() == "\t".join(COLUMNS + ("sigma",)) + "\n"
    frame = read_certificate(path)
    assert len(frame) == 0 and list(frame.columns[:6]) == list(COLUMNS)


def test_round_trip_keeps_radius_and_extras_exactly(tmp_path):
    radii = [0.1 + 0.2, 1 / 3, 3.8115048349744006, 1e-17]
    p_lower = [0.9999309248009753, 0.5000000000000001, 0.7, 2 / 3]
    records = rows([(0, 0, r) for r in radii])
    for row, p in zip(records, p_lower):
        row["p_a_lower"] = p
    frame = read_certificate(write_certificate(tmp_path / "c.tsv", records, extra_columns=["p_a_lower"]))
    assert frame.radius.tolist() == radii and frame.p_a_lower.tolist() == p_lower


def test_numpy_and_torch_scalars_are_written_as_plain_numbers(tmp_path):
    import numpy as np
    import torch

    row = dict(idx=np.int64(3), label=torch.tensor(2), predict=2, radius=np.float64(0.25),
               time=np.float32(1.5), count_a=torch.tensor(990))
    path = write_certificate(tmp_path / "c.tsv", [row], extra_columns=["count_a"])
    assert path.read_text().splitlines()[1] == "3\t2\t2\t0.25\t1\t1.5\t990"


def test_a_wrong_correct_or_an_unknown_column_is_refused(tmp_path):
    with pytest.raises(CertificateError, match="correct=1 but predict=-1"):
        write_certificate(tmp_path / "c.tsv", [dict(idx=0, label=1, predict=-1, radius=0.0, correct=1, time=1.0)])
    with pytest.raises(CertificateError, match="sigmaa.*not in the header"):
        write_certificate(tmp_path / "c.tsv", rows([(0, 0, 0.1)], sigmaa=0.5), extra_columns=["sigma"])
    with pytest.raises(CertificateError, match="tab"):
        write_certificate(tmp_path / "c.tsv", rows([(0, 0, 0.5)]) + [dict(idx=1, label=0, predict=0, radius=0.1,
                                                                         time="x\ty")])
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """A write killed halfway leaves neither the certificate nor anything that looks like one."""
    real_write_text = Path.write_text

    def half_then_die(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_certificate(tmp_path / "d.tsv", rows([(0, 0, 0.5)] * 50))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_complete_file(tmp_path, monkeypatch):
    old = write_certificate(tmp_path / "d.tsv", rows([(0, 0, 0.5)])).read_text()
    real_write_text = Path.write_text

    def half_then_die(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_die)
    with pytest.raises(OSError):
        write_certificate(tmp_path / "d.tsv", rows([(1, 1, 0.9)] * 20))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["d.tsv"] and (tmp_path / "d.tsv").read_text() == old


# ----------------------------------------------------------------------------------------------- read

def test_durations_are_seconds():
    assert parse_seconds("0:00:14.114881") == pytest.approx(14.114881)
    assert parse_seconds("1:02:03.5") == 3723.5
    assert parse_seconds("1 day, 0:00:01") == 86401.0 and parse_seconds("2 days, 1:00:00") == 176400.0
    assert parse_seconds("2.25") == 2.25 and parse_seconds("7") == 7.0
    for bad in ["yesterday", "1:2", "0:61:00", "-1.0", "nan", ""]:
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_published_log_reads_unchanged():
    frame = read_certificate(PUBLISHED / "noise_0.12_sigma_0.12.tsv")
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 10_000
    assert frame.time.iloc[0] == pytest.approx(14.114881)  # '0:00:14.114881'
    assert frame.predict.iloc[0] == -1 and frame.radius.iloc[0] == 0.0
    assert str(frame.idx.dtype) == "int64" and str(frame.radius.dtype) == "float64"


def test_extra_columns_are_optional_and_typed(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tn\tflops\tnote\n"
                    "0\t1\t1\t0.5\t1\t2.0\t1000\t\tok\n"
                    "1\t1\t0\t0.0\t0\t2.0\t1000\t5e9\tbad image\n")
    frame = read_certificate(path)
    assert str(frame.n.dtype) == "int64" and frame.flops.isna().tolist() == [True, False]
    assert frame.note.tolist() == ["ok", "bad image"]


def test_missing_file_and_missing_columns_name_the_file(tmp_path):
    with pytest.raises(CertificateError, match=r"nope\.tsv: no such certificate file"):
        read_certificate(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("idx\tlabel\tpredict\tradius\n0\t1\t1\t0.5\n")
    with pytest.raises(CertificateError, match=r"bad\.tsv.*missing required column\(s\) correct, time"):
        read_certificate(bad)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(CertificateError, match="empty"):
        read_certificate(tmp_path / "empty.tsv")


@pytest.mark.parametrize("line, column, why", [
    ("1\t2\t2\tabc\t1\t1.0", "radius", "not a finite"),
    ("1\t2\t2\t-0.5\t1\t1.0", "radius", "non-negative"),
    ("1\t2.5\t2\t0.5\t1\t1.0", "label", "not an integer"),
    ("1\t2\t2\t0.5\t1\tlater", "time", "H:MM:SS"),
    ("1\t2\t3\t0.5\t1\t1.0", "correct", "disagrees with predict == label"),
    ("1\t2\t-1\t0.0\t1\t1.0", "correct", "disagrees"),
    ("1\t2\t2\t0.5\t3\t1.0", "correct", "neither 0/1 nor the running count"),  # 2 would be one
    ("0\t2\t2\t0.5\t1\t1.0", "idx", "repeats"),
])
def test_a_malformed_row_names_its_line(tmp_path, line, column, why):
    path = tmp_path / "m.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.1\t1\t1.0\n" + line + "\n")
    with pytest.raises(CertificateError, match=rf"m\.tsv: line 3: column '{column}'.*{why}"):
        read_certificate(path)


def test_merge_sorts_by_idx_and_rejects_overlapping_shards(tmp_path):
    a = write_certificate(tmp_path / "shard_0-of-2.tsv", [dict(idx=i, label=0, predict=0, radius=0.1, time=1.0)
                                                          for i in (4, 0, 2)])
    b = write_certificate(tmp_path / "shard_1-of-2.tsv", [dict(idx=i, label=0, predict=0, radius=0.1, time=1.0,
                                                               flops=7) for i in (3, 1)], extra_columns=["flops"])
    merged = merge_shards([b, a])
    assert merged.idx.tolist() == [0, 1, 2, 3, 4] and "flops" in merged.columns
    dup = write_certificate(tmp_path / "other.tsv", [dict(idx=2, label=0, predict=0, radius=0.1, time=1.0)])
    with pytest.raises(CertificateError, match=r"idx 2 appears in two shards.*shard_0-of-2.*other\.tsv"):
        merge_shards([a, b, dup])
    with pytest.raises(CertificateError, match="no certificate files"):
        merge_shards([])


def test_a_pickle_where_a_certificate_is_expected_is_refused_unrun(tmp_path):
    """Certificates and published logs are parsed as tab-separated text (pandas' C parser, every cell a
    str): a binary file is refused in one line, and nothing in it is unpickled."""
    marker, path = tmp_path / "ran", tmp_path / "sigma_0.25"
    path.write_bytes(crafted_pickle(marker))
    with pytest.raises(CertificateError, match=f"{path}: not a text file"):
        read_certificate(path)
    assert not marker.exists()
    assert runs_when_unpickled(path, marker)  # the control: the file is live
