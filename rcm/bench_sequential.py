"""`rcm bench-sequential`: fixed-n against sequential certification on the same images (numbers, not a test).

For each method and sigma of a finished run, certifies the same test images twice with the same
noise streams (seed, method, sigma, idx): ``Smooth.certify`` at n and ``Smooth.certify_sequential``
with n_max = n, stopping on the report's radii. Prints, per (method, sigma), certified accuracy of
both at each radius, mean, median and 90th percentile of noise draws per image, the saving in
draws, wall time, and how many images stopped within 1 000, 10 000, later, or ran to n0 + n_max
draws. Writes nothing into the run's results (``--draws_csv``: the per-image rows, elsewhere).

The oracle column is the figure of merit of the stopping rule: for each image the sequential run
certifies, the fewest estimation draws a fixed-n Clopper-Pearson bound at the same alpha would need
to certify the radius the sequential run reported, if p_A were known exactly (the count at its
expectation, stats.oracle_draws). p_A is taken as the fixed-n run's count / n (n = n_max draws of
the same stream). Printed: the mean oracle draws and mean sequential estimation draws over those
images, and their ratio (sequential / oracle; images whose estimated p_A does not exceed the
reported bound have no finite oracle and are counted apart).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from rcm import paths
from rcm.data import load_split
from rcm.models.factory import base_classifier
from rcm.atomic import write_text
from rcm.options import resolve_device
from rcm.report import DEFAULT_RADII, certified_accuracy
from rcm.smoothing import Smooth, noise_generator
from rcm.stats import ABSTAIN, oracle_draws


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=paths.DATASETS)
    p.add_argument("--results", default="results", help="results root of a finished run (its models)")
    p.add_argument("--methods", nargs="+", default=list(paths.METHODS))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII), help="target radii")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000, help="fixed n, and the sequential rule's n_max")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch_size", type=int, default=10_000)
    p.add_argument("--skip", type=int, default=1, help="every skip-th test image")
    p.add_argument("--max_images", type=int, default=0, help="at most this many images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--draws_csv", default="", help="also write one row per (method, sigma, image): both "
                                                   "rules' prediction and radius, and the draws used")


def _accuracy(rows: list[tuple[int, float]], label: np.ndarray, radii) -> list[float]:
    """The report's certified accuracy (rcm.report.certified_accuracy) of (prediction, radius) rows."""
    pred = np.array([p for p, _ in rows])
    frame = pd.DataFrame({"correct": (pred == label).astype(int), "radius": [r for _, r in rows]})
    return certified_accuracy(frame, radii).tolist()


def bench_pair(smooth: Smooth, images, labels, idxs, args, method: str, sigma: float) -> dict:
    """Both rules on the same images and noise streams: accuracies, draws and seconds."""
    fixed, seq, draws, seconds = [], [], [], {"fixed": 0.0, "sequential": 0.0}
    per_image = []
    for x, idx in zip(images, idxs):
        start = time.perf_counter()
        p_fixed, r_fixed, count_fixed, _ = smooth.certify_with_details(
            x, args.n0, args.n, args.alpha, args.batch_size, noise_generator(args.seed, method, sigma, idx, x.device))
        fixed.append((p_fixed, r_fixed))
        seconds["fixed"] += time.perf_counter() - start
        start = time.perf_counter()
        p, r, used = smooth.certify_sequential(x, args.n0, args.n, args.alpha, args.batch_size, args.radii,
                                               noise_generator(args.seed, method, sigma, idx, x.device))
        seconds["sequential"] += time.perf_counter() - start
        seq.append((p, r))
        draws.append(used)
        # the oracle: p_A = the fixed-n estimate on the same stream (same selection, so the same class)
        oracle = (oracle_draws(count_fixed / args.n, float(norm.cdf(r / sigma)), args.alpha)
                  if p != ABSTAIN else math.nan)
        per_image.append(dict(method=method, sigma=sigma, idx=idx, fixed_predict=fixed[-1][0],
                              fixed_radius=fixed[-1][1], sequential_predict=p, sequential_radius=r, draws=used,
                              p_a_estimate=count_fixed / args.n, oracle_draws=oracle))
    draws = np.array(draws)
    oracle = np.array([row["oracle_draws"] for row in per_image])
    finite = np.isfinite(oracle)
    seq_estimation = draws[finite] - args.n0
    full = args.n0 + args.n
    buckets = [int((draws <= 1_000).sum()), int(((draws > 1_000) & (draws <= 10_000)).sum()),
               int(((draws > 10_000) & (draws < full)).sum()), int((draws >= full).sum())]
    return dict(method=method, sigma=sigma, images=len(idxs),
                fixed=_accuracy(fixed, labels, args.radii), sequential=_accuracy(seq, labels, args.radii),
                fixed_draws=full, mean_draws=float(draws.mean()),
                median_draws=float(np.median(draws)), p90_draws=float(np.percentile(draws, 90)),
                buckets=buckets, seconds=seconds, per_image=per_image,
                oracle_images=int(finite.sum()), no_oracle=int((~np.isnan(oracle) & ~finite).sum()),
                oracle_mean=float(oracle[finite].mean()) if finite.any() else math.nan,
                seq_estimation_mean=float(seq_estimation.mean()) if finite.any() else math.nan)


