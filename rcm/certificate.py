"""Certificate files: one TSV row per certified image (DESIGN.md section 9).

The format is the one of Cohen et al.'s public analysis scripts, so the community's tools read our
files and we read theirs: tab-separated, a header first, the columns

    idx  label  predict  radius  correct  time

and then any extra columns (``sigma n0 n alpha count_a p_a_lower flops ...``). ``predict`` is -1 for
ABSTAIN, ``correct`` is 1 iff ``predict == label``, ``radius`` is an L2 radius in [0, 1] pixel units
written at full precision, ``time`` is seconds. Published logs write ``time`` as an ``H:MM:SS.ffffff``
duration; the reader accepts both.

The reader also takes the logs that the four papers' public code writes, as they are
(``read_certificate(...).attrs["format"]`` says which it recognised):

- ``cohen``: Cohen et al.'s ``certify.py`` (and ours): the header above, ``correct`` 0/1.
- ``carlini``: Carlini et al.'s denoised-smoothing ``certify.py``: the same header, but ``correct``
  holds the running count of correct predictions so far; it is read back as 0/1 per row.
- ``multiscale``: Jeong & Shin's ``certify.py``: ``idx label predict radius r_neg correct pred_uc
  corr_uc stage time``; ``predict`` = -2 (a cascade stage that could not decide) is an abstention.
- ``rrcm``: Lei et al.'s ``certify.py``: no header and no idx, ``label predict radius correct time``;
  ``idx`` becomes the row number (that code certifies a seeded random order of the test set, the same
  order in each of its per-sigma files).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from rcm.atomic import atomic_path
from rcm.errors import CertificateError

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
ABSTAIN = -1
RRCM_COLUMNS = ("label", "predict", "radius", "correct", "time")  # headerless, one per row
MULTISCALE_UNDECIDED = -2  # Jeong & Shin's cascade: a stage's bounds straddle the threshold
_INT_COLUMNS = ("idx", "label", "predict", "correct")

# "0:00:14.114881", "12:03:07", and str(timedelta) of a day or more: "1 day, 2:03:04.5"
_INT = re.compile(r"^[+-]?\d+$")
_DURATION = re.compile(r"^(?:(\d+) days?, )?(\d+):([0-5]\d):([0-5]\d(?:\.\d*)?)$")


# ---------------------------------------------------------------------------------------------- write

def _cell(value, column: str, row_number: int) -> str:
    """Text of one value. Floats use repr, so reading the file back gives the identical float."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # repr of np.float64 is 'np.float64(...)': convert first
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d numpy / torch scalar
        return _cell(value.item(), column, row_number)
    text = str(value)
    if "\t" in text or "\n" in text or "\r" in text:
        raise CertificateError(f"row {row_number}: column '{column}' holds a tab or newline: {text!r}")
    return text


def _normalise_row(row: Mapping, row_number: int) -> dict:
    """Fill in ``correct`` from predict/label, or check it when the caller gave one."""
    missing = [c for c in COLUMNS if c not in row and c != "correct"]
    if missing:
        raise CertificateError(f"row {row_number} lacks column(s) {', '.join(missing)}")
    out = dict(row)
    predict, label = int(row["predict"]), int(row["label"])
    correct = int(predict == label and predict != ABSTAIN)
    if "correct" in row and row["correct"] is not None and int(row["correct"]) != correct:
        raise CertificateError(f"row {row_number} (idx {row['idx']}): correct={row['correct']} but "
                               f"predict={predict}, label={label}")
    out["correct"] = correct
    return out


def write_certificate(path: str | Path, rows: Sequence[Mapping],
                      extra_columns: Sequence[str] = ()) -> Path:
    """Write ``rows`` (dicts keyed by column name) as a certificate TSV, atomically.

    Columns are ``COLUMNS`` followed by ``extra_columns`` in the given order. ``correct`` may be
    omitted from a row (it is computed as ``predict == label``); if given it must agree. A row with a
    key outside the header is an error (a misspelt extra column would otherwise vanish silently);
    a row may leave an extra column out or set it to None (an empty cell). An empty ``rows`` writes
    the header only. The file appears complete or not at all (temp file + rename).
    """
    extra = list(extra_columns)
    clash = [c for c in extra if c in COLUMNS]
    if clash or len(set(extra)) != len(extra):
        raise CertificateError(f"{path}: extra columns repeat a column: {extra}")
    header = list(COLUMNS) + extra
    known = set(header)
    lines = ["\t".join(header)]
    for i, raw in enumerate(rows):
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CertificateError(f"{path}: row {i} has column(s) {', '.join(unknown)} that are not in "
                                   f"the header (pass them in extra_columns)")
        row = _normalise_row(raw, i)
        lines.append("\t".join(_cell(row.get(c), c, i) for c in header))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- read

