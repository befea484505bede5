"""The certified-accuracy plot: curves sampled on a radius grid (also DVC's plot data), one
step curve per entry, styled by method, sigma and mode."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rcm.atomic import atomic_path
from rcm.report.entries import Entry
from rcm.report.tables import certified_accuracy

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
    darkest shade (its sequential twin dotted in that shade); baselines dashed grey; other files from the default colour cycle."""
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
                styles[e.name] = dict(color=cmap(1.0), linestyle=":" if e.sequential else "-.")
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
