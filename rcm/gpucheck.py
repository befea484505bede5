"""`make gpu-check` (``python -m rcm.gpucheck``): what rcm does on one CUDA GPU, in one table, within minutes.

Sections, each with its own time budget inside a global deadline (a section out of time prints a row
saying so; a section that fails prints its error as a row; the table is always printed):

1. ``tests``: the tests marked ``cuda`` (CUDA paths of certification, amp training steps, SyncBatchNorm,
   the GPU claim), run by pytest in a subprocess.
2. ``throughput``: noise draws per second through ``Smooth.sample_counts`` of the base classifier of
   each method a preset's config certifies (``methods``, then ``sequential_methods`` and the cascades'
   methods) that has a ``preset`` builder in ``rcm.methods``, at the preset's full size (random weights:
   cost does not depend on them), in float32, TF32, bf16 and fp16, in the default and the channels-last
   layout. An overlay preset measures what the merged config certifies (config/imagenet-dds.yaml: dds
   only, with Carlini et al.'s networks). A method whose preset builder is that of a method measured
   before it in the same preset builds the same network (``mdds``'s is ``dds``'s, its denoiser fine-tuned),
   so it gets one row saying so, not a second measurement. The first method measured (the first
   preset's first) is also measured compiled (bf16). Per dataset, in float32 and in bf16, one row gives
   each measured (preset, method)'s seconds per draw relative to the fastest of that dataset; the rRCM
   paper claims about 85x between DDS and rRCM at ImageNet (here: imagenet+dds dds against imagenet rrcm).
3. ``training``: one optimiser step of each training stage at its configured per-GPU batch
   (batch_size / gpus / micro_batches, the stage's amp), its peak allocated memory, and beside it the
   estimate of ``rcm.plan`` where that module offers one. The step is the stage's network(s) and loss
   on random data, not the stage's data pipeline.
4. ``cpu vs cuda``: the default run's models (results/digits/models) certified on the CPU and on CUDA on
   the same 20 images, with the reason for any difference.

Without CUDA it says so in one line and exits 0. The table is also written as markdown: to
``$OUT/gpu_check.md`` when OUT is set, else ``gpu_check.md`` here. ``--device cpu --quick`` (hidden)
runs every section on the CPU at the digits config's size, so that a test keeps this script working.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# (section, seconds): what each section may use of the global budget, in order
SECTIONS = (("tests", 80), ("throughput", 210), ("training", 75), ("cpu vs cuda", 45))
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class Check:
    """The rows of the table, the device, and the clocks."""

    def __init__(self, device: torch.device, quick: bool, budget: float, results: str):
        self.device, self.quick, self.results = device, quick, results
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.rows: list[tuple[str, str, str, str]] = []
        self.until = self.deadline

    def row(self, section: str, item: str, result: str, note: str = "") -> None:
        clean = [str(v).replace("|", "/").replace("\n", " ") for v in (section, item, result, note)]
        self.rows.append(tuple(clean))
        print(" | ".join(clean), file=sys.stderr, flush=True)      # progress, in case the run is cut off

    def left(self) -> float:
        return self.until - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fresh(self) -> None:
        """Between rows: free what the last one held and restart the peak-memory count."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error(exc: BaseException) -> str:
    return "OOM" if _oom(exc) else f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _presets(check: Check) -> list[tuple[str, list[str]]]:
    """(name, config files merged in order): the presets measured at full size; an overlay's rows are those
    of what the merged config certifies."""
    if check.quick:
        return [("digits", ["config/config.yaml"])]
    return [("cifar10", ["config/cifar10.yaml"]), ("imagenet", ["config/imagenet.yaml"]),
            ("imagenet+dds", ["config/imagenet.yaml", "config/imagenet-dds.yaml"])]


def _build(check: Check, build):
    """``build()`` with parameters created (and initialised) on the device: a 550M-parameter UNet is
    initialised in a second there, in many on a CPU; the CPU and a copy when that fails."""
    if check.device.type == "cuda":
        try:
            with check.device:
                return build()
        except Exception:  # noqa: BLE001 - any builder that insists on CPU tensors
            pass
    return build()