def parse_seconds(text: str) -> float:
    """'14.1' -> 14.1; '0:00:14.114881' -> 14.114881; '1 day, 0:00:01' -> 86401.0. ValueError if neither."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        days, hours, minutes, seconds = m.groups()
        return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)
    value = float(text)  # raises ValueError on anything else
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a duration: {text!r}")
    return value


def _bad(path: Path, frame: pd.DataFrame, mask, column: str, why: str) -> CertificateError:
    """Error naming the first offending data row by its line number in the file (a header is line 1)."""
    pos = int(np.flatnonzero(np.asarray(mask))[0])
    value = frame[column].iloc[pos]
    count = int(np.asarray(mask).sum())
    more = f" ({count - 1} more row(s) like it)" if count > 1 else ""
    return CertificateError(f"{path}: line {pos + frame.attrs.get('first_line', 2)}: column '{column}' = {value!r}: {why}{more}")


def _floats(texts) -> np.ndarray:
    """Python's float() per cell: correctly rounded, so a repr-written float reads back identical
    (pandas' fast C parser is not guaranteed to be). Unparseable cells become NaN."""
    out = np.empty(len(texts), dtype=float)
    for i, text in enumerate(texts):
        try:
            out[i] = float(text)
        except (TypeError, ValueError):
            out[i] = np.nan
    return out


def _to_int(path: Path, raw: pd.DataFrame, column: str) -> np.ndarray:
    texts = raw[column].tolist()
    bad = np.array([_INT.match(t.strip()) is None for t in texts], dtype=bool)
    if bad.any():
        raise _bad(path, raw, bad, column, "not an integer")
    return np.array([int(t) for t in texts], dtype=np.int64)


def _extra_column(texts: list[str]) -> np.ndarray:
    """An optional column: int64 if every cell is an integer, float64 if every cell is a number or
    empty (empty -> NaN), else the text as it is."""
    texts = [t.strip() for t in texts]
    if texts and all(_INT.match(t) for t in texts):
        return np.array([int(t) for t in texts], dtype=np.int64)
    values = _floats([t or "nan" for t in texts])
    if all(not math.isnan(v) or t in ("", "nan", "NaN") for t, v in zip(texts, values)):
        return values
    return np.array(texts, dtype=object)


def _to_time(path: Path, raw: pd.DataFrame) -> np.ndarray:
    out = np.empty(len(raw), dtype=float)
    for i, text in enumerate(raw["time"]):
        try:
            out[i] = parse_seconds(text)
        except (ValueError, TypeError, AttributeError):
            mask = np.zeros(len(raw), dtype=bool)
            mask[i] = True
            raise _bad(path, raw, mask, "time", "neither seconds nor an H:MM:SS duration") from None
    return out


def _looks_like_data(cells: list[str]) -> bool:
    """True if every cell of a first line is a number or a duration: a headerless log."""
    for cell in cells:
        try:
            parse_seconds(cell) if ":" in cell else float(cell)
        except ValueError:
            return False
    return True


def _read_raw(path: Path) -> tuple[pd.DataFrame, str]:
    """The file's cells as text with named columns, and its format ('rrcm' when headerless)."""
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, header=None)
    except pd.errors.EmptyDataError:
        raise CertificateError(f"{path}: empty file (not even a header)") from None
    except pd.errors.ParserError as exc:
        raise CertificateError(f"{path}: not a tab-separated table: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file (a pickle, an archive) where a text table was expected
        raise CertificateError(f"{path}: not a text file, so not a certificate ({exc})") from None
    first = [str(c).strip() for c in raw.iloc[0]]
    if _looks_like_data(first):
        if len(first) != len(RRCM_COLUMNS):
            raise CertificateError(
                f"{path}: no header line, and {len(first)} columns where the headerless rRCM log has "
                f"{len(RRCM_COLUMNS)} ({' '.join(RRCM_COLUMNS)}); expected a tab-separated header "
                f"{' '.join(COLUMNS)} first")
        raw.columns = list(RRCM_COLUMNS)
        raw.insert(0, "idx", [str(i) for i in range(len(raw))])
        raw = raw.reset_index(drop=True)
        raw.attrs["first_line"] = 1
        return raw, "rrcm"
    raw = raw.iloc[1:].reset_index(drop=True)
    raw.columns = first
    if len(set(first)) != len(first):
        raise CertificateError(f"{path}: the header repeats a column: {' '.join(first)}")
    return raw, ("multiscale" if "stage" in first and "r_neg" in first else "cohen")


def read_certificate(path: str | Path) -> pd.DataFrame:
    """Read one certificate TSV (ours, or a published log of any of the four papers' code).

    Returns a DataFrame with ``COLUMNS`` first (idx, label, predict, correct as int64; radius and
    time as float64, time in seconds) and then any extra columns, numeric where they parse as numbers;
    ``attrs["format"]`` names the layout recognised (module docstring). Raises CertificateError naming
    the file and the missing columns or the first bad line (and its column) when the file is missing,
    lacks a required column, holds a malformed value, repeats an idx, or has a ``correct`` that is
    neither 0/1 agreeing with ``predict == label`` nor the running count of it.
    """
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{path}: no such certificate file")
    raw, fmt = _read_raw(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise CertificateError(f"{path}: missing required column(s) {', '.join(missing)} "
                               f"(found: {', '.join(raw.columns) or 'none'}; "
                               f"expected tab-separated {' '.join(COLUMNS)})")

    frame = pd.DataFrame({c: _to_int(path, raw, c) for c in _INT_COLUMNS})
    radius = _floats(raw["radius"].tolist())
    bad = ~np.isfinite(radius) | (radius < 0)
    if bad.any():
        raise _bad(path, raw, bad, "radius", "not a finite non-negative number")
    frame["radius"] = radius
    frame["time"] = _to_time(path, raw)
    frame = frame[list(COLUMNS)]

    if fmt == "multiscale":
        frame.loc[frame["predict"] == MULTISCALE_UNDECIDED, "predict"] = ABSTAIN
    right = ((frame["predict"] == frame["label"]) & (frame["predict"] != ABSTAIN)).astype(np.int64)
    # Carlini et al.'s log: the running count, read back per row. Only a count that reaches 2 is
    # taken for one: a 0/1 column that merely disagrees with predict == label stays an error.
    if fmt == "cohen" and len(frame) and frame["correct"].max() >= 2:
        off = frame["correct"] != right.cumsum()
        if off.any():
            raise _bad(path, raw, off.to_numpy(), "correct", "is neither 0/1 nor the running count of "
                       "predict == label (Carlini et al.'s log), which it departs from here")
        frame["correct"] = right
        fmt = "carlini"

    checks = [
        (frame["predict"] < ABSTAIN, "predict", "must be a class index or -1 (abstain)"),
        (~frame["correct"].isin([0, 1]), "correct", "must be 0 or 1 (or the running count of correct rows)"),
        (frame["correct"] != right, "correct", "disagrees with predict == label"),
        (frame["idx"].duplicated(keep="first"), "idx", "repeats an earlier row"),
    ]
    for mask, column, why in checks:
        if mask.any():
            raise _bad(path, raw, mask.to_numpy(), column, why)

    for column in raw.columns:
        if column in COLUMNS:
            continue
        frame[column] = _extra_column(raw[column].tolist())
    frame.attrs["sources"] = [str(path)]
    frame.attrs["format"] = fmt
    return frame


def merge_shards(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Read several shards of one certificate and concatenate them, sorted by idx.

    An idx that appears in two shards is an error naming both files (overlapping shards would count
    an image twice in certified accuracy). Extra columns are the union over shards.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise CertificateError("merge_shards: no certificate files given")
    frames = [read_certificate(p) for p in paths]
    owner: dict[int, Path] = {}
    for p, frame in zip(paths, frames):
        for idx in frame["idx"].tolist():
            if idx in owner:
                raise CertificateError(f"idx {idx} appears in two shards: {owner[idx]} and {p}")
            owner[idx] = p
    merged = pd.concat(frames, ignore_index=True, sort=False)
    merged = merged.sort_values("idx", kind="stable").reset_index(drop=True)
    merged.attrs["sources"] = [str(p) for p in paths]
    merged.attrs["files"] = [(str(p), len(f), f.attrs["format"]) for p, f in zip(paths, frames)]
    return merged