def main(args) -> None:
    device = resolve_device(args.device)
    split = load_split(paths.prepared(args.results, args.dataset, "test"))
    rows = split.certification_rows(args.skip, args.max_images or None)
    labels = np.asarray(split.labels[rows])
    idxs = [int(split.indices[r]) for r in rows]
    images = [split.float_images(int(r)).to(device) for r in rows]
    radii = " ".join(f"{r:g}" for r in args.radii)
    print(f"{len(idxs)} images, n0={args.n0}, n = n_max = {args.n}, alpha={args.alpha}, radii {radii}")
    print("| method | sigma | rule | " + " | ".join(f"r={r:g}" for r in args.radii)
          + " | mean draws | median draws | p90 draws | saving | seconds | draws <=1k / <=10k / more / all "
          "| oracle images | seq. estimation draws | oracle draws | seq. / oracle |")
    print("|---|---|---|" + "---|" * len(args.radii) + "---|---|---|---|---|---|---|---|---|---|")
    per_image = []
    for method in args.methods:
        for sigma in args.sigmas:
            model = base_classifier(method, sigma, args.results, args.dataset, device)
            with torch.inference_mode():
                r = bench_pair(Smooth(model, split.num_classes, sigma), images, labels, idxs, args, method, sigma)
            per_image += r["per_image"]
            for rule in ("fixed", "sequential"):
                acc = " | ".join(f"{a:.3f}" for a in r[rule])
                if rule == "fixed":
                    draws = f"{r['fixed_draws']} | {r['fixed_draws']} | {r['fixed_draws']} | 1.0x"
                else:
                    draws = (f"{r['mean_draws']:.0f} | {r['median_draws']:.0f} | {r['p90_draws']:.0f} | "
                             f"{r['fixed_draws'] / r['mean_draws']:.1f}x")
                spread = " / ".join(map(str, r["buckets"])) if rule == "sequential" else ""
                oracle = " | | | "
                if rule == "sequential":
                    ratio = r["seq_estimation_mean"] / r["oracle_mean"] if r["oracle_images"] else math.nan
                    apart = f" (+{r['no_oracle']} without)" if r["no_oracle"] else ""
                    oracle = (f"{r['oracle_images']}{apart} | {r['seq_estimation_mean']:.0f} | "
                              f"{r['oracle_mean']:.0f} | {ratio:.2f}x")
                print(f"| {method} | {sigma:g} | {rule} | {acc} | {draws} | {r['seconds'][rule]:.1f} | {spread} | "
                      f"{oracle} |", flush=True)
    if args.draws_csv:
        write_text(args.draws_csv, pd.DataFrame(per_image).to_csv(index=False))
