"""`rcm bench certify`: how fast the certification hot path runs, in numbers (not a test).

Reports, for one base classifier and batch size: noise samples per second through
``Smooth.sample_counts`` (noise generation + forward pass + bincount, the loop certification
spends its time in), seconds per certified image at each requested n (measured up to
``--measure_max``, extrapolated linearly from the measured rate above it, and labelled so), FLOPs
per sample counted by torch.utils.flop_counter, the FLOP/s this achieves, and the fraction of this
machine's measured matmul peak (the best of several large FP32 matmuls on the same device and
thread count: a practical peak, not the vendor's datasheet number).

``--amp``, ``--channels_last`` and ``--compile`` run the base classifier as ``rcm certify`` would with
those options (rcm.precision.wrap); ``--against_fp32`` also measures the same network in plain
float32, in the same process, and prints the speed-up.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from rcm import paths
from rcm.errors import ConfigError
from rcm.flops import count_flops, flops_per_sample
from rcm.options import resolve_device
from rcm.precision import AMP, native_support, set_float32, wrap
from rcm.smoothing import Smooth


def add_arguments(p) -> None:
    p.add_argument("what", choices=["certify", "load"],
                   help="certify: the certification hot path; load: training batches from a prepared train "
                        "split (ImageNet: decoded by `rcm --workers N` DataLoader workers)")
    p.add_argument("--steps", type=int, default=20, help="load: training batches timed after the first")
    p.add_argument("--checkpoint", default="", help="a classifier or rrcm checkpoint to smooth")
    p.add_argument("--method", default="", help="or a method of a finished run (with --sigma)")
    p.add_argument("--sigma", type=float, default=0.25, help="noise level in [0, 1] pixel units")
    p.add_argument("--dataset", default="digits", choices=paths.DATASETS)
    p.add_argument("--results", default="results", help="results root of a finished run")
    p.add_argument("--batch_size", type=int, default=1000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--ns", type=int, nargs="+", default=[10_000, 100_000], help="n values to report")
    p.add_argument("--measure_max", type=int, default=10_000,
                   help="measure n up to this; extrapolate larger n from the measured rate")
    p.add_argument("--images", type=int, default=3, help="images certified per measured n")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=AMP, default="off", help="autocast around the base classifier (rcm.precision)")
    p.add_argument("--channels_last", action="store_true", help="channels-last convolutions")
    p.add_argument("--compile", action="store_true", help="torch.compile the base classifier (compile time excluded)")
    p.add_argument("--tf32", action="store_true", help="CUDA: float32 matmuls and convolutions in TF32 "
                                                       "(rcm.precision.set_float32; off: IEEE float32)")
    p.add_argument("--against_fp32", action="store_true",
                   help="also measure the same network in plain float32 and print the speed-up")
    p.add_argument("--arch", default="", help="or an untrained network of this shape: cifar_resnet20, "
                                              "cifar_resnet110 or resnet50 (Cohen et al.'s)")
    p.add_argument("--config", nargs="+", default=[],
                   help="or the base classifier that --method certifies under this preset (and overlays, "
                        "merged in order), built at full size with random weights (rcm.presets)")
    p.add_argument("--flops_only", action="store_true",
                   help="print FLOPs and parameters only (counted on the meta device, with no memory or arithmetic; "
                        "on the CPU where an operator has no meta kernel)")


def _model(args, device) -> tuple[nn.Module, str, int, tuple[int, ...]]:
    """(base classifier, description, num_classes, image shape)."""
    from rcm.models import load_model

    if args.config:
        from rcm import presets

        if not args.method:
            raise ConfigError("--config needs --method: which method's base classifier to build")
        cfg = presets.load_config(args.config)
        from rcm import methods

        methods.register_config(cfg.get("custom_methods") or {})   # a user's method, with its preset
        model, text = presets.base_classifier(cfg, args.method, args.sigma)
        c, size, classes = presets.image_shape(cfg)
        return (model, f"{args.method} at sigma={args.sigma} under {' + '.join(args.config)}: {text} "
                       "(random weights)", classes, (c, size, size))
    if args.checkpoint:
        model, payload = load_model(args.checkpoint)
        cfg = payload["model_config"]
        if payload["kind"] == "rrcm":
            from rcm.models.vit import SigmaConditioned

            model = SigmaConditioned(model, args.sigma)
        elif payload["kind"] != "classifier":
            raise ConfigError(f"{args.checkpoint} holds a '{payload['kind']}' model; benchmark a classifier, "
                              "an rrcm checkpoint, or a method (--method) of a finished run")
        return (model, f"checkpoint {args.checkpoint}", cfg["num_classes"],
                (cfg["in_channels"], cfg["image_size"], cfg["image_size"]))
    if args.method:
        from rcm.data import load_split
        from rcm.models.factory import base_classifier

        split = load_split(paths.prepared(args.results, args.dataset, "test"))
        model = base_classifier(args.method, args.sigma, args.results, args.dataset, device)
        return model, f"{args.method} at sigma={args.sigma} from {args.results}", split.num_classes, \
            tuple(split.images.shape[1:])
    if args.arch:
        from rcm.models.cohen import ARCHS, CohenClassifier

        if args.arch not in ARCHS:
            raise ConfigError(f"--arch {args.arch}: not one of {', '.join(ARCHS)}")
        size = 32 if args.arch.startswith("cifar_") else 224
        classes = 10 if args.arch.startswith("cifar_") else 1000
        torch.manual_seed(0)
        return (CohenClassifier(arch=args.arch, num_classes=classes, image_size=size),
                f"{args.arch} (random weights; its cost does not depend on them)", classes, (3, size, size))
    from rcm.models.classifier import Classifier

    model = Classifier(in_channels=1, num_classes=10, image_size=8)
    return model, "the default digits Classifier (untrained; its cost does not depend on weights)", 10, (1, 8, 8)


def matmul_size(device: torch.device) -> int:
    """Large enough to be compute-bound: 2048 on a CPU; a GPU needs 8192 to hide launch overhead."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best FP32 FLOP/s of a size x size matmul on ``device`` (IEEE float32: TF32 off while it runs)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _matmul_peak(device, size, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_shapes(batch_size: int, *draws: int) -> list[int]:
    """The batch sizes ``Smooth.sample_counts`` runs for each of ``draws`` draws: full batches and the
    remainder."""
    return sorted({min(d, batch_size) for d in draws if d > 0} | {d % batch_size for d in draws if d % batch_size})


