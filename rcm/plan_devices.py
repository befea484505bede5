"""The devices `rcm plan` knows: memory, datasheet peaks per precision, memory bandwidth, and ONE achieved
fraction of peak per (device, precision) with its source (docs/plan.md).

Import-light (no torch): the workflow's config check reads device names and memory from here.

Peaks are dense TFLOP/s from the vendors' datasheets (SXM parts where there is a choice; DESIGN section
11); bandwidth is the datasheet's HBM/GDDR figure in GB/s. ``None``: the device has no native arithmetic
in that precision (the plan then uses its fp32 rate and says so).

The achieved fraction multiplies the peak of the matmul/convolution FLOPs only; memory-bound operators
are timed at the datasheet bandwidth (a roofline per operator, rcm.plan). Where no measurement on the
hardware exists, the fraction is the A100 TF32 calibration's, and the source says so.
"""

from __future__ import annotations

# The one calibration this project makes on published GPU figures: Carlini et al.'s CIFAR-10 DDS
# certification on one A100 (121 s per image at N = 100 000, batch 1 000; DESIGN section 11), planned
# by `rcm plan --config config/cifar10.yaml config/cifar10-dds.yaml --device a100-80gb --precision tf32`
# with fraction 1.0, gives 121 s at this fraction (docs/plan.md shows the computation). The ImageNet
# figure (469 s per image at N = 10 000) is a prediction, not used here.
A100_TF32_FRACTION = 0.315
A100_SOURCE = "calibrated: Carlini et al.'s CIFAR-10 DDS certification on an A100, 121 s/image (docs/plan.md)"
ASSUMED = "assumed equal to the A100 TF32 calibration (no measurement on this hardware)"


def _gpu(memory_gb, fp32, tf32, bf16, fp16, bandwidth, measured: dict | None = None) -> dict:
    peaks = {"fp32": fp32, "tf32": tf32, "bf16": bf16, "fp16": fp16}
    measured = measured or {}
    fraction = {p: measured.get(p, (A100_TF32_FRACTION, ASSUMED)) for p in peaks}
    return {"memory_gb": memory_gb, "peak_tflops": peaks, "bandwidth_gbs": bandwidth,
            "fraction": fraction, "launch_us": 5.0, "launch_source": "typical CUDA kernel launch latency"}


DEVICES: dict[str, dict] = {
    "a100-40gb": _gpu(40, 19.5, 156, 312, 312, 1555,
                      {"tf32": (A100_TF32_FRACTION, "the A100 80GB calibration (same GPU die)")}),
    "a100-80gb": _gpu(80, 19.5, 156, 312, 312, 2039, {"tf32": (A100_TF32_FRACTION, A100_SOURCE)}),
    "h100-80gb": _gpu(80, 67, 495, 989, 989, 3350),
    "h200": _gpu(141, 67, 495, 989, 989, 4800),
    "l40s": _gpu(48, 91.6, 183, 362, 362, 864),
    "v100-32gb": _gpu(32, 15.7, None, None, 125, 900),
    # measured on this machine by rcm.plan.calibrate_cpu when planned (peaks, bandwidth, launch)
    "cpu": {"memory_gb": None, "peak_tflops": None, "bandwidth_gbs": None,
            "fraction": {p: (1.0, "the peak is this machine's measured float32 matmul rate (a calibration run)")
                         for p in ("fp32", "tf32", "bf16", "fp16")},
            "launch_us": None, "launch_source": "measured: one small operator's time"},
}

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def device(name: str) -> dict:
    from rcm.errors import ConfigError

    if name not in DEVICES:
        raise ConfigError(f"unknown device '{name}' (known: {', '.join(DEVICES)})")
    return DEVICES[name]