# ----------------------------------------------------------------------------------------------- tests

def section_tests(check: Check) -> None:
    """pytest -m cuda in a subprocess, verbose so that a run cut off by the section's deadline still
    says which tests passed and failed before it."""
    # only the files that mark tests cuda: collecting the whole suite would import every test module
    target = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                    if "mark.cuda" in f.read_text(errors="replace")) or ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "-rfE", *target]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, check.left()), env=env)
        output, result = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else (o or "") for o in (exc.stdout, exc.stderr))
        result = "TIMEOUT"
    lines = output.strip().splitlines()
    outcomes = {}
    for line in lines:                                   # "tests/test_cuda.py::test_x PASSED [ 12%]"
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL"):
            outcomes[parts[0]] = parts[1]
    counts = ", ".join(f"{sum(v == k for v in outcomes.values())} {k.lower()}"
                       for k in ("PASSED", "FAILED", "ERROR", "SKIPPED") if k in outcomes.values())
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and line.startswith("=")), "")
    check.row("tests", "pytest -m cuda", result, (summary or counts or (lines[-1][:200] if lines else "no output"))
              + (" (cut off by the section's deadline)" if result == "TIMEOUT" else ""))
    for test, outcome in outcomes.items():
        if outcome in ("FAILED", "ERROR"):
            reason = next((line.split(" - ", 1)[-1] for line in lines
                           if line.startswith(outcome) and test in line and " - " in line), "")
            check.row("tests", test.split("::", 1)[-1], outcome, reason[:200])


# ------------------------------------------------------------------------------------------ throughput

def _rate(check: Check, model, shape, classes: int, sigma: float, batch: int, seconds: float) -> tuple[float, int]:
    """(noise draws per second of Smooth.sample_counts, the batch that fit): a warm-up batch of the
    timed shape, one timed batch to size the run, then as many as fit in ``seconds`` (1 to 20)."""
    from rcm.smoothing import Smooth

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), device="cpu").to(check.device)
    gen = torch.Generator(device=check.device).manual_seed(0)
    smooth = Smooth(model, classes, sigma)
    while True:
        try:
            smooth.sample_counts(x, batch, batch, gen)           # warm-up: the same shape as timed
            check.sync()
            start = time.perf_counter()
            smooth.sample_counts(x, batch, batch, gen)
            check.sync()
            one = time.perf_counter() - start
            k = max(1, min(20, int(seconds / max(one, 1e-6))))
            start = time.perf_counter()
            smooth.sample_counts(x, k * batch, batch, gen)
            check.sync()
            return k * batch / (time.perf_counter() - start), batch
        except RuntimeError as exc:
            if not _oom(exc) or batch <= 1:
                raise
            batch //= 2                                          # the configured batch does not fit
            check.fresh()


def _row_batch(check: Check, net, shape, classes: int, sigma: float, configured: int) -> int:
    """The batch of a network's rows: the configured one, unless one float32 batch of it would take
    more than a second (the ImageNet denoiser + BEiT-L: about 10 s at 400 on an H100); then as many
    draws as a second holds, at least 16. Throughput of such a network is flat well below that batch."""
    from rcm.smoothing import Smooth

    probe = min(configured, 16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), device="cpu").to(check.device)
    gen = torch.Generator(device=check.device).manual_seed(0)
    smooth = Smooth(net, classes, sigma)
    smooth.sample_counts(x, probe, probe, gen)                   # cuDNN's and the allocator's first call
    check.sync()
    start = time.perf_counter()
    smooth.sample_counts(x, probe, probe, gen)
    check.sync()
    per_draw = (time.perf_counter() - start) / probe
    return configured if per_draw * configured <= 1.0 else max(probe, min(configured, int(1.0 / per_draw)))


LATENCY_NOTE = ("seconds per draw of each (preset, method) over the fastest's ({fastest}), from the rows above; "
                "the quotient of two entries is their latency ratio (the rRCM paper claims about 85x between "
                "DDS and rRCM at ImageNet: imagenet+dds dds against imagenet rrcm)")


