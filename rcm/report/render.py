"""How the report renders its tables: Markdown, LaTeX, the cost table, and the list of files read."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from rcm.report.entries import Entry
from rcm.report.tables import interval, radius_label

def _formatted(table: pd.DataFrame, radii, bold) -> tuple[list[str], list[list[str]]]:
    """Header and cells as text: each certified accuracy with its 95% interval, ACR, abstention
    (4 decimals). The best value of each radius column and of ACR is bold, among entries and
    baselines only: an envelope (an oracle over sigma) is never marked best."""
    header = ["name", "images"] + [radius_label(r) for r in radii] + ["ACR", "abstain"]
    columns = list(radii) + ["acr"]
    single = table[table["kind"] != "envelope"]
    best = {c: single[c].max(skipna=True) for c in columns}
    body = []
    for _, row in table.iterrows():
        cells = [row["name"], str(int(row["images"]))]
        for c in columns + ["abstain"]:
            value = row[c]
            if pd.isna(value):
                cells.append("–")
                continue
            text = f"{value:.4f}"
            if c in radii and row["kind"] != "envelope":
                low, high = interval(row, c)
                text += f" ({low:.2f}–{high:.2f})"
            # ties are all marked; a column where nothing is certified (best 0) has no best
            is_best = (row["kind"] != "envelope" and c in best and best[c] > 0
                       and round(value, 4) == round(best[c], 4))
            cells.append(bold(text) if is_best else text)
        body.append(cells)
    return header, body


def _split(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    envelope = table["kind"] == "envelope"
    return table[~envelope], table[envelope]


def to_markdown(table: pd.DataFrame, radii, claims: Sequence[str] = (), warnings: Sequence[str] = (),
                planned: Sequence[str] = (), holm: Sequence[str] = ()) -> str:
    """The certified-accuracy table; the oracle envelopes in a table of their own; whether each
    radius's best entry is shown best (``claims``); the planned comparisons (unadjusted) and the
    pairs that differ after Holm's adjustment; warnings about weaker guarantees."""
    single, oracle = _split(table)
    header, body = _formatted(table, radii, lambda t: f"**{t}**")
    rows = dict(zip(table["name"], body))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(rows[name]) + " |" for name in single["name"]]
    lines.append("\nCertified accuracy (fraction of all images correct with radius ≥ r; abstentions "
                 "count as wrong) with its two-sided 95% Clopper–Pearson interval, ACR = mean(radius · "
                 "correct). Best per column in bold.")
    if len(oracle):
        lines += ["", "Best σ per radius (oracle): at each radius the best of a method's per-σ entries, "
                  "σ chosen on these same images; not one classifier's certificate, so never bold and "
                  "without an interval.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(rows[name]) + " |" for name in oracle["name"]]
    if claims:
        lines += ["", "Best per radius: the bold entry is called best only if it certifies more images "
                  "than every other entry, each paired on the same images with an exact McNemar p below "
                  "5% (an intersection–union test, which needs no correction within a radius; not "
                  "corrected for the number of radii; `paired_tests.csv`):", ""]
        lines += [f"- {claim}" for claim in claims]
    if planned:
        lines += ["", "Planned comparisons (`report.planned`, declared before the run; unadjusted):", ""]
        lines += [f"- {line}" for line in planned]
    if holm:
        lines += ["", "Pairs that differ after Holm's adjustment over all pairs at the same radius "
                  "(`p_holm` in `paired_tests.csv`, below 5%):", ""]
        lines += [f"- {line}" for line in holm]
    if warnings:
        lines += ["", "**Warning**: weaker guarantee than α:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def to_latex(table: pd.DataFrame, radii) -> str:
    """The Markdown table's rows (entries, then the oracle envelopes below a rule, never bold)."""
    single, oracle = _split(table)
    header, body = _formatted(table, radii, lambda t: f"\\textbf{{{t}}}")
    rows = dict(zip(table["name"], body))
    lines = ["% rcm report: certified accuracy (95% Clopper-Pearson interval); needs \\usepackage{booktabs}",
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]

    def row(cells):
        cells = [_tex_escape(cells[0])] + [c.replace("–", "--") for c in cells[1:]]
        return " & ".join(cells) + " \\\\"
    lines += [row(rows[name]) for name in single["name"]]
    if len(oracle):
        label = "best $\\sigma$ per radius (oracle, chosen on these images)"
        lines += ["\\midrule", f"\\multicolumn{{{len(header)}}}{{l}}{{\\emph{{{label}}}}} \\\\"]
        lines += [row(rows[name]) for name in oracle["name"]]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def cost_markdown(table: pd.DataFrame) -> str:
    def fmt(value, spec):
        return "" if pd.isna(value) else format(value, spec)
    lines = ["| name | amp | images | seconds / image | noise draws / image | fewer draws than fixed n "
             "| FLOPs / image | samples / s | total seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        saving = "" if pd.isna(r["draws_saving"]) else f"{r['draws_saving']:.1f}×"
        lines.append(f"| {r['name']} | {r['amp']} | {r['images']} | {fmt(r['seconds_per_image'], '.4g')} | "
                     f"{fmt(r['draws_per_image'], '.6g')} | {saving} | {fmt(r['flops_per_image'], '.4g')} | "
                     f"{fmt(r['samples_per_second'], '.4g')} | {fmt(r['total_seconds'], '.6g')} |")
    note = ("\nSeconds come from each certificate's `time` column (measured on the machine that "
            "certified it; published logs ran elsewhere). FLOPs only where the certificate has a "
            "`flops` column. Sequential entries (`*_sequential`) stop each image's sampling early; "
            "their saving is their fixed-n twin's mean draws per image (n0 + n for one σ; for a cascade, "
            "n0 + n per stage it reached) over theirs. `amp` is the precision the "
            "base classifier ran in (off: float32; published logs: off).\n")
    return "\n".join(lines) + "\n" + note

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(entries: Sequence[Entry]) -> str:
    lines = ["# rcm report: every certificate file read (entry, path, rows, sha256, format read as)"]
    for e in entries:
        for path, rows, fmt in e.frame.attrs["files"]:  # as merge_shards read them
            lines.append(f"{e.name}\t{path}\t{rows}\t{_sha256(Path(path))}\t{fmt}")
    return "\n".join(lines) + "\n"
