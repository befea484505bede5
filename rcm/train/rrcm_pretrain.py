"""`rcm pretrain-rrcm`: rRCM's contrastive consistency pretraining (Lei et al. 2025, DESIGN section 7).

Per step k (one batch, data in [-1, 1]):
- the grid has N(k) points (21 -> 41 -> 81); one index n ~ U{0..N-2} for the whole batch and one
  eps ~ N(0, I) per image, shared by every noisy copy of that image;
- L_con: symmetric InfoNCE between online z(v1) and EMA-target z(v2) (and swapped), views at s_min;
- L_cons: InfoNCE between online h(x + s_n eps, s_n) and stop-grad online h(x + s_{n+1} eps, s_{n+1});
- L = L_con + L_cons; the target follows the online network with a sigmoid-rising EMA decay.
Writes ``paths.rrcm_pretrained``: the online network in ``model`` (with its projector) and the EMA
target in ``ema``. Logged metrics are k-NN accuracies of h on the validation split, clean and noisy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rcm import distributed, paths
from rcm.data import FileSplit, Split, load_split
from rcm.errors import ConfigError
from rcm.importers import PLACEHOLDER
from rcm.models.vit import CERTIFY_GRID_POINTS, RRCMNet, edm_grid, nearest_grid_index, num_grid_points
from rcm.options import add_stage_options, from_args, option, resolve_device
from rcm.train.augment import ViewConfig, augment, random_flip
from rcm.train.evaluate import noisy_accuracies
from rcm.loader import TrainBatches, eval_batches
from rcm.train.loop import Run, train
from rcm.train.rrcm_losses import ConsistencyLoss, ContrastiveLoss


EPS_NOISE = 4  # the stream of the per-image noise eps (rcm.distributed.local_normal)

@dataclass
class PretrainOptions:
    """Defaults are the embedded digits run (8x8 gray; about 130 s on one CPU thread).

    Paper scale differs mainly in the network (ViT-B), steps, batch, lr, crop_min_scale 0.08,
    flip_prob 0.5 and blur_sigma 0.1 2.0 (see docs/config presets)."""

    # network (image size and channels come from the data)
    patch_size: int = option(2, "ViT patch size")
    dim: int = option(64, "token width")
    depth: int = option(4, "transformer blocks")
    heads: int = option(4, "attention heads")
    mlp_ratio: float = option(2.0, "MLP hidden width / dim")
    proj_hidden: int = option(256, "projector hidden width")
    proj_dim: int = option(256, "projector output width (z)")
    # optimisation
    steps: int = option(700, "training steps K (also sets the N(k) and EMA schedules)")
    batch_size: int = option(128, "images per step (negatives: batch_size - 1)")
    lr: float = option(3e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    warmup: int = option(50, "linear warmup steps, then cosine decay to 0")
    grad_clip: float = option(2.0, "gradient-norm clip (0: off)")
    # objective
    temperature: float = option(0.2, "InfoNCE temperature tau")
    ema_start: float = option(0.99, "target EMA decay at step 0")
    ema_end: float = option(0.9999, "target EMA decay at the last step")
    ema_sharpness: float = option(15.0, "steepness A of the sigmoid EMA schedule")
    # augmentations (BYOL-style; two asymmetric views; see rcm.train.augment.ViewConfig)
    crop_min_scale: float = option(0.3, "RandomResizedCrop minimum area fraction")
    flip_prob: float = option(0.0, "horizontal flip probability (views and consistency image)")
    jitter_prob: float = option(0.8, "colour jitter probability")
    brightness: float = option(0.4, "brightness jitter")
    contrast: float = option(0.4, "contrast jitter")
    saturation: float = option(0.2, "saturation jitter (3-channel only)")
    hue: float = option(0.1, "hue jitter in turns (3-channel only)")
    gray_prob: float = option(0.2, "grayscale probability (3-channel only)")
    blur_prob: list[float] = option([1.0, 0.1], "blur probability of view 1 and view 2")
    blur_sigma: list[float] = option([0.1, 0.5], "blur std range in pixels (BYOL: 0.1 2.0 at 224 px)")
    solarize_prob: list[float] = option([0.0, 0.2], "solarize probability of view 1 and view 2")
    # bookkeeping
    seed: int = option(0, "seed of initialisation, batches, views and noise")
    checkpoint_every: int = option(200, "steps between resumable checkpoints")
    eval_every: int = option(200, "steps between k-NN evaluations (0: only at the end)")
    eval_sigmas: list[float] = option([0.25, 0.5, 1.0], "pixel-space sigmas of the noisy k-NN accuracies")
    knn_k: int = option(20, "neighbours of the k-NN evaluation")
    knn_bank: int = option(0, "training images in the k-NN memory bank, evenly spaced (0: all)")
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
    pretrained: str = option("", f"the rRCM authors' pretrained network (nnet.pth) to import instead of "
                                 f"pretraining ('' or {PLACEHOLDER}: train); finetune-rrcm then fine-tunes it")
    pretrained_format: str = option("", "its rcm import-model --format: rrcm")
    pretrained_options: str = option("", "further rcm import-model options, one string (e.g. '--heads 12')")


def target_decay(step: int, total_steps: int, start: float = 0.99, end: float = 0.9999,
                 sharpness: float = 15.0) -> float:
    """EMA decay of the target network at ``step``, rising from ``start`` to ``end`` on a sigmoid:

        t = min(1, step / (K - 1)),   c(t) = (2 / (1 + exp(-A t)) - 1) / (2 / (1 + exp(-A)) - 1),
        decay(step) = start + (end - start) * c(t)

    i.e. the upper half of a logistic curve, normalised so that decay(0) = start and decay(K - 1) = end
    exactly (K = total_steps, A = sharpness; with A = 15 decay is ~90% of the way up at t = 0.2).
    """
    t = min(1.0, step / max(1, total_steps - 1))
    c = math.tanh(sharpness * t / 2) / math.tanh(sharpness / 2)   # 2 sigmoid(x) - 1 = tanh(x / 2)
    return start + (end - start) * c


def view_configs(o: PretrainOptions) -> tuple[ViewConfig, ViewConfig]:
    common = dict(crop_min_scale=o.crop_min_scale, flip_prob=o.flip_prob, jitter_prob=o.jitter_prob,
                  brightness=o.brightness, contrast=o.contrast, saturation=o.saturation, hue=o.hue,
                  gray_prob=o.gray_prob, blur_sigma=tuple(o.blur_sigma))
    return (ViewConfig(**common, blur_prob=o.blur_prob[0], solarize_prob=o.solarize_prob[0]),
            ViewConfig(**common, blur_prob=o.blur_prob[1], solarize_prob=o.solarize_prob[1]))


def _layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("patch_embed.", "time_embed.")) or name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: RRCMNet, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices and convolutions only (not on biases, norms, tokens,
    position embeddings); with layer_decay < 1 the lr of layer l is scaled by layer_decay^(L + 1 - l)
    (BEiT-style fine-tuning; 1.0 leaves every lr alone)."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and name not in ("cls_token", "pos_embed")
        layer = _layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int,
                  steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``; each parameter group's
    lr is also multiplied by its ``lr_scale`` (layer-wise decay), if it has one."""
    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup))))
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda k, s=s: s * factor(k) for s in scales])




