"""What the report computes: certified accuracy, ACR and abstention per entry, the per-method
envelope, the tidy table and DVC metrics, and the cost table (DESIGN.md section 3)."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Sequence

import numpy as np
import pandas as pd

from rcm.certificate import ABSTAIN
from rcm.errors import CertificateError
from rcm.paths import SEQUENTIAL, fmt_sigma
from rcm.report.entries import Entry
from rcm.report.significance import clopper_pearson

ORACLE = "best_sigma_oracle"  # the envelope's name suffix: the best sigma per radius, chosen on these images

def certified_accuracy(frame: pd.DataFrame, radii: Sequence[float]) -> np.ndarray:
    """Fraction of all rows with correct == 1 and radius >= r, for each r. Shape (len(radii),)."""
    if len(frame) == 0:
        raise CertificateError("cannot compute certified accuracy of an empty certificate")
    ok = frame["correct"].to_numpy() == 1
    radius = frame["radius"].to_numpy(dtype=float)
    return np.array([np.count_nonzero(ok & (radius >= r)) / len(frame) for r in radii])


def average_certified_radius(frame: pd.DataFrame) -> float:
    """ACR = mean(radius * correct); abstentions and wrong predictions contribute 0."""
    return float((frame["radius"].to_numpy(dtype=float) * frame["correct"].to_numpy()).mean())


def abstain_rate(frame: pd.DataFrame) -> float:
    return float((frame["predict"].to_numpy() == ABSTAIN).mean())

def summary(entries: Sequence[Entry], radii: Sequence[float]) -> pd.DataFrame:
    """One row per entry, then one '{method}_best_sigma_oracle' envelope row after each method with
    per-sigma entries (and '{method}_sequential_best_sigma_oracle' after its sequential ones: the
    modes are not mixed). An envelope is a maximum over sigma chosen on the reported images, not one
    classifier's certificate: the renderers set it apart and never mark it best.

    Columns: name, method, sigma, kind ('entry', 'baseline', 'envelope'), images, one column per
    radius (certified accuracy), acr, abstain (NaN for envelopes, which mix sigmas), and for
    envelopes 'best_sigma' (the sigma chosen at each radius, space-separated)."""
    rows = []
    by_method: OrderedDict[tuple[str, bool], list[tuple[Entry, np.ndarray]]] = OrderedDict()
    for e in entries:
        acc = certified_accuracy(e.frame, radii)
        rows.append({"name": e.name, "method": e.method, "sigma": e.sigma,
                     "kind": "baseline" if e.baseline else "entry", "images": len(e.frame),
                     **dict(zip(radii, acc)), "acr": average_certified_radius(e.frame),
                     "abstain": abstain_rate(e.frame), "best_sigma": None, "group": (e.method, e.sequential)})
        if e.per_sigma:
            by_method.setdefault((e.method, e.sequential), []).append((e, acc))
    out = []
    for row in rows:
        key = row.pop("group")
        out.append(row)
        group = by_method.get(key) if row["kind"] == "entry" else None
        is_last = group is not None and group[-1][0].name == row["name"]
        if is_last and len({frozenset(e.frame["idx"]) for e, _ in group}) > 1:
            # each sigma's accuracy would have another denominator: no honest best-per-radius row
            print(f"rcm report: no envelope for '{row['method']}': its sigma entries certify different "
                  f"images ({', '.join(f'{e.name}: {len(e.frame)}' for e, _ in group)})", file=sys.stderr)
        elif is_last:
            out.append(_envelope_row(row["method"], group, radii, group[0][0].sequential))
    return pd.DataFrame(out)


def _envelope_row(method: str, group: list[tuple[Entry, np.ndarray]], radii, sequential: bool) -> dict:
    table = np.stack([acc for _, acc in group])  # (num_sigmas, num_radii)
    best = table.argmax(axis=0)  # first maximum: entries are in ascending sigma
    sigmas = [group[i][0].sigma for i in best]
    name = f"{method}_{SEQUENTIAL}_{ORACLE}" if sequential else f"{method}_{ORACLE}"
    return {"name": name, "method": method, "sigma": None, "kind": "envelope",
            "images": min(len(e.frame) for e, _ in group),
            **{r: table[b, j] for j, (r, b) in enumerate(zip(radii, best))},
            "acr": math.nan, "abstain": math.nan,
            "best_sigma": " ".join(fmt_sigma(s) for s in sigmas)}


def interval(row: pd.Series, r: float) -> tuple[float, float]:
    """The two-sided 95% Clopper-Pearson interval of a row's certified accuracy at r (k of its
    images); NaN for an envelope, whose value is a maximum chosen on the same images."""
    if row["kind"] == "envelope":
        return math.nan, math.nan
    n = int(row["images"])
    return clopper_pearson(int(round(row[r] * n)), n)


def tidy(table: pd.DataFrame, radii: Sequence[float]) -> pd.DataFrame:
    """Long form: one row per (entry, radius), with the interval of each certified accuracy."""
    rows = []
    for _, row in table.iterrows():
        best = row["best_sigma"].split() if isinstance(row["best_sigma"], str) else [None] * len(radii)
        for r, chosen in zip(radii, best):
            sigma = chosen if row["kind"] == "envelope" else row["sigma"]
            low, high = interval(row, r)
            rows.append({"name": row["name"], "method": row["method"],
                         "sigma": None if sigma is None else fmt_sigma(sigma), "kind": row["kind"],
                         "radius": r, "certified_accuracy": row[r], "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def guarantee_warnings(entries: Sequence[Entry]) -> list[str]:
    """One line per entry whose certificates are guaranteed at a larger failure probability than
    the alpha they were computed with (a cascade with the 'harmonic' split: alpha_guaranteed)."""
    lines = []
    for e in entries:
        f = e.frame
        if {"alpha", "alpha_guaranteed"} <= set(f.columns):
            alpha, guaranteed = float(f["alpha"].max()), float(f["alpha_guaranteed"].max())
            if guaranteed > alpha * (1 + 1e-9):
                lines.append(f"{e.name}: certified at alpha = {alpha:g}, but its alpha split only "
                             f"guarantees {guaranteed:.3g} (union bound; docs/methods.md)")
    return lines


def radius_label(r: float) -> str:
    return f"r={r:g}"

def metrics(table: pd.DataFrame, radii) -> dict:
    """DVC metrics: {name: {acr, abstain_rate, images, certified_accuracy: {'r=0.25': ...}}}."""
    out = {}
    for _, row in table.iterrows():
        item = {"images": int(row["images"])}
        if row["kind"] != "envelope":
            item["acr"] = round(float(row["acr"]), 6)
            item["abstain_rate"] = round(float(row["abstain"]), 6)
        item["certified_accuracy"] = {radius_label(r): round(float(row[r]), 6) for r in radii}
        out[row["name"]] = item
    return out


def cost(entries: Sequence[Entry]) -> pd.DataFrame:
    """Per entry: mean seconds and FLOPs per certified image (FLOPs from a 'flops' column, else empty),
    noise samples per second where the certificate records n0 and n, and the base classifier's
    precision from an 'amp' column ('off' where a certificate has none: float32). A sequential
    entry's saving is over its fixed-n twin's mean draws (same method and sigma) where the report
    has one, else over n0 + n_max (what a fixed-n single-sigma certificate draws; a cascade
    without its twin has no saving: its fixed-n draws depend on the stages each image reaches)."""
    rows = []
    fixed_draws = {}
    for e in entries:
        f = e.frame
        if not e.sequential and e.method is not None and "samples" in f.columns and f["samples"].notna().all():
            fixed_draws[(e.method, fmt_sigma(e.sigma) if e.sigma is not None else None)] = float(f["samples"].mean())
    for e in entries:
        f = e.frame
        flops = f["flops"].mean() if "flops" in f.columns and f["flops"].notna().any() else math.nan
        samples = math.nan
        drawn = f["samples"] if "samples" in f.columns and f["samples"].notna().all() else (
            f["n0"] + f["n"] if {"n0", "n"} <= set(f.columns) else None)
        if drawn is not None and f["time"].sum() > 0:
            samples = float(drawn.sum() / f["time"].sum())
        mean_draws = float(drawn.mean()) if drawn is not None else math.nan
        # a sequential certificate's n is its n_max: the fixed-n run it replaces draws n0 + n
        twin = fixed_draws.get((e.method, fmt_sigma(e.sigma) if e.sigma is not None else None))
        saving = math.nan
        if "sequential" in f.columns and mean_draws > 0:
            if twin is not None:
                saving = twin / mean_draws
            elif {"n0", "n"} <= set(f.columns) and "stage" not in f.columns:
                saving = float((f["n0"] + f["n"]).mean()) / mean_draws
        amp = (" ".join(sorted(set(f["amp"].fillna("off").astype(str)))) if "amp" in f.columns else "off")
        rows.append({"name": e.name, "method": e.method, "amp": amp,
                     "sigma": None if e.sigma is None else fmt_sigma(e.sigma),
                     "images": len(f), "seconds_per_image": float(f["time"].mean()),
                     "total_seconds": float(f["time"].sum()), "flops_per_image": flops,
                     "samples_per_second": samples, "draws_per_image": mean_draws,
                     "draws_saving": saving})
    return pd.DataFrame(rows)