def warm_up(smooth: Smooth, x: torch.Tensor, shapes: list[int], batch_size: int, device: torch.device,
            gen: torch.Generator) -> None:
    """One batch of each size that is then timed: compilation, cuDNN's and cuBLAS's per-shape algorithm
    choice and the allocator's first blocks happen here, not in a timed run."""
    for b in shapes:
        smooth.sample_counts(x, b, batch_size, gen)
    _sync(device)


def _rate(smooth: Smooth, x: torch.Tensor, args, device: torch.device, gen: torch.Generator) -> float:
    """Best-of-three noise samples per second of ``smooth`` at x (after a warm-up batch of each size)."""
    draws = max(args.batch_size, min(args.measure_max, 20 * args.batch_size))
    warm_up(smooth, x, batch_shapes(args.batch_size, draws), args.batch_size, device, gen)
    best = float("inf")
    for _ in range(3):  # best of three: on shared cores the fastest run is the least disturbed one
        _sync(device)
        start = time.perf_counter()
        smooth.sample_counts(x, draws, args.batch_size, gen)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return draws / best


def bench_certify(args) -> dict:
    device = resolve_device(args.device)
    set_float32(device, args.tf32)
    model, description, num_classes, shape = _model(args, device)
    model = model.to(device).eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    flops = flops_per_sample(model, x)
    fp32_rate = _rate(Smooth(model, num_classes, args.sigma), x, args, device, gen) if args.against_fp32 else None
    smooth = Smooth(wrap(model, args.amp, args.channels_last, args.compile, args.batch_size), num_classes,
                    args.sigma)
    rate = _rate(smooth, x, args, device, gen)

    per_image = {}
    measured = [n for n in args.ns if n <= args.measure_max]
    warm_up(smooth, x, batch_shapes(args.batch_size, args.n0, *measured), args.batch_size, device, gen)
    for n in args.ns:
        if n <= args.measure_max:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.images):
                smooth.certify(x, args.n0, n, 0.001, args.batch_size, gen)
            _sync(device)
            per_image[n] = ((time.perf_counter() - start) / args.images, "measured")
        else:
            per_image[n] = ((args.n0 + n) / rate, "extrapolated from the measured rate")
    size = matmul_size(device)
    peak = matmul_peak(device, size)
    return dict(matmul_size=size, description=description, device=str(device), threads=torch.get_num_threads(),
                batch_size=args.batch_size, flops=flops, rate=rate, per_image=per_image,
                achieved=rate * flops, peak=peak, fp32_rate=fp32_rate,
                precision=_precision_text(args), native=native_support(args.amp, device))


