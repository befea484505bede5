"""`rcm finetune-denoiser`: diffusion fine-tuning for multi-scale smoothing (Jeong & Shin 2023, DESIGN §6).

The clean classifier f (``paths.classifier(results, dataset, 0.0)``) is frozen; the denoiser D
(``paths.denoiser(results, dataset)``, its EMA weights) is fine-tuned so that one-shot denoising is
consistent where the image is recoverable and diverse where it is not. Per step: sigma drawn from
``sigmas``, M = ``copies`` noisy copies of each image, pi_i = softmax(f(D(x + delta_i))) (B, M, K), and

    L = L_Brier + ac_weight * L_AC + denoise_weight * L_DDPM
    L_Brier = 1/B sum_{b: f(x_b) = y_b} mean_i ||pi_bi - e_y||^2         (recoverable images)
    L_AC    = 1/B sum_{b: f(x_b) != y_b} ||mean_i pi_bi||^2              (the others: penalise agreement)
    L_DDPM  = the usual DDPM loss on the clean batch (keeps D a denoiser at every t).

The paper's exact weights are not public; every weight used is recorded in the checkpoint's config.
Output: ``paths.denoiser(results, dataset, finetuned=True)``, kind "denoiser".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rcm import distributed, paths
from rcm.data import load_split
from rcm.distributed import local_normal
from rcm.errors import ConfigError
from rcm.models import load_model
from rcm.models.denoiser import DenoisedClassifier, Denoiser
from rcm.options import add_stage_options, from_args, option, resolve_device
from rcm.train.evaluate import noisy_accuracies
from rcm.loader import TrainBatches
from rcm.train.loop import Run, train


@dataclass
class FinetuneDenoiserOptions:
    sigmas: list[float] = option([0.25, 0.5, 1.0], "noise levels sigma is drawn from at each step (pixel space)")
    copies: int = option(4, "M: noisy copies of each image per step (>= 2)")
    ac_weight: float = option(1.0, "lambda: weight of the anti-consistency loss")
    ac_target: str = option("wrong", "anti-consistency on the mean prediction's mass on the wrong classes only "
                                     "('wrong': sum over c != y of pi_bar_c^2) or on all ('all': ||pi_bar||^2)")
    denoise_weight: float = option(1.0, "weight of the DDPM loss regulariser (0: off)")
    steps: int = option(400, "optimiser steps")
    batch_size: int = option(32, "images per step (each denoised `copies` times)")
    lr: float = option(2e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clipping (0: off)")
    seed: int = option(0, "seed of batches, sigmas and noise")
    eval_every: int = option(200, "evaluate every this many steps (and at the end)")
    checkpoint_every: int = option(200, "write resume state every this many steps")
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


def add_arguments(p) -> None:
    add_stage_options(p, FinetuneDenoiserOptions)


def brier_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_i ||pi_i - e_y||^2 per image: probs (B, M, K), labels (B,) -> (B,)."""
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)[:, None]   # (B, 1, K)
    return ((probs - onehot) ** 2).sum(-1).mean(-1)


AC_TARGETS = ("all", "wrong")
COPIES_NOISE = 3  # the stream of the copies' per-row noise


