"""Batches for training and evaluation, from a split held in memory or streamed from image files.

A ``Split`` (digits, CIFAR-10) is indexed in memory. A ``FileSplit`` (ImageNet) is read through a
``torch.utils.data.DataLoader``: each image is opened, decoded, resized and centre-cropped in a worker
process (per item), batches are collated in uint8 and converted to floats in pinned memory for a
CUDA device (the tensor the stage copies to it). Either way a
training step gets the same global batch, so a run is the same whether its data is in memory or on
disk (the same batches; the classifier's channel statistics are reduced in another order):

- ``TrainBatches(split, batch_size, seed)(step)``: the rows ``batch_rows(len(split), batch_size,
  step, seed)`` as float images in [0, 1] and their labels. The loader prefetches the next steps in
  order; a step out of order (the first step after a resume) restarts it there. The random
  augmentations stay with each stage, drawn per sample from the step's generator and applied to the
  batch on its device, so that a step's views depend on (seed, step) alone: that is what makes a
  resumed run, or N processes, equal to one uninterrupted process.
- Under torchrun, a process reads and decodes only its own rows of the global batch (its
  ``world_size``-th share), and a gradient-accumulation pass gets its part of those: the stages draw
  per-sample parameters for the whole batch and keep their part, and draw noise per row
  (``rcm.distributed``), so no process holds another's rows.
- ``eval_batches(split)``: the split in order, for evaluations that see every image once.

``rcm --workers N`` sets the number of decoding processes (default: the CPUs this process may use,
shared among the torchrun processes of this node, less one, at most 8; 0 decodes in the main process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset

from rcm import distributed
from rcm.data import FileSplit, Split
from rcm.errors import DatasetError

WORKERS: int | None = None  # set by `rcm --workers`


def workers() -> int:
    """Decoding processes per training or evaluation process."""
    if WORKERS is not None:
        return WORKERS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


class Decoded(Dataset):
    """A file split as a map-style dataset: item i is image i, uint8 (3, H, W)."""

    def __init__(self, split: FileSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.split.decode(row)


def _loader(split: FileSplit, **kw) -> DataLoader:
    n = workers()
    return DataLoader(Decoded(split), num_workers=n, prefetch_factor=2 if n else None, **kw)


class _Steps:
    """Batch sampler: this process's rows of each step's global batch, from ``start`` on."""

    def __init__(self, batches: TrainBatches, start: int, lo: int, hi: int):
        self.batches, self.start, self.lo, self.hi = batches, start, lo, hi

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.batches.rows(step)[self.lo:self.hi].tolist()
            step += 1


class TrainBatches:
    """This pass's rows of each training step's global batch: float images in [0, 1] (b, C, H, W) and
    labels (b,), on the CPU (in pinned memory for a CUDA device, so that ``.to(device,
    non_blocking=True)`` overlaps the copy). The global batch is ``batch_rows(len(split), batch_size,
    step, seed)``; a process reads and decodes only its share of it (every pass of its own), kept for
    the step's gradient-accumulation passes, and each pass gets its part (rcm.distributed.part_bounds)."""

    def __init__(self, split: Split | FileSplit, batch_size: int, seed: int, device: torch.device | None = None):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.pin = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._last: tuple[int, int, tuple[torch.Tensor, torch.Tensor]] | None = None  # step, lo, share
        self._stream: Iterator | None = None
        self._next = -1
        self._permutations: dict[int, torch.Tensor] = {}

    def rows(self, step: int) -> torch.Tensor:
        from rcm.train.loop import batch_rows

        return batch_rows(len(self.split), self.batch_size, step, self.seed, self._permutation)

    def _permutation(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        """``epoch_permutation``, kept for the current and the next epoch: the sampler runs a few steps
        ahead of training, and a permutation of ImageNet's 1.3 million rows takes tens of ms."""
        from rcm.train.loop import epoch_permutation

        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations[epoch] = epoch_permutation(n, seed, epoch)
        return self._permutations[epoch]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(step)
        lo, hi = distributed.part_bounds(len(rows))                  # this pass's rows
        if self._last is None or self._last[0] != step:
            share_lo, share_hi = self._share(len(rows))
            share = rows[share_lo:share_hi]
            if isinstance(self.split, Split):
                x = self.split.float_images(share)
                x = x.pin_memory() if self.pin else x
            else:
                x = self._streamed(step, share_lo, share_hi)
            self._last = (step, share_lo, (x, self.split.labels[share]))
        _, share_lo, (x, y) = self._last
        return x[lo - share_lo:hi - share_lo], y[lo - share_lo:hi - share_lo]

    def _share(self, b: int) -> tuple[int, int]:
        """This process's rows [lo, hi) of a global batch of b: its ``world_size``-th share, which holds
        the parts of all its passes."""
        world, rank = distributed.world_size(), distributed.rank()
        if b % world:
            distributed.part_bounds(b)  # raises, naming the batch size
        return rank * b // world, (rank + 1) * b // world

    def _streamed(self, step: int, lo: int, hi: int) -> torch.Tensor:
        if self._stream is None or step != self._next:
            self._stream = iter(_loader(self.split, batch_sampler=_Steps(self, step, lo, hi)))
        with _worker_errors():
            part = next(self._stream)                                 # uint8 (hi - lo, C, H, W)
        self._next = step + 1
        x = torch.empty(part.shape, pin_memory=self.pin)              # the copy to a GPU reads pinned memory
        torch.div(part, self.split.scale, out=x)
        return x


def eval_batches(split: Split | FileSplit, rows: torch.Tensor | None = None,
                 batch_size: int = 500) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1], labels) of ``rows`` (default: every row), in order, ``batch_size`` at a time."""
    rows = torch.arange(len(split)) if rows is None else rows
    if isinstance(split, Split):
        for start in range(0, len(rows), batch_size):
            r = rows[start:start + batch_size]
            yield split.float_images(r), split.labels[r]
        return
    loader = iter(_loader(split, batch_size=batch_size, sampler=rows.tolist()))
    for start in range(0, len(rows), batch_size):
        with _worker_errors():
            x = next(loader)
        yield x.float() / split.scale, split.labels[rows[start:start + batch_size]]


@contextmanager
def _worker_errors():
    """A DatasetError raised in a DataLoader worker with its own message: the DataLoader re-raises it
    with the worker's whole traceback as the message."""
    try:
        yield
    except DatasetError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        raise DatasetError(last.split("DatasetError: ", 1)[-1]) from None
