"""`rcm train-denoiser`: the DDPM denoiser of `dds`, trained from scratch with the DDPM "simple" loss
(Ho et al. 2020: E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2, t ~ U{0..T-1}) and EMA
weights, or imported from a local diffusers directory (``--pretrained PATH``: no training).

Output: ``rcm.paths.denoiser(results, dataset)`` (kind "denoiser"). Consumers should load it with
``load_model(path, use_ema=True)`` (the EMA weights; an imported model has only one set).
The metrics log records one-shot denoising MSE (in [0, 1] pixel units) at ``eval_sigmas`` on the
validation split (never the test split).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from rcm import distributed, paths
from rcm.data import FileSplit, Split, load_split
from rcm.errors import ConfigError
from rcm.importers import PLACEHOLDER
from rcm.models.denoiser import Denoiser
from rcm.options import add_stage_options, from_args, option, resolve_device
from rcm.loader import TrainBatches, eval_batches
from rcm.train.loop import Run, train


@dataclass
class DenoiserOptions:
    block_out_channels: list[int] = option([16, 32], "UNet channels per resolution level")
    layers_per_block: int = option(1, "residual blocks per UNet level")
    attention: bool = option(False, "self-attention in the UNet's lower levels and middle block")
    norm_num_groups: int = option(8, "GroupNorm groups (must divide every channel count)")
    num_train_timesteps: int = option(1000, "diffusion steps T")
    beta_schedule: str = option("linear", "'linear' (Ho et al.) or 'squaredcos_cap_v2' (improved-diffusion cosine)")
    beta_start: float = option(1e-4, "first beta of a linear schedule")
    beta_end: float = option(0.02, "last beta of a linear schedule")
    steps: int = option(2000, "optimiser steps")
    batch_size: int = option(64, "images per step")
    lr: float = option(2e-3, "AdamW learning rate (after a linear warm-up)")
    warmup_steps: int = option(100, "steps of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clipping (0: off)")
    ema_decay: float = option(0.995, "EMA decay of the weights that are evaluated and used")
    seed: int = option(0, "seed of batches, timesteps, noise and initialisation")
    eval_sigmas: list[float] = option([0.25, 0.5, 1.0], "noise levels of the one-shot denoising MSE log")
    eval_every: int = option(500, "evaluate every this many steps (and at the end)")
    checkpoint_every: int = option(500, "write resume state every this many steps")
    device: str = option("cpu", "torch device ('cpu', 'cuda', ...)")
    amp: str = option("off", "off | bf16 | fp16: autocast for the forward pass and loss (fp16 with loss "
                             "scaling; skipped steps are logged)")
    micro_batches: int = option(1, "gradient accumulation: passes per step over each process's share of "
                                   "batch_size, which stays the global batch (rcm.distributed)")
    tf32: bool = option(False, "CUDA: TF32 float32 matmuls and convolutions (default: strict IEEE float32; "
                               "rcm.precision.set_float32)")
    deterministic: bool = option(False, "CUDA: deterministic algorithms (torch.use_deterministic_algorithms, "
                                        "CUBLAS_WORKSPACE_CONFIG): a rerun on the same GPU model and software "
                                        "repeats the run bit for bit; slower")
    pretrained: str = option("", f"a denoiser to import instead of training ('' or {PLACEHOLDER}: train), "
                                 "then fine-tuned by finetune-denoiser for mdds; a diffusers folder's "
                                 "scheduler config (if any) overrides the schedule options")
    pretrained_format: str = option("", "its rcm import-model --format: improved-diffusion, "
                                        "guided-diffusion or diffusers (default for a folder)")
    pretrained_options: str = option("", "further rcm import-model options, one string (improved-/guided-"
                                         "diffusion: --flags \"...\" as that code's README prints them)")


def add_arguments(p) -> None:
    add_stage_options(p, DenoiserOptions)


def schedule(opts) -> dict:
    return dict(num_train_timesteps=opts.num_train_timesteps, beta_schedule=opts.beta_schedule,
                beta_start=opts.beta_start, beta_end=opts.beta_end)


def build(opts: DenoiserOptions, image_size: int, channels: int) -> Denoiser:
    levels = len(opts.block_out_channels)
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if opts.attention else "DownBlock2D"] * (levels - 1)
    up = ["AttnUpBlock2D" if opts.attention else "UpBlock2D"] * (levels - 1) + ["UpBlock2D"]
    if image_size % 2 ** (levels - 1):
        raise ConfigError(f"{levels} UNet levels need an image size divisible by {2 ** (levels - 1)}, "
                          f"got {image_size}")
    return Denoiser(image_size=image_size, in_channels=channels, block_out_channels=opts.block_out_channels,
                    layers_per_block=opts.layers_per_block, down_block_types=down, up_block_types=up,
                    norm_num_groups=opts.norm_num_groups, add_attention=opts.attention, **schedule(opts))


@torch.inference_mode()
def one_shot_mse(model: Denoiser, split: Split | FileSplit, sigmas: list[float], seed: int,
                 device: torch.device, batch_size: int = 500) -> dict[str, float]:
    """{'mse_sigma_0.25': ...}: mean squared error of one-shot denoising, [0, 1] pixel units, seeded noise
    (one generator per sigma); the images are read once, batch by batch."""
    generators = [torch.Generator().manual_seed(seed) for _ in sigmas]
    totals, count = [0.0] * len(sigmas), 0
    for x, _ in eval_batches(split, batch_size=batch_size):
        for i, (s, g) in enumerate(zip(sigmas, generators)):
            x_hat = model.denoise_one_shot((x + s * torch.randn(x.shape, generator=g)).to(device), s)
            totals[i] += ((x_hat.cpu() - x) ** 2).mean(dim=(1, 2, 3)).sum().item()
        count += len(x)
    return {f"mse_sigma_{paths.fmt_sigma(s)}": t / max(1, count) for s, t in zip(sigmas, totals)}


def make_run(opts: DenoiserOptions, dataset: str, results: str) -> Run:
    torch.manual_seed(opts.seed)
    train_set = load_split(paths.prepared(results, dataset, "train"))
    val_set = load_split(paths.prepared(results, dataset, "val"))
    C, H, W = train_set.shape
    if H != W:
        raise ConfigError(f"the denoiser expects square images, got {H}x{W}")
    dev = resolve_device(opts.device)
    model = build(opts, H, C).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, opts.warmup_steps)))
    batches = TrainBatches(train_set, min(opts.batch_size, len(train_set)), opts.seed, dev)

    def loss_fn(step: int, g: torch.Generator):
        x0 = 2.0 * batches(step)[0].to(dev, non_blocking=True) - 1.0       # this pass's rows, in [-1, 1]
        return model.loss(x0, g), {}

    def eval_fn(m) -> dict:
        return one_shot_mse(m, val_set, opts.eval_sigmas, opts.seed, dev)

    return Run(out=paths.denoiser(results, dataset), kind="denoiser", model=model, model_config=model.config,
               config={**dataclasses.asdict(opts), "dataset": dataset}, optimizer=optimizer, loss_fn=loss_fn,
               steps=opts.steps, seed=opts.seed, checkpoint_every=opts.checkpoint_every,
               eval_every=opts.eval_every, eval_fn=eval_fn, scheduler=scheduler,
               grad_clip=opts.grad_clip or None, ema=ema, ema_decay=lambda step: opts.ema_decay,
               desc="denoiser", amp=opts.amp, micro_batches=opts.micro_batches,
               tf32=opts.tf32, deterministic=opts.deterministic)


def main(args) -> None:
    opts = from_args(DenoiserOptions, args)
    from rcm.importers import denoiser_format
    from rcm.importers.stage import import_instead

    fmt = denoiser_format(opts.pretrained_format, opts.pretrained)
    out = paths.denoiser(args.results, args.dataset)
    if import_instead(opts.pretrained, fmt, opts.pretrained_options, out, "denoiser", args.dataset,
                      args.results, schedule=schedule(opts) if fmt == "diffusers" else None):
        return
    run = make_run(opts, args.dataset, args.results)
    metrics = train(run)
    if not distributed.is_main():  # another process of a torchrun launch: rank 0 wrote and reports
        return
    print(f"wrote {run.out}: " + ", ".join(f"{k}={v:.5f}" for k, v in metrics[-1].items()
                                           if k.startswith("mse_")))
