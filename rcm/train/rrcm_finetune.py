"""`rcm finetune-rrcm`: fine-tune the pretrained rRCM encoder into the base classifier at one sigma.

The projector is dropped and a linear head added; the head and the whole encoder are trained (the
paper's setting). Inputs are exactly what certification feeds: clean pixel images plus N(0, sigma^2)
noise, through ``SigmaConditioned`` (y = 2x - 1, conditioned on the N = 81 grid level nearest 2*sigma).
Each image gets m noise draws; the loss is consistency regularisation (``ConsistencyRegularization``)
with lambda = ``lambda_small`` for sigma <= ``lambda_switch`` and ``lambda_large`` above it
(10 for sigma = 0.25, 20 for 0.5 and 1.0 by default) and eta = 0.5.
Writes ``paths.rrcm_finetuned(results, dataset, sigma)``; ``rcm.models.load_model`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rcm import distributed, paths
from rcm.data import FileSplit, Split, load_split
from rcm.distributed import local_normal
from rcm.errors import ConfigError
from rcm.models import load_model
from rcm.models.vit import SigmaConditioned, classifier_from_encoder
from rcm.options import add_stage_options, from_args, option, resolve_device
from rcm.train.evaluate import noisy_accuracies
from rcm.loader import TrainBatches
from rcm.train.loop import Run, train
from rcm.train.rrcm_losses import ConsistencyRegularization
from rcm.train.rrcm_pretrain import check_options, param_groups, warmup_cosine


DRAWS_NOISE = 5  # the stream of the noise draws' per-row values (rcm.distributed.local_normal)

@dataclass
class FinetuneOptions:
    """Defaults are the embedded digits run (about 35 s per sigma on one CPU thread)."""

    steps: int = option(400, "training steps")
    batch_size: int = option(128, "images per step (each drawn num_draws times)")
    lr: float = option(3e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    layer_decay: float = option(1.0, "layer-wise lr decay per block below the head (1.0: off)")
    warmup: int = option(30, "linear warmup steps, then cosine decay to 0")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    num_draws: int = option(2, "noise draws m per image")
    lambda_small: float = option(10.0, "consistency weight lambda for sigma <= lambda_switch")
    lambda_large: float = option(20.0, "consistency weight lambda for sigma > lambda_switch")
    lambda_switch: float = option(0.25, "the sigma at and below which lambda_small applies")
    eta: float = option(0.5, "weight of the entropy of the mean prediction")
    head_init_std: float = option(0.01, "std of the new linear head's weights (bias 0)")
    from_target: bool = option(False, "start from the pretraining EMA target instead of the online network")
    seed: int = option(0, "seed of the head, batches and noise")
    checkpoint_every: int = option(200, "steps between resumable checkpoints")
    eval_every: int = option(100, "steps between evaluations (0: only at the end)")
    eval_sigmas: list[float] = option([0.25, 0.5, 1.0], "pixel-space sigmas of the noisy validation accuracies")
    device: str = option("cpu", "torch device")
    amp: str = option("off", "off | bf16 | fp16: autocast for the forward pass and loss (fp16 with loss "
                             "scaling; skipped steps are logged)")
    micro_batches: int = option(1, "gradient accumulation: passes per step over each process's share of "
                                   "batch_size, which stays the global batch (rcm.distributed)")
    tf32: bool = option(False, "CUDA: TF32 float32 matmuls and convolutions (default: strict IEEE float32; "
                               "rcm.precision.set_float32)")
    deterministic: bool = option(False, "CUDA: deterministic algorithms (torch.use_deterministic_algorithms, "
                                        "CUBLAS_WORKSPACE_CONFIG): a rerun on the same GPU model and software "
                                        "repeats the run bit for bit; slower")
    pretrained_noisy: list[str] = option([], "the rRCM authors' fine-tuned classifiers to import instead of "
                                             "fine-tuning: SIGMA=PATH entries (format rrcm)")
    pretrained_options: str = option("", "further rcm import-model options for them, one string "
                                         "(e.g. '--head_norm false')")


def consistency_weight(o: FinetuneOptions, sigma: float) -> float:
    """lambda at this sigma: lambda_small up to lambda_switch, lambda_large above it."""
    return o.lambda_small if sigma <= o.lambda_switch else o.lambda_large


def build_run(o: FinetuneOptions, sigma: float, pretrained: Path, train_split: Split | FileSplit,
              val_split: Split | FileSplit | None, out: Path, provenance: dict | None = None) -> Run:
    """The fine-tuning Run at pixel-space noise level ``sigma``."""
    check_options(o, len(train_split))
    if sigma <= 0:
        raise ConfigError(f"--sigma must be > 0 for rRCM fine-tuning, got {sigma}")
    if o.num_draws < 1:
        raise ConfigError(f"--num_draws must be >= 1, got {o.num_draws}")
    encoder, payload = load_model(pretrained, kind="rrcm", use_ema=o.from_target)
    c, h, w = train_split.shape
    if (encoder.config["in_channels"], encoder.config["image_size"]) != (c, h) or h != w:
        raise ConfigError(f"{pretrained} was pretrained on {encoder.config['in_channels']}x"
                          f"{encoder.config['image_size']}px images; this data is {c}x{h}x{w}")
    device = resolve_device(o.device)
    torch.manual_seed(o.seed)
    model = classifier_from_encoder(encoder, train_split.num_classes)
    nn.init.trunc_normal_(model.head.weight, std=o.head_init_std)
    nn.init.zeros_(model.head.bias)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.layer_decay), lr=o.lr)
    base = SigmaConditioned(model, sigma)                     # the classifier certification smooths
    loss = ConsistencyRegularization(consistency_weight(o, sigma), o.eta)

    batches = TrainBatches(train_split, o.batch_size, o.seed, device)

    def loss_fn(step: int, g: torch.Generator):
        x, y = batches(step)                                   # this pass's rows (b, C, H, W) in [0, 1]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        noise = local_normal(g, len(x), (o.num_draws, *x.shape[1:]), DRAWS_NOISE, device)  # (b, m, C, H, W)
        xs = (x[None] + sigma * noise.transpose(0, 1)).flatten(0, 1)   # (m*b, C, H, W), draw-major
        logits = base(xs).reshape(o.num_draws, len(x), -1)    # (m, b, K)
        terms = loss.terms(logits, y)
        return loss.weighted(terms), {k: v.item() for k, v in terms.items()}

    eval_fn = None
    if val_split is not None:
        def eval_fn(net):
            def make_predict(s: float):     # the evaluation adds its noise on the CPU
                f = SigmaConditioned(net, s)
                return lambda x: f(x.to(device)).cpu()
            return noisy_accuracies(make_predict, val_split, o.eval_sigmas)

    config = {**(provenance or {}), "stage": "finetune-rrcm", "sigma": sigma,
              "lambda": loss.lam, "pretrained": str(pretrained), "pretrained_step": payload["step"],
              **dataclasses.asdict(o)}
    return Run(out=out, kind="rrcm", model=model, model_config=model.config, config=config,
               optimizer=optimizer, loss_fn=loss_fn, steps=o.steps, seed=o.seed,
               checkpoint_every=o.checkpoint_every, eval_every=o.eval_every, eval_fn=eval_fn,
               scheduler=warmup_cosine(optimizer, o.warmup, o.steps), grad_clip=o.grad_clip or None,
               desc=f"finetune-rrcm sigma={sigma}", amp=o.amp, micro_batches=o.micro_batches,
               tf32=o.tf32, deterministic=o.deterministic)


def add_arguments(p) -> None:
    p.add_argument("--sigma", type=float, required=True, help="pixel-space noise level to fine-tune for")
    add_stage_options(p, FinetuneOptions)


def main(args) -> None:
    o = from_args(FinetuneOptions, args)
    from rcm.importers import noisy_sources
    from rcm.importers.stage import import_instead

    source = noisy_sources(o.pretrained_noisy).get(paths.fmt_sigma(args.sigma), "")
    if import_instead(source, "rrcm", o.pretrained_options,
                      paths.rrcm_finetuned(args.results, args.dataset, args.sigma), "rrcm", args.dataset,
                      args.results):
        return
    pretrained = paths.rrcm_pretrained(args.results, args.dataset)
    train_split = load_split(paths.prepared(args.results, args.dataset, "train"))
    val_split = load_split(paths.prepared(args.results, args.dataset, "val"))
    out = paths.rrcm_finetuned(args.results, args.dataset, args.sigma)
    metrics = train(build_run(o, args.sigma, pretrained, train_split, val_split, out,
                              {"dataset": args.dataset}))
    if not distributed.is_main():  # another process of a torchrun launch: rank 0 wrote and reports
        return
    last = metrics[-1] if metrics else {}
    print(f"finetune-rrcm: wrote {out}; " + ", ".join(f"{k}={v:.4f}" for k, v in last.items()
                                                     if "acc" in k and v is not None))
