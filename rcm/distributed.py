"""Data-parallel training under torchrun: process group, ranks, and each process's share of a batch.

`torchrun --standalone --nproc_per_node N -m rcm <training stage> <flags>` starts N processes with
RANK, WORLD_SIZE and LOCAL_RANK set (multi-node: torchrun's rendezvous, e.g. inside a SLURM
allocation); `rcm.cli` then joins them into one process group (NCCL on CUDA, gloo on CPUs) before
the stage runs. Nothing changes for a single process.

How a step is split, so that N processes train the same model as one process would:

- a pass computes part ``rank * micro + m`` of ``world * micro`` equal parts of the global batch,
  where ``micro`` is the number of gradient-accumulation passes; it reads, moves to its device and
  transforms only those rows (``rcm.loader.TrainBatches`` returns them);
- per-sample parameters (a few numbers per image: crops, flips, timesteps) are drawn for the whole
  global batch from the step's generator, the same in every process, and ``local`` keeps the pass's
  part of them; image-sized randomness (noise) is drawn per row (``local_normal``), from a seed of
  (the step's seed, the draw's stream, the global row), on the device, for the pass's rows only. So
  the global batch is identical for any number of processes and passes, and a process's batch
  memory is its share of the global batch, not the whole of it;
- the loss is the mean over the part; DistributedDataParallel averages gradients over processes and
  the loop divides by ``micro``, so the update is the gradient of the global batch's mean loss, up to
  the order of floating-point reductions;
- BatchNorm takes its statistics over the whole global batch: torch's SyncBatchNorm on CUDA,
  ``CPUSyncBatchNorm`` (below) on CPUs. With gradient accumulation each pass's statistics are those
  of its part of every process (micro_batches parts of the global batch, as in any accumulation);
- what cannot be split this way differs by design: dropout masks (torch's global generator) are
  seeded by the step and the part, so they differ between processes and passes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from rcm.errors import TrainingError

_PART = [0, 1]  # (index, count) of the global batch's part this pass computes


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# rank 0 evaluates (a k-NN over a large memory bank, say) while the others wait at a barrier
TIMEOUT = timedelta(hours=2)


def init() -> None:
    """Join the process group torchrun describes: gloo for CPU tensors, and NCCL for CUDA tensors
    where there are GPUs (whichever device the stage trains on)."""
    if initialized() or not launched():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)


def shutdown(clean: bool = True) -> None:
    """Leave the process group after a barrier (``clean``: this process finished its work), or at
    once. A process that *failed* while others run never comes here: see ``abandon``."""
    if initialized():
        if clean:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def abandon(exc: BaseException, what: str) -> None:
    """End this process of a multi-process job now, after saying why: exit code 2 for an rcm error
    (its one line), 1 for anything else (its traceback, e.g. CUDA out of memory in a backward pass).

    Not ``destroy_process_group``: with NCCL collectives in flight (the other processes wait in this
    step's gradient all-reduce) it can block until the collective times out (``TIMEOUT``, 2 hours),
    and a barrier would wait for processes that will never arrive. Exiting closes this process's
    connections; torchrun sees a failed worker and stops the others at once."""
    import sys
    import traceback

    from rcm.errors import RcmError

    prefix = f"{what} (rank {rank()} of {world_size()})"
    if isinstance(exc, RcmError):
        print(f"{prefix}: error: {exc}", file=sys.stderr)
    else:
        print(f"{prefix}: failed; the other processes are stopped", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2 if isinstance(exc, RcmError) else 1)


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def local_device(device: torch.device) -> torch.device:
    """The GPU that 'cuda' means for this process, made its current device (``torch.cuda.set_device``).

    - ``cuda:N`` (explicit): GPU N, claimed (below) so that no other rcm process takes it; refused under
      torchrun, where it would put every process on one GPU.
    - ``cuda`` under torchrun, when the job sees exactly one GPU per local process (SLURM's ``--gpus``,
      or ``CUDA_VISIBLE_DEVICES`` set for the job): GPU ``LOCAL_RANK``.
    - ``cuda`` otherwise (one process; or torchrun on a workstation that shows every GPU to every job):
      the first visible GPU that no other rcm process of this user holds.
    A GPU is held by an ``flock`` on a file named after its UUID (``claim_gpu``), so two jobs that each
    see their own GPUs as 0..N-1 (two SLURM jobs on one node) never collide on a name, and a GPU is
    never shared silently: a process waits up to ``RCM_GPU_WAIT`` seconds (default 600) for one to
    free up, then stops with one line (``TrainingError``).
    """
    if device.type != "cuda":
        return device
    if device.index is not None and launched():
        raise TrainingError(f"device {device} under torchrun would put every process on one GPU: "
                            "use 'cuda' (each process takes a GPU of its own)")
    count = torch.cuda.device_count()
    if count == 0:
        raise TrainingError(f"device {device}: no CUDA GPU is visible to this process "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
    if device.index is not None:
        if device.index >= count:
            raise TrainingError(f"device {device}: only {count} GPU(s) are visible (cuda:0 .. cuda:{count - 1})")
        index = claim_gpu([device.index])
    elif launched() and count == local_world_size():
        index = claim_gpu([local_rank()])
    elif launched() and count < local_world_size():
        raise TrainingError(f"{local_world_size()} processes on this node but only {count} GPU(s) visible: "
                            "start one process per GPU (torchrun --nproc-per-node)")
    else:
        index = claim_gpu(list(range(count)))
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


_CLAIMED: dict[int, object] = {}  # GPU index -> the open lock file that holds it for this process


def gpu_lock_dir() -> str:
    import tempfile

    return os.environ.get("RCM_GPU_LOCKS") or os.path.join(tempfile.gettempdir(), f"rcm-gpu-locks-{os.getuid()}")


def gpu_uuid(index: int) -> str:
    """A visible GPU's UUID (the same physical GPU has the same UUID whatever its index in a job)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"index{index}"


def claim_gpu(candidates: list[int], wait: float | None = None, poll: float = 2.0,
              uuid=gpu_uuid) -> int:
    """The first of ``candidates`` (visible GPU indices) that no other live process holds, held by this
    process until it exits: an advisory ``flock`` on ``gpu_lock_dir()/gpu-<UUID>.lock``, released by
    the kernel however the process ends. While every candidate is held, wait (``wait`` seconds,
    default ``RCM_GPU_WAIT`` or 600), then raise TrainingError naming the holders' lock files."""
    import fcntl
    import sys
    import time

    if _CLAIMED:
        return next(iter(_CLAIMED))
    wait = float(os.environ.get("RCM_GPU_WAIT", "600")) if wait is None else wait
    os.makedirs(gpu_lock_dir(), exist_ok=True)
    files = {index: os.path.join(gpu_lock_dir(), f"gpu-{uuid(index)}.lock") for index in candidates}
    deadline, told = time.monotonic() + wait, False
    while True:
        for index, name in files.items():
            handle = open(name, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _CLAIMED[index] = handle
            return index
        if time.monotonic() >= deadline:
            raise TrainingError(f"every GPU this process may use ({', '.join(f'cuda:{i}' for i in candidates)}) is "
                                f"held by another rcm process (locks in {gpu_lock_dir()}); waited {wait:.0f} s. "
                                "Run fewer GPU jobs at once (snakemake --resources gpu=K) or raise RCM_GPU_WAIT")
        if not told:
            print(f"rcm: every GPU of {[f'cuda:{i}' for i in candidates]} is held by another rcm process; "
                  f"waiting up to {wait:.0f} s", file=sys.stderr)
            told = True
        time.sleep(poll)


@contextmanager
def part(index: int, count: int):
    """Within the block, ``local`` keeps part ``index`` of ``count`` of a global batch."""
    old = list(_PART)
    _PART[:] = [index, count]
    try:
        yield
    finally:
        _PART[:] = old


def parts() -> int:
    """Into how many equal parts the current global batch is split (processes x accumulation passes)."""
    return _PART[1]


def part_bounds(n: int) -> tuple[int, int]:
    """This pass's rows [lo, hi) of a global batch of ``n`` rows."""
    index, count = _PART
    if n % count:
        raise TrainingError(f"a global batch of {n} cannot be split into {count} equal parts "
                            f"({world_size()} processes x gradient-accumulation passes): make "
                            "batch_size a multiple of it")
    size = n // count
    return index * size, (index + 1) * size


def local(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This pass's rows of a tensor that holds the whole global batch along ``dim``."""
    if _PART[1] == 1:
        return t
    lo, hi = part_bounds(t.shape[dim])
    return t.narrow(dim, lo, hi - lo)


def local_normal(g: torch.Generator, rows: int, row_shape: tuple[int, ...], stream: int,
                 device: torch.device) -> torch.Tensor:
    """Standard normals (rows, *row_shape) on ``device`` for this pass's ``rows`` rows of the global
    batch: row r's values come from a generator of their own, seeded by (the step's seed
    ``g.initial_seed()``, ``stream``, r), drawn on ``device``. So the global batch's noise is the same
    whatever the number of processes and accumulation passes, and each process draws (and holds) only
    its own rows; ``g`` itself is not advanced. ``stream`` tells apart the image-sized draws of one
    step (e.g. the training noise and the DDPM noise)."""
    out = torch.empty((rows, *row_shape), device=device)
    if out.device.type == "meta":   # shapes only (rcm.plan traces a step there): no values to draw
        return out
    from rcm.train.loop import step_seed

    lo = _PART[0] * rows
    streamed = step_seed(g.initial_seed(), stream)           # row r's seed: step_seed(streamed, r)
    for i in range(rows):
        gen = torch.Generator(device=device).manual_seed(step_seed(streamed, lo + i))
        torch.randn(row_shape, generator=gen, device=device, out=out[i])
    return out


def gather(t: torch.Tensor) -> torch.Tensor:
    """The parts of every process concatenated along dim 0 (no gradient): e.g. InfoNCE keys from all
    processes, as the reference rRCM code gathers them. With gradient accumulation, a pass gathers the
    other processes' parts of the same pass."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (gloo has no AVG): what every process logs and checks."""
    if world_size() == 1:
        return value
    total = value.detach().clone().float()
    torch.distributed.all_reduce(total)
    return total / world_size()


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch of all processes, for CPU tensors under gloo.

    torch's SyncBatchNorm computes on GPUs only; this is the same normalisation written with torch's
    differentiable collectives (``torch.distributed.nn.functional.all_reduce``, whose backward sums the
    gradients over processes): training-mode batch statistics are the mean and the biased variance over
    every process's rows (two passes: the mean, then the squared deviations from it), the running
    statistics move with the unbiased variance, as ``F.batch_norm`` moves them. Eval mode and a single
    process are plain BatchNorm. Any input rank (N, C, ...)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and initialized() and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm does
                momentum = 1.0 / self.num_batches_tracked.item()
        dtype, x = x.dtype, x.float()                          # normalised in float32, as under autocast
        dims = [d for d in range(x.dim()) if d != 1]
        view = [1, -1] + [1] * (x.dim() - 2)
        # sums and the count in float64 across processes (a channel of a 4096-image batch at 112 px
        # has 5e7 values: more than float32 counts exactly)
        total = all_reduce(torch.cat([x.sum(dims, dtype=torch.float64),
                                      torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64)]))
        count = total[-1]
        mean = (total[:-1] / count).float()
        centred = x - mean.view(view)
        var = (all_reduce((centred ** 2).sum(dims, dtype=torch.float64)) / count).float()  # biased
        y = centred * torch.rsqrt(var + self.eps).view(view)
        if self.affine:
            y = y * self.weight.view(view) + self.bias.view(view)
        if self.track_running_stats:
            with torch.no_grad():
                n = count.item()
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(1.0, n - 1))
        return y.to(dtype)

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with every BatchNorm layer replaced in place by one of these holding the same
        parameter and buffer tensors (so optimisers and EMA keep working on them), as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for GPUs."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out
