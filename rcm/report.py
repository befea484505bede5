"""The `report` stage: certified-accuracy tables, plot, DVC metrics and a cost table.

Reads certificate TSVs (ours and published logs in Cohen et al.'s format, see ``rcm.certificate``)
and writes into one folder:

    certified_accuracy.csv        tidy: name, method, sigma, kind, radius, certified_accuracy
    certified_accuracy.md / .tex  rows = entries (+ one envelope row per method), columns = radii,
                                  ACR, abstention rate; the best value per column in bold
    certified_accuracy.png        certified accuracy vs radius, a step curve per entry (baselines dashed)
    plot_certified_accuracy.csv   the plotted curves, long (name, radius, certified_accuracy): one
                                  series per entry in `dvc plots` (dvc.yaml colours by name)
    metrics.json                  per entry: ACR, abstain rate, certified accuracy at each radius
    cost.csv / cost.md            seconds and FLOPs per certified image per entry
    sources.txt                   every file read, with its row count and SHA-256

Definitions (DESIGN.md section 3): certified accuracy at r is the fraction of ALL rows with
correct = 1 and radius >= r (abstentions count as wrong); ACR = mean(radius * correct). The envelope
of a method takes, at each radius, the best of its per-sigma entries (cascades and baselines excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rcm.atomic import atomic_path, write_text
from rcm.certificate import ABSTAIN, merge_shards
from rcm.errors import CertificateError
from rcm.options import add_options, from_args, option
from rcm.paths import CASCADE, METHODS, SEQUENTIAL, fmt_sigma

DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
_SHARD = re.compile(r"^shard_(\d+)-of-(\d+)\.tsv$")
_MERGED = re.compile(r"^(.+)_sigma_(.+)\.tsv$")  # a merged '{method}_sigma_{s}.tsv', e.g. one a user concatenated
# a file name's noise level: Cohen et al.'s 'sigma_0.25' (no extension), 'noise_0.25_sigma_0.25.tsv',
# Jeong & Shin's 'sigma_0.25_N10k.tsv', Lei et al.'s 'certify_result_0.25.txt'
_STEM_SIGMA = re.compile(r"(?:sigma|certify_result)_(\d*\.?\d+)(?:_N\d+k?)?$")
# an extension is a word ('.tsv', '.txt', '.log'); Cohen et al.'s 'sigma_0.25' has none, not '.25'
_EXTENSION = re.compile(r"^\.[A-Za-z][A-Za-z0-9]*$")


@dataclasses.dataclass
class ReportOptions:
    radii: list[float] = option(DEFAULT_RADII, "radii (L2, [0, 1] pixel units) of the table columns")
    baselines: list[str] = option([], "published or other reference certificates, drawn dashed beside "
                                      "the methods: NAME=FILE, or FILE to name it after the file")


def parse_baseline(item: str) -> tuple[str | None, Path]:
    """'NAME=FILE' -> (NAME, FILE); a bare 'FILE' -> (None, FILE). A name holds no '/'."""
    name, sep, path = item.partition("=")
    if sep and name and path and "/" not in name:
        return name, Path(path)
    return None, Path(item)


@dataclasses.dataclass
class Entry:
    """One row of the report: one certificate (several shards merged) of one method at one sigma."""

    name: str
    frame: pd.DataFrame
    paths: list[Path]
    method: str | None = None
    sigma: float | str | None = None  # a float, CASCADE, or None when unknown
    baseline: bool = False
    sequential: bool = False  # certified with early stopping (a '{method}/sigma_{s}_sequential' folder)

    @property
    def per_sigma(self) -> bool:
        return self.method is not None and isinstance(self.sigma, float) and not self.baseline


# ------------------------------------------------------------------------------------------- metrics

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


# ------------------------------------------------------------------------------------------- entries

def _parse_sigma(text: str) -> float | str:
    return CASCADE if text == CASCADE else float(text)


def _entry_key(path: Path) -> tuple[str, str | None, float | str | None, int | None, bool]:
    """(group key, method, sigma, number of shards, sequential) of a certificate path.

    ``.../{method}/sigma_{s}[_sequential]/shard_k-of-N.tsv`` (rcm.paths.certificate) and
    ``.../certify/{method}_sigma_{s}.tsv`` are ours; anything else is a standalone entry keyed by
    its path."""
    shard = _SHARD.match(path.name)
    folder = path.parent.name
    sequential = folder.endswith(f"_{SEQUENTIAL}")
    if sequential:
        folder = folder[:-len(SEQUENTIAL) - 1]
    if shard and folder.startswith("sigma_"):
        try:
            sigma = _parse_sigma(folder[len("sigma_"):])
        except ValueError:
            sigma = None
        if sigma is not None and not (sequential and sigma == CASCADE):
            method = path.parent.parent.name
            return (f"{path.parent.resolve()}|{shard.group(2)}", method, sigma, int(shard.group(2)),
                    sequential)
    merged = _MERGED.match(path.name)
    if merged and path.parent.name == "certify":
        try:
            return str(path.resolve()), merged.group(1), _parse_sigma(merged.group(2)), None, False
        except ValueError:
            pass
    return str(path.resolve()), None, None, None, False


def file_label(path: Path) -> str:
    """A file's name without its extension, where it has a real one (see _EXTENSION)."""
    return path.stem if _EXTENSION.match(path.suffix) else path.name


