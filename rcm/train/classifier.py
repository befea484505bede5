"""`rcm train-classifier`: the clean classifier (sigma = 0, for dds/mdds) or Cohen et al.'s (2019)
Gaussian-augmentation baseline (sigma > 0): minimise cross-entropy of f(x + delta), delta ~ N(0, sigma^2 I)
in [0, 1] pixel space, no clipping (the inputs certification will feed the model).

Output: ``rcm.paths.classifier(results, dataset, sigma)`` (kind "classifier") and its metrics log with
clean accuracy and accuracy under noise at ``eval_sigmas`` on the validation split (never the test
split, which only certification reads).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from rcm import distributed, paths
from rcm.data import FileSplit, Split, load_split
from rcm.distributed import local
from rcm.errors import ConfigError
from rcm.importers import PLACEHOLDER
from rcm.models import kind_of
from rcm.models.classifier import Classifier
from rcm.options import add_stage_options, from_args, option, resolve_device
from rcm.train.evaluate import noisy_accuracies
from rcm.loader import TrainBatches, eval_batches
from rcm.train.loop import Run, train


@dataclass
class ClassifierOptions:
    arch: str = option("preact", "'preact' (rcm's pre-activation ResNet: width, blocks, stages) or Cohen et al.'s "
                                 "cifar_resnet20 | cifar_resnet110 | resnet50, with their normalisation")
    width: int = option(16, "channels of the first stage (doubled at each later stage)")
    blocks: int = option(1, "residual blocks per stage")
    stages: int = option(2, "stages (each after the first halves the resolution)")
    steps: int = option(600, "optimiser steps")
    batch_size: int = option(128, "images per step")
    lr: float = option(0.1, "peak SGD learning rate (linear warm-up, cosine decay to 0)")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up")
    momentum: float = option(0.9, "SGD (Nesterov) momentum")
    weight_decay: float = option(5e-4, "L2 weight decay")
    crop_padding: int = option(0, "random-translation augmentation: pad by this many pixels and crop back "
                                  "(4 on CIFAR-10; 0 on digits)")
    hflip: bool = option(False, "random horizontal flips (CIFAR-10, ImageNet; not digits)")
    seed: int = option(0, "seed of batches, noise and initialisation")
    eval_sigmas: list[float] = option([0.25, 0.5, 1.0], "noise levels of the accuracy log")
    eval_every: int = option(200, "evaluate every this many steps (and at the end)")
    checkpoint_every: int = option(200, "write resume state every this many steps")
    device: str = option("cpu", "torch device ('cpu', 'cuda', 'cuda:1', ...)")
    amp: str = option("off", "off | bf16 | fp16: autocast for the forward pass and loss (fp16 with loss "
                             "scaling; skipped steps are logged)")
    micro_batches: int = option(1, "gradient accumulation: passes per step over each process's share of "
                                   "batch_size, which stays the global batch (rcm.distributed)")
    tf32: bool = option(False, "CUDA: TF32 float32 matmuls and convolutions (default: strict IEEE float32; "
                               "rcm.precision.set_float32)")
    deterministic: bool = option(False, "CUDA: deterministic algorithms (torch.use_deterministic_algorithms, "
                                        "CUBLAS_WORKSPACE_CONFIG): a rerun on the same GPU model and software "
                                        "repeats the run bit for bit; slower")
    pretrained: str = option("", f"the clean classifier (sigma 0) to import instead of training "
                                 f"('' or {PLACEHOLDER}: train)")
    pretrained_format: str = option("", "its rcm import-model --format: cohen, timm or hf")
    pretrained_options: str = option("", "further rcm import-model options, one string (e.g. '--arch cifar_resnet110')")
    pretrained_noisy: list[str] = option([], "Gaussian baselines to import instead of training: SIGMA=PATH "
                                             "entries, same format and options")


NOISE = 1  # the stream of the training noise's per-row draws


def add_arguments(p) -> None:
    p.add_argument("--sigma", type=float, required=True,
                   help="training noise std in [0, 1] pixel space (0: the clean classifier)")
    add_stage_options(p, ClassifierOptions)


def augment(x: torch.Tensor, g: torch.Generator, crop_padding: int, hflip: bool) -> torch.Tensor:
    """Random translations (zero padding, crop back) and flips of this pass's rows (b, C, H, W) of a
    global batch: each sample's offsets and flip are drawn from ``g`` for the whole global batch (the
    same in every process), and ``local`` keeps this pass's part (rcm.distributed)."""
    b, _, H, W = x.shape
    B = b * distributed.parts()                                          # the global batch
    if crop_padding > 0:
        p = crop_padding
        off = local(torch.randint(0, 2 * p + 1, (2, B), generator=g), 1).to(x.device)
        rows = off[0, :, None] + torch.arange(H, device=x.device)           # (b, H)
        cols = off[1, :, None] + torch.arange(W, device=x.device)           # (b, W)
        xp = F.pad(x, (p, p, p, p))
        i = torch.arange(b, device=x.device)[:, None, None]
        x = xp[i, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (b, H, W, C) -> (b, C, H, W)
    if hflip:
        flip = local(torch.rand(B, generator=g) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def channel_stats(data: Split | FileSplit, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images in [0, 1] (the model's internal normalisation),
    from at most ``max_images`` evenly spaced images. A split in memory is reduced in one piece; a
    streamed one 64 images at a time (10 000 ImageNet images as floats are 6 GB), with float64 sums
    across batches."""
    rows = torch.linspace(0, len(data) - 1, min(len(data), max_images)).long()
    C = data.shape[0]
    if isinstance(data, Split):
        x = data.float_images(rows).transpose(0, 1).flatten(1)                 # (C, N*H*W)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()
    total = total_sq = torch.zeros(C, dtype=torch.float64)
    count = 0
    for batch, _ in eval_batches(data, rows, batch_size=64):
        flat = batch.transpose(0, 1).reshape(C, -1)                             # (C, b*H*W)
        total = total + flat.sum(1).double()                                    # float32 within a batch,
        total_sq = total_sq + flat.square().sum(1).double()                     # float64 across batches
        count += flat.shape[1]
        del batch, flat  # before the next batch is decoded: the peak is one batch
    mean = total / count
    var = (total_sq - count * mean * mean) / max(1, count - 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def build(opts: ClassifierOptions, data: Split | FileSplit) -> torch.nn.Module:
    C, H, W = data.shape
    if H != W:
        raise ConfigError(f"classifier expects square images, got {H}x{W}")
    if opts.arch != "preact":
        from rcm.models.cohen import ARCHS, CohenClassifier

        if opts.arch not in ARCHS:
            raise ConfigError(f"--arch {opts.arch}: not 'preact' nor one of Cohen et al.'s {', '.join(ARCHS)}")
        if C != 3 or (opts.arch.startswith("cifar_") and H != 32):
            raise ConfigError(f"--arch {opts.arch} takes 3-channel {'32 x 32 ' if opts.arch.startswith('cifar_') else ''}"
                              f"images; the data has {C} channels at {H} x {W}")
        return CohenClassifier(arch=opts.arch, num_classes=data.num_classes, image_size=H)
    mean, std = channel_stats(data)
    return Classifier(in_channels=C, num_classes=data.num_classes, image_size=H, width=opts.width,
                      blocks=opts.blocks, stages=opts.stages, mean=mean, std=std)


def warmup_cosine(warmup: int, steps: int):
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0 at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def make_run(opts: ClassifierOptions, dataset: str, results: str, sigma: float) -> Run:
    if sigma < 0:
        raise ConfigError(f"--sigma must be >= 0, got {sigma}")
    torch.manual_seed(opts.seed)  # initialisation
    train_set = load_split(paths.prepared(results, dataset, "train"))
    val_set = load_split(paths.prepared(results, dataset, "val"))
    dev = resolve_device(opts.device)
    model = build(opts, train_set).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum, nesterov=True,
                                weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opts.warmup_steps, opts.steps))
    batches = TrainBatches(train_set, min(opts.batch_size, len(train_set)), opts.seed, dev)

    def loss_fn(step: int, g: torch.Generator):
        x, y = batches(step)                                  # this pass's rows (b, C, H, W) in [0, 1]
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x = augment(x, g, opts.crop_padding, opts.hflip)
        if sigma > 0:  # per-row noise, drawn on the device (rcm.distributed.local_normal)
            x = x + sigma * distributed.local_normal(g, len(x), x.shape[1:], NOISE, dev)
        logits = model(x)
        return F.cross_entropy(logits, y), {"train_acc": (logits.argmax(1) == y).float().mean().item()}

    def eval_fn(m) -> dict:
        return noisy_accuracies(lambda s: (lambda x: m(x.to(dev)).cpu()), val_set,
                                opts.eval_sigmas, seed=opts.seed)

    config = {**dataclasses.asdict(opts), "dataset": dataset, "sigma": sigma}
    return Run(out=paths.classifier(results, dataset, sigma), kind=kind_of(model), model=model,
               model_config=model.config, config=config, optimizer=optimizer, loss_fn=loss_fn,
               steps=opts.steps, seed=opts.seed, checkpoint_every=opts.checkpoint_every,
               eval_every=opts.eval_every, eval_fn=eval_fn, scheduler=scheduler,
               desc=f"classifier sigma={paths.fmt_sigma(sigma)}", amp=opts.amp, micro_batches=opts.micro_batches,
               tf32=opts.tf32, deterministic=opts.deterministic)


def main(args) -> None:
    opts = from_args(ClassifierOptions, args)
    from rcm.importers import noisy_sources
    from rcm.importers.stage import import_instead

    source = (opts.pretrained if args.sigma == 0 else
              noisy_sources(opts.pretrained_noisy).get(paths.fmt_sigma(args.sigma), ""))
    if import_instead(source, opts.pretrained_format, opts.pretrained_options,
                      paths.classifier(args.results, args.dataset, args.sigma), "classifier",
                      args.dataset, args.results):
        return
    run = make_run(opts, args.dataset, args.results, args.sigma)
    metrics = train(run)
    if not distributed.is_main():  # another process of a torchrun launch: rank 0 wrote and reports
        return
    print(f"wrote {run.out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics[-1].items()
                                           if k.endswith("acc") or k.startswith("acc_")))
