"""How sure the report's numbers are: a Clopper-Pearson interval for every certified accuracy, and
exact McNemar tests between entries certified on the same images.

Certified accuracy at r is k / N (k images correct with radius >= r out of the entry's N). Its
two-sided 95% interval is Clopper-Pearson's. Entries certified on the same images are paired: at
each radius, a_only counts images certified (correct, radius >= r) by a and not by b, b_only the
reverse, and under "a and b certify equally often" a_only ~ Binomial(a_only + b_only, 1/2): the exact
two-sided McNemar test is that binomial test (p = 1 when both counts are 0).
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import beta, binomtest

from rcm.report.entries import Entry

LEVEL = 0.95  # of the intervals
SIGNIFICANCE = 0.05  # of the paired tests the Markdown report reads


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Two-sided exact interval for a binomial proportion k / n at ``level``."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def certified_sets(entry: Entry, radii: Sequence[float]) -> dict[float, frozenset]:
    """Per radius, the idx of the images the entry certifies there (correct and radius >= r)."""
    f = entry.frame
    ok = f["correct"].to_numpy() == 1
    radius = f["radius"].to_numpy(dtype=float)
    idx = f["idx"].to_numpy()
    return {r: frozenset(idx[ok & (radius >= r)].tolist()) for r in radii}


def mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value of the discordant counts."""
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def paired_tests(entries: Sequence[Entry], radii: Sequence[float]) -> pd.DataFrame:
    """Every pair (a before b in report order) certified on exactly the same images, at every radius:
    radius, a, b, a_only, b_only, p_value."""
    images = {e.name: frozenset(e.frame["idx"].tolist()) for e in entries}
    sets = {e.name: certified_sets(e, radii) for e in entries}
    rows = []
    for a, b in combinations(entries, 2):
        if images[a.name] != images[b.name] or len(images[a.name]) != len(a.frame) or len(a.frame) != len(b.frame):
            continue  # other images (or an idx listed twice): nothing to pair
        for r in radii:
            sa, sb = sets[a.name][r], sets[b.name][r]
            a_only, b_only = len(sa - sb), len(sb - sa)
            rows.append({"radius": r, "a": a.name, "b": b.name, "a_only": a_only, "b_only": b_only,
                         "p_value": mcnemar(a_only, b_only)})
    return pd.DataFrame(rows, columns=["radius", "a", "b", "a_only", "b_only", "p_value"])


def best_claims(table: pd.DataFrame, paired: pd.DataFrame, radii: Sequence[float]) -> list[str]:
    """Per radius, whether the best entry (the bold one; envelopes excluded) beats the runner-up on
    the same images significantly (exact McNemar, uncorrected for the number of radii)."""
    rows = table[table["kind"] != "envelope"]
    lines = []
    for r in radii:
        acc = rows[r].to_numpy(dtype=float)
        if len(rows) < 2 or not np.nanmax(acc) > 0:
            continue
        order = np.argsort(-acc, kind="stable")
        best, second = rows.iloc[order[0]], rows.iloc[order[1]]
        if acc[order[0]] == acc[order[1]]:
            lines.append(f"r = {r:g}: {best['name']} and {second['name']} tie at {acc[order[0]]:.4f}")
            continue
        pair = paired[(paired.radius == r) & (((paired.a == best["name"]) & (paired.b == second["name"]))
                                              | ((paired.a == second["name"]) & (paired.b == best["name"])))]
        head = (f"r = {r:g}: {best['name']} ({acc[order[0]]:.4f}) over the runner-up {second['name']} "
                f"({acc[order[1]]:.4f})")
        if pair.empty:
            lines.append(f"{head}: not certified on the same images, no paired test")
            continue
        p = float(pair["p_value"].iloc[0])
        verdict = "significant" if p < SIGNIFICANCE else "not significant"
        lines.append(f"{head}: McNemar p = {p:.3g}, {verdict} at {SIGNIFICANCE:.0%}")
    return lines