def check_options(o, n_train: int) -> None:
    """Shared sanity checks of pretraining and fine-tuning options (ConfigError names the flag)."""
    if o.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {o.steps}")
    if not 2 <= o.batch_size <= n_train:
        raise ConfigError(f"--batch_size must be in [2, {n_train}] (the training split), got {o.batch_size}")
    if o.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint_every must be >= 1, got {o.checkpoint_every}")


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def represent(model: RRCMNet, images: torch.Tensor, sigma: float, batch_size: int = 500) -> torch.Tensor:
    """Unit-norm h of (possibly noisy) pixel-space images, conditioned on the grid level nearest 2*sigma."""
    s = float(edm_grid(CERTIFY_GRID_POINTS)[nearest_grid_index(2 * sigma)])   # as SigmaConditioned
    device = next(model.parameters()).device
    hs = [model.representation(2 * images[i:i + batch_size].to(device) - 1, s)
          for i in range(0, len(images), batch_size)]
    return nn.functional.normalize(torch.cat(hs), dim=1)


def knn_accuracies(model: RRCMNet, train_split: Split | FileSplit, val_split: Split | FileSplit, sigmas: list[float],
                   k: int, bank_size: int = 0, temperature: float = 0.07) -> dict[str, float]:
    """Weighted k-NN accuracy of h: noisy validation images against clean training images (the memory bank;
    ``bank_size`` evenly spaced rows, 0 for all)."""
    n = len(train_split)
    rows = torch.linspace(0, n - 1, min(bank_size, n)).long() if bank_size else torch.arange(n)
    bank = torch.cat([represent(model, x, 0.0) for x, _ in eval_batches(train_split, rows)])   # (N, D)
    bank_labels = train_split.labels[rows].to(bank.device)

    def make_predict(sigma: float):
        def predict(x: torch.Tensor) -> torch.Tensor:
            sim, idx = (represent(model, x, sigma) @ bank.T).topk(min(k, len(bank)), dim=1)   # (B, k)
            votes = torch.zeros(len(x), train_split.num_classes, device=bank.device)
            return votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()).cpu()
        return predict

    accs = noisy_accuracies(make_predict, val_split, sigmas)
    return {f"knn_{name}": value for name, value in accs.items()}