def section_throughput(check: Check) -> None:
    from rcm import methods as registry
    from rcm import presets
    from rcm.stages import certified_methods
    from rcm.certify import CertifyOptions, batch_size_of
    from rcm.precision import FixedBatch, set_float32, wrap

    fields = set(CertifyOptions.__dataclass_fields__)
    rates: dict[tuple[str, str, str], float] = {}
    measured: dict[str, list[tuple[str, str]]] = {}     # dataset -> its (preset, method)s, in order
    seconds = 0.05 if check.quick else 0.5
    compiled = False
    for name, files in _presets(check):
        cfg = presets.load_config([REPO / f for f in files])
        o = CertifyOptions(**{k: v for k, v in cfg.get("certify", {}).items() if k in fields})
        c, size, classes = presets.image_shape(cfg)
        sigma = 0.5
        builders: dict[str, str] = {}                      # preset builder -> the method measured with it
        for method in certified_methods(cfg):
            if method not in registry.names() or not registry.get(method).preset:
                check.row("throughput", f"{name} {method}", "skipped",
                          "no preset builder in rcm.methods: its network cannot be built from a config")
                continue
            builder = registry.get(method).preset
            if builder in builders:
                first = builders[builder]
                check.row("throughput", f"{name} {method}", f"same network as {first}",
                          f"{builder} builds it for both: measured once, in the {name} {first} rows")
                continue
            builders[builder] = method
            measured.setdefault(str(cfg["dataset"]), []).append((name, method))
            if check.left() < 5:
                check.row("throughput", f"{name} {method}", "skipped", "out of the section's time")
                continue
            check.fresh()
            try:
                net, text = _build(check, lambda: presets.base_classifier(cfg, method, sigma))
                net = net.to(check.device).eval()
            except Exception as exc:  # noqa: BLE001
                check.row("throughput", f"{name} {method}", _error(exc), "building the network")
                continue
            params = sum(p.numel() for p in net.parameters())
            configured = min(batch_size_of(method, o), 8) if check.quick else batch_size_of(method, o)
            try:
                batch = _row_batch(check, net, (c, size, size), classes, sigma, configured)
            except Exception as exc:  # noqa: BLE001
                check.row("throughput", f"{name} {method}", _error(exc), f"a probe batch; {text}")
                continue
            for channels_last in (False, True):          # channels-last converts the network in place: last
                for prec in (("fp32", "bf16") if check.quick else PRECISIONS):
                    item = f"{name} {method} {prec}{' channels-last' if channels_last else ''}"
                    if check.left() < 3:
                        check.row("throughput", item, "skipped", "out of the section's time")
                        continue
                    check.fresh()
                    set_float32(check.device, prec == "tf32")
                    try:
                        model = wrap(net, prec if prec in ("bf16", "fp16") else "off", channels_last)
                        rate, used = _rate(check, model, (c, size, size), classes, sigma, batch, seconds)
                        rates[(name, method, f"{prec}{'-cl' if channels_last else ''}")] = rate
                        check.row("throughput", item, f"{rate:.4g} draws/s",
                                  f"batch {used}" + (f" (configured {configured}; smaller to keep the grid in "
                                                     f"its minutes)" if batch != configured else "")
                                  + (" (OOM at the batch above)" if used != batch else "")
                                  + f"; {params / 1e6:.3g}M params; {text}")
                    except Exception as exc:  # noqa: BLE001
                        check.row("throughput", item, _error(exc), f"batch {batch}")
                    finally:
                        set_float32(check.device, False)
                # torch.compile, for the first method measured (compilation takes a minute for a large network)
                if not channels_last and not compiled:
                    compiled = True
                    item = f"{name} {method} bf16 compiled"
                    if check.left() < (10 if check.quick else 90):
                        check.row("throughput", item, "skipped", "out of the section's time")
                    else:
                        check.fresh()
                        try:
                            backend = "eager" if check.quick else "inductor"   # the CPU test: the code path only
                            model = FixedBatch(torch.compile(wrap(net, "bf16"), dynamic=False, backend=backend), batch)
                            start = time.perf_counter()
                            rate, used = _rate(check, model, (c, size, size), classes, sigma, batch, seconds)
                            total = time.perf_counter() - start
                            check.row("throughput", item, f"{rate:.4g} draws/s",
                                      f"batch {used}; compilation and timing {total:.0f} s ({backend})")
                        except Exception as exc:  # noqa: BLE001
                            check.row("throughput", item, _error(exc), f"batch {batch}")
            del net
    # per dataset (its presets and overlays together): each base classifier's latency against the fastest's
    for dataset, entries in measured.items():
        for prec in ("fp32", "bf16"):
            got = [(f"{p} {m}", rates[(p, m, prec)]) for p, m in entries if rates.get((p, m, prec))]
            if len(got) < 2:
                continue
            fastest, best = max(got, key=lambda e: e[1])
            check.row("throughput", f"{dataset} latency relative to the fastest ({prec})",
                      ", ".join(f"{label} {best / rate:.3g}x" for label, rate in got),
                      LATENCY_NOTE.format(fastest=fastest))


