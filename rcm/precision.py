"""Mixed precision: the ``amp`` option of every training stage and of certification.

- ``off``: float32 throughout.
- ``bf16`` / ``fp16``: ``torch.autocast`` with that dtype. In training it wraps the forward pass
  and the loss (not the backward); fp16 adds a ``GradScaler`` whose skipped steps are counted.
  In certification it wraps the base classifier only (``Autocast``): noise is drawn and added
  to the image in float32 by ``rcm.smoothing.Smooth``, and the logits come back as float32.

Why a certificate stays valid under ``amp`` (docs/methods.md, "Mixed precision"): the smoothed
classifier is defined by whatever deterministic function f maps a noisy image to a class. Running
the base network in bf16 gives another such function f'; the certificate is then a statement about
the smoothing of f', the function that actually ran, and the Clopper-Pearson bound and the radius
are computed from f''s counts exactly as for f. What must not happen is drawing or adding the
noise at low precision (the perturbation would no longer be Gaussian with the stated sigma), which
is why the noise stays outside the autocast region.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from rcm.errors import ConfigError

AMP = ("off", "bf16", "fp16")
_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` value (None for 'off'); ConfigError names the bad value."""
    if amp not in _DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP)}, got '{amp}'")
    return _DTYPES[amp]


def native_support(amp: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``amp``'s dtype natively (else autocast still runs, emulated and slow).

    CUDA: bf16 needs compute capability 8.0 (Ampere) or newer; fp16 runs everywhere. CPU: oneDNN's own
    check (AVX-512 BF16 / AMX for bf16, AVX-512 FP16 / AMX-FP16 for fp16). On an AVX2-only CPU, bf16
    convolutions run tens of times slower than float32 (docs/benchmarks.md).
    """
    if amp == "off":
        return True
    if device.type == "cuda":
        # not torch.cuda.is_bf16_supported(): by default it also counts emulation, so a V100 or a T4
        # (7.x) would pass; and it asks about the current device, not necessarily the one used here
        index = device.index if device.index is not None else torch.cuda.current_device()
        return amp == "fp16" or torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[amp]
        try:
            return bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):
            return False
    return True


def set_float32(device: torch.device, tf32: bool = False) -> dict:
    """Apply rcm's float32 arithmetic on ``device`` and return it (for provenance and the plan).

    rcm's choice, on every stage: float32 means IEEE float32, unless the stage's ``tf32`` option is
    set. PyTorch's own defaults differ between matmuls and convolutions (since 1.12: strict float32
    matmuls, but TF32 cuDNN convolutions on Ampere and newer), so a float32 run of a convolutional
    network there silently computes in TF32 (10-bit mantissa); rcm sets both switches explicitly.
    With ``tf32`` both are TF32 (matmul precision 'high'). On a CPU the switches have no effect.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return float32_settings(device)


def set_deterministic(on: bool) -> None:
    """``torch.use_deterministic_algorithms(on)``: with it, cuDNN's backward passes, ``scatter_add_`` and
    the other nondeterministic CUDA kernels are replaced by deterministic ones (or raise), so a rerun on
    the same GPU model and software repeats a training run bit for bit. cuBLAS needs a fixed workspace
    for that (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: set here before any CUDA work)."""
    import os

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def float32_settings(device: torch.device) -> dict:
    """What float32 arithmetic means in this process on ``device`` now (TF32 switches)."""
    if device.type != "cuda":
        return {"tf32_matmul": False, "tf32_cudnn": False}
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


def arithmetic_provenance(device: torch.device) -> dict:
    """The facts a run's numbers depend on beyond its config: device model and compute capability,
    torch / CUDA / cuDNN versions, the TF32 switches. CUDA's noise streams (Philox) depend on the GPU
    model through its launch configuration, so a certificate records this and a resume compares it."""
    out = {"torch": torch.__version__, "device_type": device.type, **float32_settings(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        out.update(device_name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        import platform

        out.update(device_name=platform.processor() or platform.machine(), capability=None, cuda=None, cudnn=None)
    return out


def warn_if_emulated(amp: str, device: torch.device, what: str) -> None:
    if not native_support(amp, device):
        print(f"{what}: warning: amp={amp} on {device}, which has no native {amp} arithmetic; it runs "
              f"correctly but emulated, usually much slower than amp=off (rcm bench certify --amp {amp} "
              f"measures it)", file=sys.stderr)


def autocast(amp: str, device: torch.device):
    """The autocast context of ``amp`` on ``device`` (a disabled one for 'off')."""
    dtype = amp_dtype(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class Autocast(nn.Module):
    """``model`` run under autocast (and optionally in channels-last layout), returning float32 logits.

    This is the base classifier f' that certification smooths when ``amp`` is not 'off'. The input
    (the noisy image) arrives in float32 and is only cast inside the autocast region, by the layers
    that autocast lowers. ``channels_last`` changes the memory layout of the input and of the
    convolution weights (a speed choice that can change rounding, not the function's definition).
    """

    def __init__(self, model: nn.Module, amp: str = "off", channels_last: bool = False):
        super().__init__()
        amp_dtype(amp)  # validates
        self.model, self.amp, self.channels_last = model, amp, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.amp, x.device):
            logits = self.model(x)
        return logits.float()


class FixedBatch(nn.Module):
    """``model`` called on batches of exactly ``batch_size`` rows: a shorter batch is padded with zero
    images, and only the first rows of the answer (the real ones) are returned.

    Why (certification's ``compile``): a shard's batches have several sizes (n0, the full batch,
    n's remainder; a sequential look's remainder), and torch.compile specialises a graph to its input
    shapes, so each size would compile again (minutes for a large network). Marking the batch dimension
    dynamic does not remove that: Dynamo specialises sizes 0 and 1, and operators add their own guards
    on it (a convolution's fake kernel guards the batch size against its algorithm thresholds), so a
    shard could still compile two or three times. Padding makes one shape, hence one compilation per
    shard, guaranteed. Its cost is the padded rows: at most batch_size - 1 wasted rows per call of
    ``Smooth.sample_counts`` (under 1% at n0 = 100, n = 100 000, batch 1 000; more in sequential
    certification, whose every look ends in a short batch: looks of 100, 50, 75, ... draws each cost a
    full batch while they are smaller than it). The padded rows are
    never counted: they are sliced off before ``Smooth`` takes the argmax, and the noise stream is not
    touched (only the real rows' noise is drawn).
    """

    def __init__(self, model: nn.Module, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, int(batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b > self.batch_size:
            raise ValueError(f"a batch of {b} rows for a network compiled for {self.batch_size}")
        if b < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - b, *x.shape[1:]))])
        return self.model(x)[:b]


def wrap(model: nn.Module, amp: str = "off", channels_last: bool = False, compile: bool = False,  # noqa: A002
         batch_size: int | None = None) -> nn.Module:
    """``model`` as certification runs it: unchanged for amp 'off' without channels_last or compile.

    ``compile`` with a ``batch_size``: compiled once for that batch size, shorter batches padded to it
    (``FixedBatch``); without one, compiled for whatever shapes come (a recompilation per new shape)."""
    if amp != "off" or channels_last:
        model = Autocast(model, amp, channels_last)
    if compile:
        if batch_size is None:
            return torch.compile(model)
        model = FixedBatch(torch.compile(model, dynamic=False), batch_size)
    return model
