"""Data-parallel training under torchrun: process group, ranks, and each process's share of a batch.

`torchrun --standalone --nproc_per_node N -m rcm <training stage> <flags>` starts N processes with
RANK, WORLD_SIZE and LOCAL_RANK set (multi-node: torchrun's rendezvous, e.g. inside a SLURM
allocation); `rcm.cli` then joins them into one process group (NCCL on CUDA, gloo on CPUs) before
the stage runs. Nothing changes for a single process.

How a step is split, so that N processes train the same model as one process would:

- every process draws the step's randomness for the *whole* global batch from the step's generator
  (augmentations, noise, timesteps: the same draws in every process, and the same as a single
  process's), then keeps its own rows with ``local``: part ``rank * micro + m`` of
  ``world * micro`` equal parts, where ``micro`` is the number of gradient-accumulation passes;
- the loss is the mean over the part; DistributedDataParallel averages gradients over processes and
  the loop divides by ``micro``, so the update is the gradient of the global batch's mean loss, up to
  the order of floating-point reductions;
- BatchNorm takes its statistics over the whole global batch: torch's SyncBatchNorm on CUDA,
  ``CPUSyncBatchNorm`` (below) on CPUs. With gradient accumulation each pass's statistics are those
  of its part of every process (micro_batches parts of the global batch, as in any accumulation);
- what cannot be split this way differs by design: dropout masks come from each process's own
  generator.
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
    """Leave the process group: after a barrier when this process finished, at once when it failed
    (a failing process must not wait for the others, nor let them pass a barrier they meant for
    something else: torchrun then reports this process's error and stops the rest)."""
    if initialized():
        if clean:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def local_device(device: torch.device) -> torch.device:
    """Which GPU 'cuda' means: where several are visible, the first that no other rcm process of this
    user holds (``claim_gpu``), so that concurrent jobs of `snakemake --resources gpu=K` on a multi-GPU
    workstation, and the processes of torchrun jobs among them, each get their own."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        if launched():
            raise TrainingError(f"device {device} under torchrun would put every process on one GPU: "
                                "use 'cuda' (each process takes a GPU of its own)")
        return device
    count = torch.cuda.device_count()
    if count > 1 or launched():
        device = torch.device("cuda", claim_gpu(count))
        torch.cuda.set_device(device)
    return device


_CLAIMED: dict[int, object] = {}  # GPU index -> the open lock file that holds it for this process


def gpu_lock_dir() -> str:
    import tempfile

    return os.environ.get("RCM_GPU_LOCKS") or os.path.join(tempfile.gettempdir(), f"rcm-gpu-locks-{os.getuid()}")


def claim_gpu(count: int) -> int:
    """The index of a GPU no other live process holds, held by this one until it exits (an advisory
    ``flock`` per device in ``gpu_lock_dir()``: released by the kernel however the process ends).
    When every device is held (more jobs than GPUs), GPU 0, shared, with a warning."""
    import fcntl
    import sys

    if _CLAIMED:
        return next(iter(_CLAIMED))
    os.makedirs(gpu_lock_dir(), exist_ok=True)
    for index in range(count):
        handle = open(os.path.join(gpu_lock_dir(), f"cuda{index}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED[index] = handle
        return index
    print(f"rcm: warning: all {count} GPUs are held by other rcm processes; sharing cuda:0 (run at most "
          f"{count} GPU jobs at once: snakemake --resources gpu={count})", file=sys.stderr)
    return 0


@contextmanager
def part(index: int, count: int):
    """Within the block, ``local`` keeps part ``index`` of ``count`` of a global batch."""
    old = list(_PART)
    _PART[:] = [index, count]
    try:
        yield
    finally:
        _PART[:] = old


def local(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This pass's rows of a tensor that holds the whole global batch along ``dim``."""
    index, count = _PART
    if count == 1:
        return t
    n = t.shape[dim]
    if n % count:
        raise TrainingError(f"a global batch of {n} cannot be split into {count} equal parts "
                            f"({world_size()} processes x gradient-accumulation passes): make "
                            "batch_size a multiple of it")
    size = n // count
    return t.narrow(dim, index * size, size)


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