# -------------------------------------------------------------------------------------------- training

def _options(cls, section: dict):
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in section.items() if k in names})


def _stage_step(cfg: dict, stage: str, batch: int, device: torch.device):
    """(model parameters, optimizer, loss function) of one step of ``stage`` on random data of ``batch``
    images, built from the config's section as the stage builds its network(s)."""
    from torch.nn import functional as F

    from rcm import presets

    c, size, classes = presets.image_shape(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, c, size, size, generator=g, device="cpu").to(device)
    y = torch.randint(classes, (batch,), generator=g, device="cpu").to(device)
    if stage == "classifier":
        from rcm.train.classifier import ClassifierOptions

        o = _options(ClassifierOptions, cfg["classifier"])
        net = presets.classifier(cfg, 0.25)[0].to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay)
        return net, opt, lambda: F.cross_entropy(net(x + 0.25 * torch.randn_like(x)), y)
    if stage == "denoiser":
        den = presets.denoiser(cfg)[0].to(device).train()
        opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
        return den, opt, lambda: den.loss(2 * x - 1, torch.Generator().manual_seed(1))
    if stage == "finetune_denoiser":
        from rcm.train.mdds import FinetuneDenoiserOptions, MultiScaleLoss

        o = _options(FinetuneDenoiserOptions, cfg["finetune_denoiser"])
        den = presets.denoiser(cfg)[0].to(device).train()
        clf = presets.classifier(cfg, 0.0)[0].to(device)
        objective = MultiScaleLoss(den, clf, copies=o.copies, ac_weight=o.ac_weight, denoise_weight=o.denoise_weight,
                                   ac_target=o.ac_target)
        opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
        return den, opt, lambda: objective(x, y, max(o.sigmas), torch.Generator().manual_seed(1))[0]
    from rcm.models.vit import RRCMNet, SigmaConditioned, classifier_from_encoder
    from rcm.train.rrcm_losses import ConsistencyLoss, ConsistencyRegularization, ContrastiveLoss
    from rcm.train.rrcm_pretrain import PretrainOptions, param_groups

    p = _options(PretrainOptions, cfg["rrcm_pretrain"])
    encoder = RRCMNet(image_size=size, in_channels=c, patch_size=p.patch_size, dim=p.dim, depth=p.depth,
                      heads=p.heads, mlp_ratio=p.mlp_ratio, proj_dim=p.proj_dim, proj_hidden=p.proj_hidden).to(device)
    if stage == "rrcm_pretrain":
        # the pretraining step's passes (rcm.train.rrcm_pretrain.build_run): one online pass with gradients
        # over two views and the consistency image, the EMA target over the views, the online network
        # without gradients at the next level
        target = copy.deepcopy(encoder).requires_grad_(False)
        contrastive, consistency = ContrastiveLoss(p.temperature), ConsistencyLoss(p.temperature)
        opt = torch.optim.AdamW(param_groups(encoder, p.weight_decay), lr=1e-4)
        x2 = 2 * x - 1

        def loss():
            eps = torch.randn_like(x2)
            levels = torch.cat([torch.full((2 * batch,), 0.002), torch.full((batch,), 0.5)]).to(device)
            inputs = torch.cat([x2 + 0.002 * eps, x2.flip(-1) + 0.002 * eps, x2 + 0.5 * eps])
            hs = encoder.representation(inputs, levels)
            z1, z2 = encoder.project(hs[:2 * batch]).chunk(2)
            with torch.no_grad():
                t1, t2 = target.project(target.representation(inputs[:2 * batch], levels[:2 * batch])).chunk(2)
                h_next = encoder.representation(x2 + 0.4 * eps, 0.4)
            return contrastive(z1, z2, t1, t2, 0) + consistency(hs[2 * batch:], h_next, 0)

        return encoder, opt, loss
    from rcm.train.rrcm_finetune import FinetuneOptions

    o = _options(FinetuneOptions, cfg["rrcm_finetune"])
    model = classifier_from_encoder(encoder, classes).to(device).train()
    del encoder
    base = SigmaConditioned(model, 0.5)
    regulariser = ConsistencyRegularization(o.lambda_large, o.eta)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay, o.layer_decay), lr=1e-4)

    def loss():
        xs = (x[None] + 0.5 * torch.randn((o.num_draws, *x.shape), device=device)).flatten(0, 1)
        logits = base(xs).reshape(o.num_draws, batch, -1)
        return regulariser.weighted(regulariser.terms(logits, y))

    return model, opt, loss


