"""The `report` stage: certified-accuracy tables, plot, DVC metrics, paired tests and a cost table.

Reads certificate TSVs (ours and the published logs of the papers' code, see ``rcm.certificate``)
and writes into one folder:

    certified_accuracy.csv        tidy: name, method, sigma, kind, radius, certified_accuracy, and its
                                  two-sided 95% Clopper-Pearson interval ci_low, ci_high
    certified_accuracy.md / .tex  rows = entries, columns = radii (accuracy and interval), ACR,
                                  abstention rate, the best single entry per column in bold; the
                                  per-method oracle envelopes apart; per radius, whether the best
                                  entry beats every other one (intersection-union of exact McNemar
                                  tests), the planned comparisons (unadjusted) and the pairs that
                                  differ after Holm's adjustment
    paired_tests.csv              every pair of entries on the same images, every radius: a_only,
                                  b_only, exact McNemar p_value, p_holm (Holm over the pairs at that
                                  radius), planned (declared in report.planned)
    certified_accuracy.png        certified accuracy vs radius, a step curve per entry (baselines dashed)
    plot_certified_accuracy.csv   the plotted curves, long (name, radius, certified_accuracy): one
                                  series per entry in `dvc plots` (dvc.yaml colours by name)
    metrics.json                  per entry: ACR, abstain rate, certified accuracy at each radius
    cost.csv / cost.md            seconds, draws and FLOPs per certified image per entry
    sources.txt                   every file read, with its row count, SHA-256 and format

Definitions (DESIGN.md section 3): certified accuracy at r is the fraction of ALL rows with
correct = 1 and radius >= r (abstentions count as wrong); ACR = mean(radius * correct). The envelope
of a method (``{method}_best_sigma_oracle``) takes, at each radius, the best of its per-sigma entries
(cascades and baselines excluded): sigma is chosen on the reported images, so it is an oracle.

One concept a module: ``entries`` (files -> named entries), ``tables`` (what is computed),
``significance`` (intervals, paired tests), ``render`` (Markdown, LaTeX), ``plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from rcm.atomic import write_text
from rcm.errors import CertificateError
from rcm.options import add_options, from_args, option
from rcm.report.entries import Entry, distinct_labels, entry_name, file_label, load_entries, parse_baseline
from rcm.report.plot import curve_grid, line_styles, long_curves, plot, plot_data
from rcm.report.render import cost_markdown, sources, to_latex, to_markdown
from rcm.report.significance import (best_claims, clopper_pearson, holm, holm_lines, paired_tests,
                                     parse_planned, planned_lines)
from rcm.report.tables import (abstain_rate, average_certified_radius, certified_accuracy, cost,
                               guarantee_warnings, metrics, summary, tidy)

# the package's interface: rcm.report.X for everything the stage computes and renders
__all__ = ["DEFAULT_RADII", "Entry", "ReportOptions", "abstain_rate", "average_certified_radius",
           "best_claims", "certified_accuracy", "clopper_pearson", "holm", "holm_lines", "parse_planned",
           "planned_lines", "guarantee_warnings", "paired_tests", "cost", "cost_markdown", "curve_grid", "distinct_labels", "entry_name",
           "file_label", "line_styles", "load_entries", "long_curves", "metrics", "parse_baseline", "plot",
           "plot_data", "sources", "summary", "tidy", "to_latex", "to_markdown", "write_report"]

DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


@dataclasses.dataclass
class ReportOptions:
    radii: list[float] = option(DEFAULT_RADII, "radii (L2, [0, 1] pixel units) of the table columns")
    baselines: list[str] = option([], "published or other reference certificates, drawn dashed beside "
                                      "the methods: NAME=FILE, or FILE to name it after the file")
    planned: list[str] = option([], "comparisons declared before the run, A:B entry names (e.g. "
                                    "mdds_sigma_0.5:dds_sigma_0.5): reported with unadjusted p-values")

def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def write_report(entries: Sequence[Entry], radii: Sequence[float], out: str | Path,
                 planned: Sequence[str] = ()) -> pd.DataFrame:
    """Write every report file into ``out``; returns the summary table. ``planned``: 'A:B' pairs of
    entry names declared before the run, tested without adjustment."""
    if not entries:
        raise CertificateError("no certificate files to report on")
    try:
        pairs = parse_planned(planned)
    except ValueError as exc:
        raise CertificateError(str(exc)) from None
    names = {e.name for e in entries}
    entry = re.compile(r"[a-z][a-z0-9_]*_(sigma_\d+(\.\d+)?(_sequential)?|cascade(_sequential)?)")
    unknown = sorted({n for pair in pairs for n in pair} - names)
    wrong = [n for n in unknown if not entry.fullmatch(n)]
    if wrong:   # not the name of any certified entry: a typo, said before anything is written
        raise CertificateError(f"report.planned names {', '.join(wrong)}, not an entry of this report nor a "
                               f"certified entry's name (entries: {', '.join(e.name for e in entries)})")
    absent = [pair for pair in pairs if not set(pair) <= names]
    if absent:   # e.g. a run of fewer sigmas or methods than the config's plan: said, not tested
        print(f"report: planned comparisons left out, an entry of each is not in this report: "
              f"{', '.join(':'.join(pair) for pair in absent)}", file=sys.stderr)
        pairs = [pair for pair in pairs if pair not in absent]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    radii = [float(r) for r in radii]
    table = summary(entries, radii)

    write_text(out / "certified_accuracy.csv", _csv(tidy(table, radii)))
    paired = paired_tests(entries, radii, pairs)
    write_text(out / "paired_tests.csv", _csv(paired))
    warnings = guarantee_warnings(entries)
    for line in warnings:
        print(f"rcm report: warning: {line}", file=sys.stderr)
    write_text(out / "certified_accuracy.md",
               to_markdown(table, radii, best_claims(table, paired, radii), warnings,
                           planned_lines(paired, pairs, radii), holm_lines(paired, radii)))
    write_text(out / "certified_accuracy.tex", to_latex(table, radii))
    write_text(out / "metrics.json", json.dumps(metrics(table, radii), indent=2) + "\n")
    curves = plot_data(entries, curve_grid(entries, radii))
    write_text(out / "plot_certified_accuracy.csv", _csv(long_curves(curves)))
    plot(entries, curves, out / "certified_accuracy.png")
    costs = cost(entries)
    write_text(out / "cost.csv", _csv(costs))
    write_text(out / "cost.md", cost_markdown(costs))
    write_text(out / "sources.txt", sources(entries))
    return table


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="certificate TSVs; shards shard_k-of-N.tsv of one {method}/sigma_{s} folder "
                        "are merged into one entry '{method}_sigma_{s}'")
    p.add_argument("--out", required=True, help="folder to write the report into")
    p.add_argument("--names", nargs="+", default=None,
                   help="entry names, one per entry in order (FILE entries, then baselines)")
    add_options(p, ReportOptions)


def main(args: argparse.Namespace) -> None:
    opts = from_args(ReportOptions, args)
    baselines = [parse_baseline(item) for item in opts.baselines]
    entries = load_entries(args.files, [path for _, path in baselines], args.names,
                           [name for name, _ in baselines])
    write_report(entries, opts.radii, args.out, opts.planned)
    print((Path(args.out) / "certified_accuracy.md").read_text(), end="")
    print(f"report written to {args.out}")