def distinct_labels(paths: Sequence[Path]) -> list[str]:
    """Names for standalone files: the file label, extended by as many parent folders (joined with
    '/') as it takes to tell apart files whose labels collide, e.g. Cohen et al.'s
    'noise_0.25/test/sigma_0.25' and 'noise_0.50/test/sigma_0.25'."""
    parts = [[*Path(p).resolve().parent.parts[1:], file_label(Path(p))] for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(q[-d:]) for q, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def entry_name(method: str | None, sigma: float | str | None, path: Path, sequential: bool = False) -> str:
    if method is None:
        return file_label(path)
    if sigma == CASCADE:
        return f"{method}_{CASCADE}"
    return f"{method}_sigma_{fmt_sigma(sigma)}" + (f"_{SEQUENTIAL}" if sequential else "")


def _sigma_from_file(frame: pd.DataFrame, path: Path) -> float | None:
    """A standalone file's sigma: its 'sigma' column if constant, else a trailing 'sigma_S' in its name."""
    if "sigma" in frame.columns:
        values = pd.to_numeric(frame["sigma"], errors="coerce").dropna().unique()
        if len(values) == 1:
            return float(values[0])
    m = _STEM_SIGMA.search(file_label(path))
    return float(m.group(1)) if m else None


def _check_shards(paths: list[Path], num_shards: int) -> None:
    seen = sorted(int(_SHARD.match(p.name).group(1)) for p in paths)
    expected = list(range(num_shards))
    if seen != expected:
        missing = sorted(set(expected) - set(seen))
        where = paths[0].parent
        raise CertificateError(f"{where}: shards {', '.join(map(str, missing)) or '?'} of {num_shards} "
                               f"are missing (found {', '.join(map(str, seen))}); a partial set "
                               f"would report accuracy on a subset of the images")


def load_entries(files: Sequence[str | Path], baselines: Sequence[str | Path] = (),
                 names: Sequence[str] | None = None,
                 baseline_names: Sequence[str | None] = ()) -> list[Entry]:
    """Group certificate files into report entries, in order of first appearance.

    Shards ``shard_k-of-N.tsv`` of one ``{method}/sigma_{s}`` folder become one entry named
    ``{method}_sigma_{s}`` (or ``{method}_cascade``); every other file is its own entry named after
    the file (``distinct_labels``: without a real extension, with parent folders where names would
    collide). ``baseline_names`` (aligned with ``baselines``, None = keep) names baselines;
    ``names``, if given, renames all entries in order (files first, then baselines).
    """
    groups: OrderedDict[str, dict] = OrderedDict()
    for path, baseline in [(Path(f), False) for f in files] + [(Path(f), True) for f in baselines]:
        key, method, sigma, num_shards, sequential = _entry_key(path)
        group = groups.setdefault(key, {"paths": [], "method": method, "sigma": sigma,
                                        "num_shards": num_shards, "baseline": baseline,
                                        "sequential": sequential})
        if path in group["paths"]:
            raise CertificateError(f"{path}: given twice")
        group["paths"].append(path)

    entries = []
    for group in groups.values():
        paths = group["paths"]
        if group["num_shards"] is not None:
            _check_shards(paths, group["num_shards"])
            paths = sorted(paths, key=lambda p: int(_SHARD.match(p.name).group(1)))
        frame = merge_shards(paths)
        if len(frame) == 0:
            raise CertificateError(f"{', '.join(map(str, paths))}: no certified images")
        sigma = group["sigma"] if group["method"] else _sigma_from_file(frame, paths[0])
        entries.append(Entry(name=entry_name(group["method"], group["sigma"], paths[0], group["sequential"]),
                             frame=frame, paths=paths, method=group["method"], sigma=sigma,
                             baseline=group["baseline"], sequential=group["sequential"]))

    standalone = [e for e in entries if e.method is None]
    for entry, label in zip(standalone, distinct_labels([e.paths[0] for e in standalone])):
        entry.name = label
    given = {Path(p): n for p, n in zip(baselines, baseline_names) if n}
    for entry in entries:
        if entry.baseline and entry.paths[0] in given:
            entry.name = given[entry.paths[0]]
    if names:
        if len(names) != len(entries):
            listing = ", ".join(e.name for e in entries)
            raise CertificateError(f"--names gives {len(names)} name(s) for {len(entries)} entries "
                                   f"({listing})")
        for entry, name in zip(entries, names):
            entry.name = name
    seen: dict[str, Entry] = {}
    for entry in entries:
        if entry.name in seen:
            raise CertificateError(f"two entries are named '{entry.name}' ({seen[entry.name].paths[0]} "
                                   f"and {entry.paths[0]}); pass --names")
        seen[entry.name] = entry
    return _ordered(entries)


def _ordered(entries: list[Entry]) -> list[Entry]:
    """Our methods first (METHODS order; fixed n, then sequential; sigma ascending, cascade last),
    then other files as given, then baselines as given."""
    def key(item: tuple[int, Entry]):
        pos, e = item
        if e.baseline or e.method is None:
            return (2 if e.baseline else 1, 0, "", False, 0.0, pos)
        rank = METHODS.index(e.method) if e.method in METHODS else len(METHODS)
        sigma = e.sigma if isinstance(e.sigma, float) else math.inf
        return (0, rank, e.method, e.sequential, sigma, pos)
    return [e for _, e in sorted(enumerate(entries), key=key)]


# -------------------------------------------------------------------------------------------- tables

def summary(entries: Sequence[Entry], radii: Sequence[float]) -> pd.DataFrame:
    """One row per entry, then one '{method}_envelope' row after each method with per-sigma entries
    (and one '{method}_sequential_envelope' after its sequential ones: the two modes are not mixed).

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
    name = f"{method}_{SEQUENTIAL}_envelope" if sequential else f"{method}_envelope"
    return {"name": name, "method": method, "sigma": None, "kind": "envelope",
            "images": min(len(e.frame) for e, _ in group),
            **{r: table[b, j] for j, (r, b) in enumerate(zip(radii, best))},
            "acr": math.nan, "abstain": math.nan,
            "best_sigma": " ".join(fmt_sigma(s) for s in sigmas)}


def tidy(table: pd.DataFrame, radii: Sequence[float]) -> pd.DataFrame:
    """Long form: one row per (entry, radius)."""
    rows = []
    for _, row in table.iterrows():
        best = row["best_sigma"].split() if isinstance(row["best_sigma"], str) else [None] * len(radii)
        for r, chosen in zip(radii, best):
            sigma = chosen if row["kind"] == "envelope" else row["sigma"]
            rows.append({"name": row["name"], "method": row["method"],
                         "sigma": None if sigma is None else fmt_sigma(sigma), "kind": row["kind"],
                         "radius": r, "certified_accuracy": row[r]})
    return pd.DataFrame(rows)


def _radius_label(r: float) -> str:
    return f"r={r:g}"


def _formatted(table: pd.DataFrame, radii, bold) -> tuple[list[str], list[list[str]]]:
    """Header and cells as text (4 decimals), the best value of each radius column and of ACR bold."""
    header = ["name", "images"] + [_radius_label(r) for r in radii] + ["ACR", "abstain"]
    columns = list(radii) + ["acr"]
    best = {c: table[c].max(skipna=True) for c in columns}
    body = []
    for _, row in table.iterrows():
        cells = [row["name"], str(int(row["images"]))]
        for c in columns + ["abstain"]:
            value = row[c]
            if pd.isna(value):
                cells.append("–")
                continue
            text = f"{value:.4f}"
            # ties are all marked; a column where nothing is certified (best 0) has no best
            is_best = c in best and best[c] > 0 and round(value, 4) == round(best[c], 4)
            cells.append(bold(text) if is_best else text)
        body.append(cells)
    return header, body


def to_markdown(table: pd.DataFrame, radii) -> str:
    header, body = _formatted(table, radii, lambda t: f"**{t}**")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = ("\nCertified accuracy (fraction of all images correct with radius ≥ r; abstentions count "
            "as wrong), ACR = mean(radius · correct). Best per column in bold. `*_envelope`: best σ "
            "per radius over the method's per-σ entries.\n")
    return "\n".join(lines) + "\n" + note


def _tex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def to_latex(table: pd.DataFrame, radii) -> str:
    header, body = _formatted(table, radii, lambda t: f"\\textbf{{{t}}}")
    lines = ["% rcm report: certified accuracy; needs \\usepackage{booktabs}",
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    for cells in body:
        cells = [_tex_escape(cells[0])] + [c.replace("–", "--") for c in cells[1:]]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def metrics(table: pd.DataFrame, radii) -> dict:
    """DVC metrics: {name: {acr, abstain_rate, images, certified_accuracy: {'r=0.25': ...}}}."""
    out = {}
    for _, row in table.iterrows():
        item = {"images": int(row["images"])}
        if row["kind"] != "envelope":
            item["acr"] = round(float(row["acr"]), 6)
            item["abstain_rate"] = round(float(row["abstain"]), 6)
        item["certified_accuracy"] = {_radius_label(r): round(float(row[r]), 6) for r in radii}
        out[row["name"]] = item
    return out


def cost(entries: Sequence[Entry]) -> pd.DataFrame:
    """Per entry: mean seconds and FLOPs per certified image (FLOPs from a 'flops' column, else empty),
    and noise samples per second where the certificate records n0 and n."""
    rows = []
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
        saving = (float((f["n0"] + f["n"]).mean()) / mean_draws
                  if "sequential" in f.columns and {"n0", "n"} <= set(f.columns) and mean_draws > 0
                  else math.nan)
        rows.append({"name": e.name, "method": e.method,
                     "sigma": None if e.sigma is None else fmt_sigma(e.sigma),
                     "images": len(f), "seconds_per_image": float(f["time"].mean()),
                     "total_seconds": float(f["time"].sum()), "flops_per_image": flops,
                     "samples_per_second": samples, "draws_per_image": mean_draws,
                     "draws_saving": saving})
    return pd.DataFrame(rows)


def cost_markdown(table: pd.DataFrame) -> str:
    def fmt(value, spec):
        return "" if pd.isna(value) else format(value, spec)
    lines = ["| name | images | seconds / image | noise draws / image | fewer draws than fixed n "
             "| FLOPs / image | samples / s | total seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        saving = "" if pd.isna(r["draws_saving"]) else f"{r['draws_saving']:.1f}×"
        lines.append(f"| {r['name']} | {r['images']} | {fmt(r['seconds_per_image'], '.4g')} | "
                     f"{fmt(r['draws_per_image'], '.6g')} | {saving} | {fmt(r['flops_per_image'], '.4g')} | "
                     f"{fmt(r['samples_per_second'], '.4g')} | {fmt(r['total_seconds'], '.6g')} |")
    note = ("\nSeconds come from each certificate's `time` column (measured on the machine that "
            "certified it; published logs ran elsewhere). FLOPs only where the certificate has a "
            "`flops` column. Sequential entries (`*_sequential`) stop each image's sampling early; "
            "their saving is n0 + n_max over their mean draws per image.\n")
    return "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------------------------------------- plot

def curve_grid(entries: Sequence[Entry], radii: Sequence[float], max_points: int = 500) -> np.ndarray:
    """Radii at which the plotted curves are sampled: 0 .. past the largest radius, on a round step."""
    top = max([float(e.frame["radius"].max()) for e in entries] + [max(radii, default=0.0)])
    top = max(top, 0.05) + 0.05
    step = next(s for s in (0.005, 0.01, 0.02, 0.05, 0.1, 0.5) if top / s <= max_points)
    return np.round(np.arange(0.0, top + step, step), 6)


def plot_data(entries: Sequence[Entry], grid: np.ndarray) -> pd.DataFrame:
    """Wide: a 'radius' column and one certified-accuracy column per entry."""
    data = {"radius": grid}
    for e in entries:
        data[e.name] = np.round(certified_accuracy(e.frame, grid), 6)
    return pd.DataFrame(data)


def long_curves(wide: pd.DataFrame) -> pd.DataFrame:
    """The curves of ``plot_data`` as rows (name, radius, certified_accuracy), entry by entry: the
    shape `dvc plots` draws as one series per name."""
    names = [c for c in wide.columns if c != "radius"]
    return pd.DataFrame({"name": np.repeat(names, len(wide)),
                         "radius": np.tile(wide["radius"].to_numpy(), len(names)),
                         "certified_accuracy": np.concatenate([wide[n].to_numpy() for n in names])})


_METHOD_COLOURS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "YlOrBr", "PuRd")


def line_styles(entries: Sequence[Entry]) -> dict[str, dict]:
    """Matplotlib style per entry name: one colour family per method, darker for larger sigma, a
    sequential entry dotted in its fixed-n twin's shade, the cascade dash-dotted in the method's
    darkest shade; baselines dashed grey; other files from the default colour cycle."""
    from matplotlib import colormaps

    methods = list(OrderedDict.fromkeys(e.method for e in entries if e.method and not e.baseline))
    baselines = [e for e in entries if e.baseline]
    styles, cycle = {}, 0
    for e in entries:
        if e.baseline:
            shade = 0.35 + 0.5 * baselines.index(e) / max(len(baselines) - 1, 1)
            styles[e.name] = dict(color=colormaps["Greys"](shade), linestyle="--")
        elif e.method is None:
            styles[e.name] = dict(color=f"C{cycle % 10}", linestyle="-")
            cycle += 1
        else:
            cmap = colormaps[_METHOD_COLOURS[methods.index(e.method) % len(_METHOD_COLOURS)]]
            same = sorted({f.sigma for f in entries if f.method == e.method and f.per_sigma})
            if e.per_sigma:
                shade = 0.45 + 0.45 * same.index(e.sigma) / max(len(same) - 1, 1)
                styles[e.name] = dict(color=cmap(shade), linestyle=":" if e.sequential else "-")
            else:  # cascade
                styles[e.name] = dict(color=cmap(1.0), linestyle="-.")
    return styles


def plot(entries: Sequence[Entry], curves: pd.DataFrame, path: Path) -> None:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = line_styles(entries)
    for e in entries:
        # certified accuracy is left-continuous and non-increasing in r: hold each value up to the
        # next grid point ('steps-post')
        ax.plot(curves["radius"], curves[e.name], drawstyle="steps-post", linewidth=1.4, label=e.name,
                **styles[e.name])
    ax.set_xlabel("L2 radius r ([0, 1] pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0, float(curves["radius"].max()))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


# -------------------------------------------------------------------------------------------- report

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(entries: Sequence[Entry]) -> str:
    lines = ["# rcm report: every certificate file read (entry, path, rows, sha256, format read as)"]
    for e in entries:
        for path, rows, fmt in e.frame.attrs["files"]:  # as merge_shards read them
            lines.append(f"{e.name}\t{path}\t{rows}\t{_sha256(Path(path))}\t{fmt}")
    return "\n".join(lines) + "\n"


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def write_report(entries: Sequence[Entry], radii: Sequence[float], out: str | Path) -> pd.DataFrame:
    """Write every report file into ``out``; returns the summary table."""
    if not entries:
        raise CertificateError("no certificate files to report on")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    radii = [float(r) for r in radii]
    table = summary(entries, radii)

    write_text(out / "certified_accuracy.csv", _csv(tidy(table, radii)))
    write_text(out / "certified_accuracy.md", to_markdown(table, radii))
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
    table = write_report(entries, opts.radii, args.out)
    print(to_markdown(table, [float(r) for r in opts.radii]), end="")
    print(f"report written to {args.out}")