def _plan_estimate(files: list[str], stage: str) -> str:
    """``rcm.plan``'s estimate of the stage's peak memory per GPU, where that module offers one."""
    try:
        from rcm import plan
    except ImportError:
        return "n/a"
    for name in ("estimate", "estimate_memory", "memory", "peak_memory"):
        f = getattr(plan, name, None)
        if callable(f):
            try:
                value = f([str(REPO / p) for p in files], stage)
            except Exception as exc:  # noqa: BLE001 - another engineer's interface: say what happened
                return f"n/a (rcm.plan.{name}: {type(exc).__name__})"
            if isinstance(value, dict):
                value = next((value[k] for k in ("peak", "bytes", "total") if k in value), value)
            return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else str(value)
    return "n/a"


STAGES = ("classifier", "denoiser", "finetune_denoiser", "rrcm_pretrain", "rrcm_finetune")


def section_training(check: Check) -> None:
    from rcm import presets
    from rcm.precision import autocast, set_float32

    for name, files in _presets(check):
        if name == "imagenet+dds":
            continue                                   # imported networks: fine-tuned elsewhere, not trained here
        cfg = presets.load_config([REPO / f for f in files])
        for stage in STAGES:
            section = cfg.get(stage, {})
            gpus = max(1, int(cfg.get("gpus", {}).get(stage, 0) or 0))
            batch = max(1, int(section.get("batch_size", 1)) // gpus // max(1, int(section.get("micro_batches", 1))))
            amp = str(section.get("amp", "off"))
            amp = "off" if amp in ("False", "false") else amp
            if check.quick:
                batch = min(batch, 2)
            item = f"{name} {stage}"
            plan = _plan_estimate(files, stage)
            if check.left() < 3:
                check.row("training", item, "skipped", "out of the section's time")
                continue
            check.fresh()
            set_float32(check.device, False)
            base = torch.cuda.memory_allocated(check.device) if check.device.type == "cuda" else 0
            try:
                params, opt, loss_fn = _build(check, lambda: _stage_step(cfg, stage, batch, check.device))
                scaler = torch.amp.GradScaler(check.device.type, enabled=amp == "fp16")
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with autocast(amp, check.device):
                    loss = loss_fn().float()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                check.sync()
                seconds = time.perf_counter() - start
                # weights, gradients, optimiser state and activations of this step: what was allocated before
                # it (nothing, normally) is not the stage's
                peak = torch.cuda.max_memory_allocated(check.device) - base if check.device.type == "cuda" else None
                check.row("training", item, f"{peak / 2**30:.2f} GiB peak" if peak is not None else "ran (no CUDA memory)",
                          f"batch {batch} per GPU ({gpus} GPU(s)), amp {amp}, one step {seconds:.2f} s "
                          f"(first, unwarmed); rcm.plan: {plan}")
            except Exception as exc:  # noqa: BLE001
                check.row("training", item, _error(exc), f"batch {batch} per GPU ({gpus} GPU(s)), amp {amp}; "
                                                         f"rcm.plan: {plan}")
            finally:
                params = opt = loss_fn = loss = None            # noqa: F841 - free before the next row


# ----------------------------------------------------------------------------------------- cpu vs cuda

def _counts_with_cpu_noise(smooth, x, num, batch_size, generator):
    """Smooth.sample_counts with the noise drawn on the CPU (from a CPU generator) and moved to x's
    device: CUDA arithmetic on the CPU's draws."""
    counts = torch.zeros(smooth.num_classes, dtype=torch.long)
    remaining = num
    with torch.inference_mode():
        while remaining > 0:
            b = min(batch_size, remaining)
            noise = torch.randn((b, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
            predictions = smooth.base_classifier(noise.mul_(smooth.sigma).add_(x)).argmax(1)
            counts += torch.bincount(predictions, minlength=smooth.num_classes).cpu()
            remaining -= b
    return counts.numpy()


def section_cpu_vs_cuda(check: Check) -> None:
    import yaml

    from rcm import paths, stats
    from rcm.certify import CertifyOptions
    from rcm.data import load_split
    from rcm.errors import CheckpointError
    from rcm.models.factory import base_classifier, checkpoints
    from rcm.smoothing import Smooth, noise_generator

    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    o = _options(CertifyOptions, cfg["certify"])
    results, dataset, sigma = check.results, "digits", 0.5
    test = paths.prepared(results, dataset, "test")
    if not Path(test).exists():
        check.row("cpu vs cuda", "default run", "skipped", f"no prepared test split at {test} (run `make run` first)")
        return
    split = load_split(test)
    rows = split.certification_rows(1, 3 if check.quick else 20)
    cpu = torch.device("cpu")
    for method in cfg["methods"]:
        missing = [str(f) for f in checkpoints(method, sigma, results, dataset).values() if not Path(f).exists()]
        if missing:
            check.row("cpu vs cuda", f"{method} sigma {sigma}", "skipped", f"no model: {', '.join(missing)} "
                      "(the default run's models: `make run`)")
            continue
        if check.left() < 5:
            check.row("cpu vs cuda", f"{method} sigma {sigma}", "skipped", "out of the section's time")
            continue
        try:
            net = base_classifier(method, sigma, results, dataset, cpu)
        except CheckpointError as exc:
            check.row("cpu vs cuda", f"{method} sigma {sigma}", "skipped", str(exc)[:200])
            continue
        on_cpu = Smooth(net, split.num_classes, sigma)
        on_gpu = Smooth(copy.deepcopy(net).to(check.device), split.num_classes, sigma)
        out = {"cpu": [], "cuda": [], "cuda, CPU noise": []}
        labels = []
        done = 0
        for row in rows.tolist():
            if check.left() < 1:
                break                                   # the rest of the images: out of the section's time
            done += 1
            idx, label = int(split.indices[row]), int(split.labels[row])
            labels.append(label)
            x = split.float_images(row)
            out["cpu"].append(on_cpu.certify(x, o.n0, o.n, o.alpha, o.batch_size,
                                             noise_generator(o.seed, method, sigma, idx, cpu)))
            out["cuda"].append(on_gpu.certify(x.to(check.device), o.n0, o.n, o.alpha, o.batch_size,
                                              noise_generator(o.seed, method, sigma, idx, check.device)))
            g = noise_generator(o.seed, method, sigma, idx, cpu)
            xd = x.to(check.device)
            selection = _counts_with_cpu_noise(on_gpu, xd, o.n0, o.batch_size, g)
            estimation = _counts_with_cpu_noise(on_gpu, xd, o.n, o.batch_size, g)
            p, r, _, _ = stats.certify_from_counts(selection, estimation, o.alpha, sigma)
            out["cuda, CPU noise"].append((p, r))

        if not done:
            check.row("cpu vs cuda", f"{method} sigma {sigma}", "skipped", "out of the section's time")
            continue

        def summary(rs):
            correct = [p == y for (p, _), y in zip(rs, labels)]
            return (f"certified acc at r=0 / 0.25: {sum(correct) / len(rs):.2f} / "
                    f"{sum(c and r >= 0.25 for c, (_, r) in zip(correct, rs)) / len(rs):.2f}")

        def agree(a, b):
            return sum(p == q for (p, _), (q, _) in zip(out[a], out[b])), \
                max(abs(r - s) for (_, r), (_, s) in zip(out[a], out[b]))

        same_noise, radius_noise = agree("cpu", "cuda, CPU noise")
        same, radius = agree("cpu", "cuda")
        if check.device.type == "cpu":
            reason = "one device (--device cpu): the same draws and the same arithmetic"
        else:
            reason = ("CUDA draws its noise with Philox, the CPU with mt19937 from the same seed: other draws of the "
                      "same distribution" + ("; the rows agree all the same" if same == done and radius == 0 else
                                             ", so counts differ and a prediction near a tie can flip")
                      + ("; on the CPU's draws CUDA gives the CPU's rows: the arithmetic is not a cause"
                         if same_noise == done and radius_noise == 0 else
                         "; on the CPU's draws CUDA still differs: float32 rounding of cuDNN/cuBLAS against oneDNN "
                         "kernels moves draws that lie near a decision boundary"))
        short = "" if done == len(rows) else f" ({done} of {len(rows)} images: out of the section's time)"
        check.row("cpu vs cuda", f"{method} sigma {sigma}", f"{same}/{done} predictions agree{short}",
                  f"cpu: {summary(out['cpu'])}; cuda: {summary(out['cuda'])}; max |radius diff| {radius:.3g}; "
                  f"cuda on the CPU's noise: {same_noise}/{done} agree, max |radius diff| {radius_noise:.3g}. "
                  f"{reason}")


# ------------------------------------------------------------------------------------------------ main

RUNNERS = {"tests": section_tests, "throughput": section_throughput, "training": section_training,
           "cpu vs cuda": section_cpu_vs_cuda}


def run(check: Check) -> None:
    for name, seconds in SECTIONS:
        now = time.monotonic()
        check.until = min(check.deadline, now + seconds)
        if check.until - now < 2:
            check.row(name, "(section)", "skipped", "the global deadline has passed")
            continue
        try:
            RUNNERS[name](check)
        except Exception as exc:  # noqa: BLE001 - a section's failure is a row, not the end of the check
            check.row(name, "(section)", _error(exc), traceback.format_exc().strip().splitlines()[-2][:200])
        finally:
            check.fresh()


def table(check: Check) -> str:
    from rcm.precision import arithmetic_provenance

    facts = arithmetic_provenance(check.device)
    head = (f"# rcm gpu-check\n\n{facts['device_name']} (capability {facts['capability']}), torch {facts['torch']}, "
            f"CUDA {facts['cuda']}, cuDNN {facts['cudnn']}; {time.monotonic() - check.start:.0f} s"
            f"{' (quick, CPU)' if check.quick else ''}\n\n")
    lines = ["| section | item | result | note |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in check.rows]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rcm.gpucheck", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=420.0, help="global deadline in seconds (default 420)")
    p.add_argument("--results", default="results", help="results root of the default run (cpu vs cuda)")
    p.add_argument("--out", default="", help="markdown file (default: $OUT/gpu_check.md, else ./gpu_check.md)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return 0
    if device.type == "cuda":
        from rcm.distributed import local_device

        device = local_device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    check = Check(device, args.quick, args.budget, args.results)
    from rcm.precision import set_float32

    set_float32(device, False)          # IEEE float32 unless a row asks for TF32 (torch's default: TF32 convolutions)
    try:
        run(check)
    finally:
        set_float32(device, False)
        text = table(check)
        print(text)
        out = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("."))
        if out.is_dir() or not out.suffix:
            out = out / "gpu_check.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"gpu-check: written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