def anti_consistency_loss(probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """||mean_i pi_i||^2 per image: probs (B, M, K) -> (B,). 1 when all copies agree on one class with
    certainty, 1/K at the uniform mean, so minimising it spreads the copies' votes. Given ``labels``,
    only the wrong classes count (sum over c != y of mean_i pi_ic ^ 2): the denoiser is penalised for
    confidently answering another class on an unrecoverable image, not for agreeing on the true one."""
    mean = probs.mean(1)                                                    # (B, K)
    if labels is not None:
        mean = mean * (1.0 - F.one_hot(labels, probs.shape[-1]).to(mean.dtype))
    return (mean ** 2).sum(-1)


class MultiScaleLoss(nn.Module):
    """The fine-tuning objective; ``forward(x, y, sigma, generator)`` returns (scalar loss, logs)."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module, *, copies: int = 4, ac_weight: float = 1.0,
                 denoise_weight: float = 1.0, ac_target: str = "wrong"):
        super().__init__()
        if copies < 2:
            raise ConfigError(f"copies (M) must be >= 2, got {copies}")
        if ac_target not in AC_TARGETS:
            raise ConfigError(f"ac_target must be one of {', '.join(AC_TARGETS)}, got '{ac_target}'")
        self.ac_target = ac_target
        self.denoiser, self.classifier = denoiser, classifier.eval().requires_grad_(False)
        self.copies, self.ac_weight, self.denoise_weight = copies, ac_weight, denoise_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, sigma: float, generator: torch.Generator):
        """x: (b, C, H, W) clean images in [0, 1], y: (b,) labels: this pass's rows of a global batch; the
        copies' noise is drawn per row on x's device (rcm.distributed.local_normal)."""
        delta = local_normal(generator, len(x), (self.copies, *x.shape[1:]), COPIES_NOISE, x.device)
        B, M = x.shape[0], self.copies
        with torch.no_grad():
            recoverable = (self.classifier(x).argmax(1) == y).to(x.dtype)   # (B,)
        noisy = (x[:, None] + sigma * delta).flatten(0, 1)                  # (B*M, C, H, W)
        logits = DenoisedClassifier(self.denoiser, self.classifier, sigma)(noisy)
        probs = logits.softmax(-1).view(B, M, -1)                           # (B, M, K)
        l_brier = (recoverable * brier_loss(probs, y)).mean()
        l_ac = ((1.0 - recoverable) * anti_consistency_loss(probs, y if self.ac_target == "wrong" else None)).mean()
        loss = l_brier + self.ac_weight * l_ac
        logs = {"brier": l_brier.item(), "ac": l_ac.item(), "recoverable": recoverable.mean().item(),
                "sigma": sigma}
        if self.denoise_weight:
            l_ddpm = self.denoiser.loss(2.0 * x - 1.0, generator)
            loss = loss + self.denoise_weight * l_ddpm
            logs["ddpm"] = l_ddpm.item()
        return loss, logs


def make_run(opts: FinetuneDenoiserOptions, dataset: str, results: str) -> Run:
    if not opts.sigmas:
        raise ConfigError("--sigmas needs at least one noise level")
    dev = resolve_device(opts.device)
    base_path, clf_path = paths.denoiser(results, dataset), paths.classifier(results, dataset, 0.0)
    denoiser, base = load_model(base_path, kind="denoiser", use_ema=True)
    classifier, _ = load_model(clf_path, kind="classifier")
    denoiser, classifier = denoiser.to(dev), classifier.to(dev)
    for s in opts.sigmas:
        denoiser.t_star(s)  # a sigma beyond the schedule fails before training
    objective = MultiScaleLoss(denoiser, classifier, copies=opts.copies, ac_weight=opts.ac_weight,
                               denoise_weight=opts.denoise_weight, ac_target=opts.ac_target)
    train_set = load_split(paths.prepared(results, dataset, "train"))
    val_set = load_split(paths.prepared(results, dataset, "val"))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    batches = TrainBatches(train_set, min(opts.batch_size, len(train_set)), opts.seed, dev)

    def loss_fn(step: int, g: torch.Generator):
        x, y = batches(step)                                   # this pass's rows
        sigma = opts.sigmas[int(torch.randint(len(opts.sigmas), (1,), generator=g))]
        return objective(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), sigma, g)

    def eval_fn(m) -> dict:
        def make_predict(s):
            net = DenoisedClassifier(m, classifier, s)
            return lambda x: net(x.to(dev)).cpu()
        return noisy_accuracies(make_predict, val_set, opts.sigmas, seed=opts.seed)

    config = {**dataclasses.asdict(opts), "dataset": dataset, "base_denoiser": str(base_path),
              "base_denoiser_step": base["step"], "classifier": str(clf_path)}
    return Run(out=paths.denoiser(results, dataset, finetuned=True), kind="denoiser", model=denoiser,
               model_config=denoiser.config, config=config, optimizer=optimizer, loss_fn=loss_fn,
               steps=opts.steps, seed=opts.seed, checkpoint_every=opts.checkpoint_every,
               eval_every=opts.eval_every, eval_fn=eval_fn, grad_clip=opts.grad_clip or None,
               desc="finetune-denoiser", amp=opts.amp, micro_batches=opts.micro_batches,
               tf32=opts.tf32, deterministic=opts.deterministic)


def main(args) -> None:
    opts = from_args(FinetuneDenoiserOptions, args)
    run = make_run(opts, args.dataset, args.results)
    metrics = train(run)
    if not distributed.is_main():  # another process of a torchrun launch: rank 0 wrote and reports
        return
    print(f"wrote {run.out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics[-1].items()
                                           if k.endswith("acc") or k.startswith("acc_")))