# ----------------------------------------------------------------------------- the run

def build_run(o: PretrainOptions, train_split: Split | FileSplit, val_split: Split | FileSplit | None, out: Path,
              provenance: dict | None = None) -> Run:
    """The pretraining Run: online network, EMA target, optimiser, schedules and the step's loss."""
    check_options(o, len(train_split))
    if o.micro_batches > 1:  # the keys of other passes would be missing from each pass's InfoNCE
        raise ConfigError("--micro_batches must be 1 for rRCM pretraining: its InfoNCE losses contrast each "
                          "image with the keys of the whole global batch, which a pass does not have; "
                          "use more processes (torchrun) for a larger batch")
    if len(o.blur_prob) != 2 or len(o.solarize_prob) != 2 or len(o.blur_sigma) != 2:
        raise ConfigError("--blur_prob, --solarize_prob and --blur_sigma take exactly two values")
    c, h, w = train_split.shape
    if h != w:
        raise ConfigError(f"rRCM's ViT needs square images, got {h}x{w}")
    device = resolve_device(o.device)
    torch.manual_seed(o.seed)
    model = RRCMNet(image_size=h, in_channels=c, patch_size=o.patch_size, dim=o.dim, depth=o.depth,
                    heads=o.heads, mlp_ratio=o.mlp_ratio, proj_dim=o.proj_dim,
                    proj_hidden=o.proj_hidden).to(device)
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr)
    view1, view2 = view_configs(o)
    contrastive, consistency = ContrastiveLoss(o.temperature), ConsistencyLoss(o.temperature)

    batches = TrainBatches(train_split, o.batch_size, o.seed, device)

    def loss_fn(step: int, g: torch.Generator):
        num_points = num_grid_points(step, o.steps)
        grid = edm_grid(num_points).float()
        x = 2 * batches(step)[0].to(device, non_blocking=True) - 1          # this pass's rows, in [-1, 1]
        v1, v2 = augment(x, g, view1), augment(x, g, view2)
        # The consistency term runs on the clean image (flipped only, as the views are), not on an
        # augmented view: fine-tuning and certification feed clean images plus Gaussian noise, so the
        # noisy trajectories trained here are the ones used later, while L_con alone carries the
        # augmentation invariances. (This is also what the authors' data pipeline feeds.)
        x0 = random_flip(x, g, o.flip_prob)
        eps = distributed.local_normal(g, len(x), tuple(x.shape[1:]), EPS_NOISE, device)  # one eps per image
        n = int(torch.randint(0, num_points - 1, (1,), generator=g))        # one index per batch
        s_min, s_n, s_next = grid[-1].item(), grid[n].item(), grid[n + 1].item()
        # this process's rows, against the keys of all processes
        b, offset = len(v1), distributed.rank() * len(v1)

        # One online pass with gradients over [v1, v2 at s_min | x at s_n]; BN sees both views.
        levels = torch.cat([torch.full((2 * b,), s_min), torch.full((b,), s_n)]).to(device)
        inputs = torch.cat([v1 + s_min * eps, v2 + s_min * eps, x0 + s_n * eps])
        hs = model.representation(inputs, levels)
        z1, z2 = model.project(hs[:2 * b]).chunk(2)
        with torch.no_grad():
            target.train()  # batch statistics in the target's projector, as in the online one
            t1, t2 = target.project(target.representation(inputs[:2 * b], levels[:2 * b])).chunk(2)
            h_next = model.representation(x0 + s_next * eps, s_next)        # stop-grad online target
        gather = distributed.gather
        l_con = contrastive(z1, z2, gather(t1), gather(t2), offset)
        l_cons = consistency(hs[2 * b:], gather(h_next), offset)
        logs = {"l_con": l_con.item(), "l_cons": l_cons.item(), "grid_points": num_points,
                "ema_decay": target_decay(step, o.steps, o.ema_start, o.ema_end, o.ema_sharpness)}
        return l_con + l_cons, logs

    eval_fn = None
    if val_split is not None:
        def eval_fn(net):
            return knn_accuracies(net, train_split, val_split, o.eval_sigmas, o.knn_k, o.knn_bank)

    return Run(out=out, kind="rrcm", model=model, model_config=model.config,
               config={**(provenance or {}), "stage": "pretrain-rrcm", **dataclasses.asdict(o)},
               optimizer=optimizer, loss_fn=loss_fn, steps=o.steps, seed=o.seed,
               checkpoint_every=o.checkpoint_every, eval_every=o.eval_every, eval_fn=eval_fn,
               scheduler=warmup_cosine(optimizer, o.warmup, o.steps), grad_clip=o.grad_clip or None,
               ema=target, ema_decay=lambda k: target_decay(k, o.steps, o.ema_start, o.ema_end,
                                                            o.ema_sharpness),
               evaluate_ema=False, desc="pretrain-rrcm", amp=o.amp, micro_batches=o.micro_batches,
               tf32=o.tf32, deterministic=o.deterministic)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    add_stage_options(p, PretrainOptions)


def main(args) -> None:
    o = from_args(PretrainOptions, args)
    from rcm.importers.stage import import_instead

    if import_instead(o.pretrained, o.pretrained_format, o.pretrained_options,
                      paths.rrcm_pretrained(args.results, args.dataset), "rrcm", args.dataset, args.results):
        return
    train_split = load_split(paths.prepared(args.results, args.dataset, "train"))
    val_split = load_split(paths.prepared(args.results, args.dataset, "val"))
    out = paths.rrcm_pretrained(args.results, args.dataset)
    metrics = train(build_run(o, train_split, val_split, out, {"dataset": args.dataset}))
    if not distributed.is_main():  # another process of a torchrun launch: rank 0 wrote and reports
        return
    last = metrics[-1] if metrics else {}
    print(f"pretrain-rrcm: wrote {out}; " + ", ".join(f"{k}={v:.4f}" for k, v in last.items()
                                                     if k.startswith("knn_") and v is not None))
