"""The training loop every stage shares: resumable, deterministic, atomic, NaN-safe.

Randomness of step k depends only on (seed, k): a generator and the global torch seed are reset from
it at every step, so a run interrupted at any checkpoint and resumed ends bit-for-bit where an
uninterrupted run would (on the same machine and thread count).

Files, for a final checkpoint ``out``:
- ``out``                   written atomically once training ends (the stage's declared output);
- ``out`` + ``.resume``     the last good state, every ``checkpoint_every`` steps; deleted at the end.
  Workflow engines delete a job's declared outputs before rerunning it, so resume state must not be one;
- ``out`` stem + ``.metrics.jsonl``  per-evaluation metrics (loss, clean and noisy accuracy).

Data parallel (rcm.distributed): under torchrun every process runs this loop on its share of each
global batch (``Run.micro_batches`` passes of it, gradients accumulated); the model is wrapped in
DistributedDataParallel (BatchNorm synchronised over processes), the loss that is logged and checked is
the mean over processes (the other logged terms are rank 0's last pass), and only rank 0 evaluates
and writes files.

Mixed precision (``Run.amp``, rcm.precision): the forward pass and the loss run under autocast, the
backward and the optimiser step in float32 weights. fp16 scales the loss with a ``GradScaler``; a
step whose gradients overflow is skipped (the weights stay, the schedule moves on), counted, and
logged as ``skipped_steps``. The scaler's state is part of the resume state.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from rcm import distributed
from rcm.atomic import write_text
from rcm.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from rcm.errors import TrainingError
from rcm.precision import amp_dtype, autocast, set_deterministic, set_float32, warn_if_emulated

LossFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict]]


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of a run seeded ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def batch_rows(n: int, batch_size: int, step: int, seed: int, permutation=None) -> torch.Tensor:
    """Rows of the batch for ``step``: epochs are seeded permutations, so batches depend on the step alone.
    ``permutation(n, seed, epoch)`` may stand in for ``epoch_permutation`` (e.g. a cache of it)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = (permutation or epoch_permutation)(n, seed, epoch)
    return perm[k * batch_size:(k + 1) * batch_size]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training rows in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, -1 - epoch)))


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def metrics_path(out: Path) -> Path:
    return out.with_suffix(".metrics.jsonl")


@dataclass
class Run:
    """What a stage trains and how. ``loss_fn(step, generator) -> (loss, logs)`` does the forward pass."""

    out: Path
    kind: str
    model: nn.Module
    model_config: dict
    config: dict
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    steps: int
    seed: int
    checkpoint_every: int = 200
    eval_every: int = 0
    eval_fn: Callable[[nn.Module], dict] | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_clip: float | None = None
    ema: nn.Module | None = None                      # a copy of model updated as EMA
    ema_decay: Callable[[int], float] = lambda step: 0.999
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)  # saved and resumed too
    evaluate_ema: bool = True                         # evaluate the EMA weights when there are any
    desc: str = "train"
    amp: str = "off"                                  # 'off' | 'bf16' | 'fp16' (rcm.precision)
    micro_batches: int = 1                            # gradient-accumulation passes per process and step
    tf32: bool = False                                # CUDA: TF32 float32 arithmetic (rcm.precision.set_float32)
    deterministic: bool = False                       # CUDA: deterministic algorithms (set_deterministic)


