"""How sure the report's numbers are: a Clopper-Pearson interval for every certified accuracy, and
exact McNemar tests between entries certified on the same images.

Certified accuracy at r is k / N (k images correct with radius >= r out of the entry's N). Its
two-sided 95% interval is Clopper-Pearson's. Entries certified on the same images are paired: at
each radius, a_only counts images certified (correct, radius >= r) by a and not by b, b_only the
reverse, and under "a and b certify equally often" a_only ~ Binomial(a_only + b_only, 1/2): the exact
two-sided McNemar test is that binomial test (p = 1 when both counts are 0).

Multiplicity. The family is one radius: every pair of entries (envelopes are not entries) on the
same images. ``p_holm`` is Holm's step-down adjustment of ``p_value`` over that family: any claim
"a differs from b at r" read off p_holm < 5% holds for all such claims at once with probability
>= 95%. Pairs listed in ``report.planned`` (declared before the run) are flagged ``planned`` and
may be read unadjusted. "Best at r" is an intersection-union test: the best entry must beat every
other entry on the same images, each exact McNemar p below 5%; it is rejected unless all are, so
it needs no correction within a radius (Berger 1982), and its p-value is the largest of them.
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
HOLM_SHOWN = 12  # pairs named per radius in the Markdown's Holm list (smallest p_holm first)


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


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values: sorted ascending, the i-th (0-based) of m is scaled by
    m - i, made non-decreasing along that order, and capped at 1."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(scaled, 1.0)
    return out


def parse_planned(items: Sequence[str]) -> list[tuple[str, str]]:
    """``report.planned`` entries 'A:B' as (A, B) pairs; ValueError names a malformed one."""
    pairs = []
    for item in items:
        a, sep, b = str(item).partition(":")
        if not sep or not a or not b or ":" in b or a == b:
            raise ValueError(f"planned comparison '{item}': expected A:B, two different entry names")
        pairs.append((a, b))
    return pairs


def paired_tests(entries: Sequence[Entry], radii: Sequence[float],
                 planned: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """Every pair (a before b in report order) certified on exactly the same images, at every radius:
    radius, a, b, a_only, b_only, p_value, p_holm (Holm over the pairs at that radius), planned
    (the pair, in either order, is one of ``planned``)."""
    wanted = set(map(tuple, planned))
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
                         "p_value": mcnemar(a_only, b_only),
                         "planned": (a.name, b.name) in wanted or (b.name, a.name) in wanted})
    frame = pd.DataFrame(rows, columns=["radius", "a", "b", "a_only", "b_only", "p_value", "planned"])
    frame.insert(6, "p_holm", np.nan)
    for r in radii:
        at = frame["radius"] == r
        frame.loc[at, "p_holm"] = holm(frame.loc[at, "p_value"].to_numpy())
    return frame


def _pair(paired: pd.DataFrame, r: float, a: str, b: str) -> tuple[int, int, float] | None:
    """(a_only, b_only, p_value) of a against b at r, whichever order the table holds them in."""
    rows = paired[(paired.radius == r) & (paired.a == a) & (paired.b == b)]
    if len(rows):
        row = rows.iloc[0]
        return int(row["a_only"]), int(row["b_only"]), float(row["p_value"])
    rows = paired[(paired.radius == r) & (paired.a == b) & (paired.b == a)]
    if len(rows):
        row = rows.iloc[0]
        return int(row["b_only"]), int(row["a_only"]), float(row["p_value"])
    return None


def best_claims(table: pd.DataFrame, paired: pd.DataFrame, radii: Sequence[float]) -> list[str]:
    """Per radius, whether the best entry (the bold one; envelopes excluded) is shown best: an
    intersection-union test against every other entry, each pairwise exact McNemar p below
    SIGNIFICANCE with the best one ahead. Otherwise the line names the entries it is not shown
    ahead of (not significantly ahead, tied, or not certified on the same images)."""
    rows = table[table["kind"] != "envelope"]
    lines = []
    for r in radii:
        acc = rows[r].to_numpy(dtype=float)
        if len(rows) < 2 or not np.nanmax(acc) > 0:
            continue
        order = np.argsort(-acc, kind="stable")
        best = rows.iloc[order[0]]
        head = f"r = {r:g}: {best['name']} ({acc[order[0]]:.4f})"
        failed, p_max = [], 0.0
        for i in order[1:]:
            other = rows.iloc[i]
            test = _pair(paired, r, best["name"], other["name"])
            if test is None:
                failed.append(f"{other['name']} ({acc[i]:.4f}, not certified on the same images)")
                continue
            ahead, behind, p = test
            p_max = max(p_max, p)
            if not (ahead > behind and p < SIGNIFICANCE):
                failed.append(f"{other['name']} ({acc[i]:.4f}, {ahead} against {behind} images, "
                              f"McNemar p = {p:.3g})")
        if failed:
            shown = "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
            lines.append(f"{head}: not shown best, not significantly ahead of {shown}")
        else:
            lines.append(f"{head}: best, ahead of every other entry (intersection-union test: largest "
                         f"pairwise McNemar p = {p_max:.3g} < {SIGNIFICANCE:.0%})")
    return lines


def planned_lines(paired: pd.DataFrame, planned: Sequence[tuple[str, str]], radii: Sequence[float]) -> list[str]:
    """The planned comparisons at every radius, unadjusted (declared before the run)."""
    lines = []
    for a, b in planned:
        for r in radii:
            test = _pair(paired, r, a, b)
            if test is None:
                lines.append(f"r = {r:g}: {a} against {b}: not certified on the same images, no paired test")
                continue
            a_only, b_only, p = test
            verdict = "significant" if p < SIGNIFICANCE else "not significant"
            lines.append(f"r = {r:g}: {a} against {b}: {a_only} against {b_only} images, McNemar p = "
                         f"{p:.3g}, {verdict} at {SIGNIFICANCE:.0%} (planned, unadjusted)")
    return lines


def holm_lines(paired: pd.DataFrame, radii: Sequence[float]) -> list[str]:
    """Per radius, the pairs whose Holm-adjusted p is below SIGNIFICANCE (who certifies more), the
    HOLM_SHOWN smallest named."""
    lines = []
    for r in radii:
        at = paired[paired.radius == r]
        hits = at[at.p_holm < SIGNIFICANCE].sort_values("p_holm", kind="stable")
        if at.empty:
            continue
        pairs = [f"{row.a if row.a_only > row.b_only else row.b} over "
                 f"{row.b if row.a_only > row.b_only else row.a} (p_holm = {row.p_holm:.3g})"
                 for row in hits.itertuples()]
        shown = "; ".join(pairs[:HOLM_SHOWN]) + (f"; and {len(pairs) - HOLM_SHOWN} more (paired_tests.csv)"
                                                 if len(pairs) > HOLM_SHOWN else "")
        lines.append(f"r = {r:g}: {len(hits)} of {len(at)} pairs" + (": " + shown if pairs else ""))
    return lines