def _precision_text(args) -> str:
    parts = [("TF32" if args.tf32 else "float32") if args.amp == "off" else f"autocast {args.amp}"]
    parts += ["TF32 float32 layers"] if args.tf32 and args.amp != "off" else []
    parts += ["channels-last"] if args.channels_last else []
    parts += ["torch.compile"] if args.compile else []
    return ", ".join(parts)


def flops_report(args) -> dict:
    model, description, _, shape = _model(args, torch.device("cpu"))
    from rcm.presets import parameters

    return dict(description=description, shape=shape, flops=count_flops(model, shape), params=parameters(model))


def bench_load(args) -> dict:
    """Training batches per second from the prepared train split, as a stage reads them (rcm.loader):
    the first batch (workers start, first decodes) is timed apart from the next ``--steps``."""
    from rcm.data import FileSplit, load_split
    from rcm.loader import TrainBatches, workers

    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")

    split = load_split(paths.prepared(args.results, args.dataset, "train"))
    batches = TrainBatches(split, min(args.batch_size, len(split)), seed=0)
    start = time.perf_counter()
    batches(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batches(step)
    elapsed = time.perf_counter() - start
    return {"source": f"{len(split)} files, streamed" if isinstance(split, FileSplit) else "in memory",
            "workers": workers() if isinstance(split, FileSplit) else 0, "shape": split.shape,
            "batch_size": batches.batch_size, "first": first, "per_step": elapsed / args.steps,
            "images_per_s": args.steps * batches.batch_size / elapsed}


def main(args) -> None:
    if args.what == "load":
        r = bench_load(args)
        print(f"load {args.dataset} train ({r['source']}, {' x '.join(map(str, r['shape']))}), "
              f"{r['workers']} worker(s), batch {r['batch_size']}: {r['images_per_s']:.4g} images/s, "
              f"{r['per_step']:.3f} s per step (first batch {r['first']:.2f} s)")
        return
    if args.flops_only:
        r = flops_report(args)
        print(f"{'base classifier':<20}: {r['description']}")
        print(f"{'input':<20}: {' x '.join(map(str, r['shape']))}")
        print(f"{'parameters':<20}: {r['params']:.4g}")
        print(f"{'FLOPs per sample':<20}: {r['flops']:.4g} (torch.utils.flop_counter; 2 per multiply-add)")
        return
    r = bench_certify(args)
    size = r["matmul_size"]
    lines = [
        ("base classifier", r["description"]),
        ("device", f"{r['device']}, {r['threads']} torch thread(s), batch {r['batch_size']}"),
        ("precision", r["precision"] + ("" if r["native"] else f" (no native {args.amp} on this device: emulated)")),
        ("FLOPs per sample", f"{r['flops']:.4g} (torch.utils.flop_counter)"),
        ("noise samples/s", f"{r['rate']:.4g} (noise + forward + bincount)"),
        *([("float32 samples/s", f"{r['fp32_rate']:.4g}, the same network in plain float32"),
           ("speed-up", f"{r['rate'] / r['fp32_rate']:.3g}x over float32")] if r["fp32_rate"] else []),
        *[("seconds/image", f"{seconds:.4g} at n0={args.n0}, n={n} ({how})")
          for n, (seconds, how) in r["per_image"].items()],
        ("achieved FLOP/s", f"{r['achieved']:.4g}"),
        ("measured matmul peak", f"{r['peak']:.4g} FLOP/s (best of FP32 {size}x{size} matmuls on this "
                                 "device and thread count)"),
        ("fraction of peak", f"{r['achieved'] / r['peak']:.3f}"),
    ]
    for label, value in lines:
        print(f"{label:<20}: {value}")