class _Forward(nn.Module):
    """The stage's loss function as a module over ``model``, so that DistributedDataParallel sees one
    forward pass per backward whatever the stage calls inside (representation, project, denoise...)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, step: int, generator: torch.Generator):
        return self.loss_fn(step, generator)


class _Precision:
    """Autocast and (for fp16) loss scaling of one run, with its count of skipped steps."""

    def __init__(self, run: Run):
        amp_dtype(run.amp)
        self.device = next(run.model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        self.skipped = 0

    def state(self) -> dict:
        return dict(scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    skipped_steps=self.skipped)

    def restore(self, payload: dict) -> None:
        if self.scaler.is_enabled() and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.skipped = int(payload.get("skipped_steps") or 0)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, run: Run) -> None:
        """The optimiser step on the accumulated gradients; an fp16 step with non-finite gradients is
        skipped and counted."""
        if run.grad_clip:
            self.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
        before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(run.optimizer)
        self.scaler.update()
        if before is not None and self.scaler.get_scale() < before:  # the scaler backs off only on overflow
            self.skipped += 1


def _state(run: Run, step: int, metrics: list[dict], precision: _Precision) -> dict:
    return dict(kind=run.kind, model_config=run.model_config, model_state=run.model.state_dict(),
                step=step, config=run.config, optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict() if run.scheduler else None,
                ema=run.ema.state_dict() if run.ema is not None else None,
                extra={k: m.state_dict() for k, m in run.extra_modules.items()}, metrics=metrics,
                amp=run.amp, **precision.state())


def _restore(run: Run, path: Path, precision: _Precision) -> tuple[int, list[dict]]:
    payload = load_checkpoint(path, kind=run.kind)
    if payload.get("amp", "off") != run.amp:
        raise TrainingError(f"{path} was written by a run with amp={payload.get('amp', 'off')}, this run has "
                            f"amp={run.amp}: resume with the same amp, or delete {path} to start over")
    precision.restore(payload)
    load_state_strict(run.model, payload["model"], path)
    run.optimizer.load_state_dict(payload["optimizer"])
    if run.scheduler and payload.get("scheduler"):
        run.scheduler.load_state_dict(payload["scheduler"])
    if run.ema is not None and payload.get("ema") is not None:
        load_state_strict(run.ema, payload["ema"], path)
    for k, m in run.extra_modules.items():
        load_state_strict(m, payload["extra"][k], path)
    return payload["step"], payload.get("metrics", [])


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train(run: Run) -> list[dict]:
    """Run (or resume) training to ``run.steps`` and write the final checkpoint; return the metrics."""
    out = Path(run.out)
    resume = resume_path(out)
    if run.micro_batches < 1:
        raise TrainingError(f"{run.desc}: micro_batches must be >= 1, got {run.micro_batches}")
    precision = _Precision(run)
    set_float32(precision.device, run.tf32)
    set_deterministic(run.deterministic)
    main = distributed.is_main()
    if main:
        warn_if_emulated(run.amp, precision.device, run.desc)
    step, metrics = (_restore(run, resume, precision) if resume.exists() else (0, []))
    if step and main:
        print(f"{run.desc}: resuming from {resume} at step {step}", file=sys.stderr)
    bar = tqdm(total=run.steps, initial=step, desc=run.desc, unit="step", dynamic_ncols=True, disable=not main,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
    run.model.train()
    forward = _Forward(run.model, run.loss_fn)
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        # global batch statistics, in the EMA target's passes too: torch's SyncBatchNorm on GPUs, the
        # same normalisation through gloo's differentiable all_reduce on CPUs
        sync = nn.SyncBatchNorm.convert_sync_batchnorm if precision.device.type == "cuda" else \
            distributed.CPUSyncBatchNorm.convert
        sync(run.model)
        if run.ema is not None:
            sync(run.ema)
        forward = DistributedDataParallel(
            forward, device_ids=[precision.device.index] if precision.device.type == "cuda" else None)
    try:
        with warnings.catch_warnings():
            # a skipped fp16 step makes the scheduler step before the optimiser: intended, see above
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            step, metrics, logs = _steps(run, forward, step, metrics, bar, resume, precision)
    finally:
        bar.close()
    if run.eval_fn and not metrics and main:
        metrics.append(_evaluate(run, step, float("nan"), logs, metrics, precision))
    if main:
        save_checkpoint(out, **_state(run, step, metrics, precision))
        resume.unlink(missing_ok=True)
    distributed.barrier()
    return metrics


def _steps(run: Run, forward: nn.Module, step: int, metrics: list[dict], bar, resume: Path,
           precision: _Precision) -> tuple[int, list[dict], dict]:
    logs: dict = {}
    world, rank, passes = distributed.world_size(), distributed.rank(), run.micro_batches
    main = rank == 0
    while step < run.steps:
        s = step_seed(run.seed, step)
        run.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=precision.device)
        for m in range(passes):
            # a pass's per-sample parameters come from the step's generator (drawn for the whole
            # batch, its part kept), its noise per row (rcm.distributed.local_normal); torch's global
            # generator (dropout) is seeded by the step and the part
            part = rank * passes + m
            torch.manual_seed(s if world * passes == 1 else step_seed(s, 1 + part))
            sync = contextlib.nullcontext() if m == passes - 1 or world == 1 else forward.no_sync()
            with distributed.part(part, world * passes), sync:
                with autocast(run.amp, precision.device):
                    part_loss, logs = forward(step, torch.Generator().manual_seed(s))
                part_loss = part_loss.float()
                total += part_loss.detach()
                precision.backward(part_loss / passes)
        loss = distributed.mean_over_processes(total / passes)
        if not torch.isfinite(loss):  # the same verdict in every process
            raise TrainingError(f"{run.desc}: loss is {loss.item()} at step {step}; stopped. The last good "
                                f"state is kept in {resume if resume.exists() else '(none yet)'}")
        precision.step(run)
        if run.scheduler:
            run.scheduler.step()
        if run.ema is not None:
            ema_update(run.ema, run.model, run.ema_decay(step))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **({"skipped": precision.skipped} if run.amp == "fp16" else {}),
                        refresh=False)
        if run.eval_fn and run.eval_every and (step % run.eval_every == 0 or step == run.steps):
            if main:
                metrics.append(_evaluate(run, step, loss.item(), logs, metrics, precision))
            distributed.barrier()
        if step % run.checkpoint_every == 0 and step < run.steps:
            if main:
                save_checkpoint(resume, **_state(run, step, metrics, precision))
            distributed.barrier()
    return step, metrics, logs


def _evaluate(run: Run, step: int, loss: float, logs: dict, history: list[dict], precision: _Precision) -> dict:
    """Metrics of the current weights, evaluated in float32 whatever ``amp`` trains in."""
    model = run.ema if run.ema is not None and run.evaluate_ema else run.model
    model.eval()
    row = {"step": step, "loss": loss, **{k: float(v) for k, v in logs.items()}, **run.eval_fn(model)}
    if run.amp == "fp16":
        row["skipped_steps"] = precision.skipped
    run.model.train()
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    text = "".join(json.dumps(r) + "\n" for r in [*history, row])
    write_text(metrics_path(Path(run.out)), text)
    print(f"{run.desc} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                  if isinstance(v, float)), file=sys.stderr)
    return row
