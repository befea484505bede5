"""Certificate files -> report entries: one entry per (method, sigma[, sequential]) folder of shards,
per standalone file, or per published baseline, named and ordered for the tables."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import pandas as pd

from rcm import methods
from rcm.certificate import merge_shards
from rcm.errors import CertificateError
from rcm.paths import CASCADE, METHODS, SEQUENTIAL, fmt_sigma, parse_baseline  # noqa: F401 - re-exported

_SHARD = re.compile(r"^shard_(\d+)-of-(\d+)\.tsv$")
_MERGED = re.compile(r"^(.+)_sigma_(.+)\.tsv$")  # a merged '{method}_sigma_{s}.tsv', e.g. one a user concatenated
# a file name's noise level: Cohen et al.'s 'sigma_0.25' (no extension), 'noise_0.25_sigma_0.25.tsv',
# Jeong & Shin's 'sigma_0.25_N10k.tsv', Lei et al.'s 'certify_result_0.25.txt'
_STEM_SIGMA = re.compile(r"(?:sigma|certify_result)_(\d*\.?\d+)(?:_N\d+k?)?$")
# an extension is a word ('.tsv', '.txt', '.log'); Cohen et al.'s 'sigma_0.25' has none, not '.25'
_EXTENSION = re.compile(r"^\.[A-Za-z][A-Za-z0-9]*$")

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
        if sigma is not None:
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
        return f"{method}_{CASCADE}" + (f"_{SEQUENTIAL}" if sequential else "")
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
    ``{method}_sigma_{s}`` (``{method}_cascade``, or ``{method}_cascade_harmonic`` for that alpha
    split); every other file is its own entry named after the file (``distinct_labels``: without a real extension, with parent folders where names would
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
        name = entry_name(group["method"], group["sigma"], paths[0], group["sequential"])
        if group["method"] and sigma == CASCADE and "alpha_split" in frame.columns:
            splits = sorted(set(frame["alpha_split"].astype(str)) - {"uniform"})
            name += "".join(f"_{split}" for split in splits)  # a non-default alpha split is in the name
        entries.append(Entry(name=name, frame=frame, paths=paths, method=group["method"], sigma=sigma,
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
    """Our methods first (the built-ins in registry order, then any other method by name; fixed n, then
    sequential; sigma ascending, cascade last), then other files as given, then baselines as given."""
    def key(item: tuple[int, Entry]):
        pos, e = item
        if e.baseline or e.method is None:
            return (2 if e.baseline else 1, 0, "", False, 0.0, pos)
        rank = methods.rank(e.method)
        sigma = e.sigma if isinstance(e.sigma, float) else math.inf
        return (0, rank, e.method, e.sequential, sigma, pos)
    return [e for _, e in sorted(enumerate(entries), key=key)]
