"""`rcm plan`: what a configured run costs, and whether it fits, before any job starts (docs/plan.md).

For every rule of the configured DAG (one row per rule and grid point, with its job count) the plan
gives FLOPs, peak memory per device, device-hours and wall time on a named device, and whether the
job fits the device's memory (or ``gpu_memory_gb``) and the SLURM profile's runtime with its attempts.

How each number is made (one estimator at every scale):
- Networks are the configured ones at full size (rcm.presets), built on the meta device: shapes only,
  no memory, no arithmetic. A training step is the stage's own forward pass and loss (the same model
  methods and loss modules the stage calls) and its backward pass, at the per-device batch
  (batch_size / (gpus x nodes) / micro_batches); certification is Smooth.sample_counts' loop body
  (noise, add, base classifier, argmax) under inference mode at the certification batch.
- ``Trace`` (a TorchDispatchMode) watches every operator: it keeps the live tensor storages (weak
  references) and their bytes, so its peak is the peak of allocated tensor bytes; and it records each
  operator's FLOPs (torch.utils.flop_counter's formulas) and the bytes it reads and writes.
- Peak memory = parameters and buffers (every network the stage holds: the trained one, an EMA copy,
  a frozen classifier) + optimiser state (the stage's optimiser class, stepped once on the meta
  device: its real tensors, dtypes and count) + the traced peak of the step (activations, gradients,
  temporaries). With ``amp`` the step is traced with the network in the half dtype (activations and
  saved tensors in half), then float32 gradients and autocast's half copy of the weights are added.
  The same Trace measured on a real CPU step is the test's yardstick (tests/test_plan.py).
- Time: a roofline per operator, max(FLOPs / (peak x fraction), bytes / bandwidth) + launch latency
  (on the CPU the sum of the two: one thread does not overlap them), summed over the step
  (rcm.plan_devices: datasheet peaks, ONE fraction per device and precision with its source). On
  ``cpu`` the peak, bandwidth, latency and fraction are measured by a calibration run.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from rcm.errors import ConfigError
from rcm.plan_devices import DEVICES, PRECISIONS, device as device_info

# test-split sizes: how many images certification can draw from (before skip / max_images)
TEST_IMAGES = {"digits": 360, "cifar10": 10_000, "imagenet": 50_000}
SECTIONS = ("denoiser", "classifier", "finetune_denoiser", "rrcm_pretrain", "rrcm_finetune")
HALF = (torch.float16, torch.bfloat16)
# the default run's mdds cascade reached 1.66 of its 3 stages per image on average (docs/benchmarks.md,
# results/digits/report/cost.md: 15.6 / 9.4 GFLOP per image): the "typical" cascade figure; the bound is 3 of 3
TYPICAL_CASCADE_STAGE_FRACTION = 1.66 / 3
# sequential certification at n_max = 100 000 on the default run's models used 16 241 of its 100 100 draws
# per image on average (docs/benchmarks.md, `rcm bench-sequential`: the 150 images of its twelve rows,
# weighted by images): the "typical" sequential figure; the bound is every draw
TYPICAL_SEQUENTIAL_DRAW_FRACTION = 16_241 / 100_100


# ----------------------------------------------------------------------------------- tracing

@functools.lru_cache(maxsize=None)
def _composite(func) -> bool:
    """Whether an operator is a composite of others (fused attention stays whole: _FusedAttention)."""
    return func is not torch.ops.aten.scaled_dot_product_attention.default and \
        torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)


class Trace(TorchDispatchMode):
    """Live tensor bytes (peak), and per operator its FLOPs, bytes moved and whether it ran in half."""

    def __init__(self, amp: torch.dtype | None = None, *modules: nn.Module, device_type: str = "cuda"):
        super().__init__()
        self.amp = amp
        self.fp32_ops = _AUTOCAST_FP32["cpu" if device_type == "cpu" else "cuda"]
        self.state = {self._key(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.live: dict[int, tuple[StorageWeakRef, int, bool]] = {}  # storage -> (ref, bytes, half)
        self.current = self.peak = 0
        self.ops: list[tuple[float, int, bool]] = []

    def _collect(self) -> None:
        expired = torch.UntypedStorage._expired  # what StorageWeakRef.expired calls, without two wrappers
        dead = [k for k, (ref, _, _) in self.live.items() if expired(ref.cdata)]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return 0  # .item() of a logged loss term: a meta tensor has no value, and none is needed
        if func._overloadpacket not in flop_registry and _composite(func):
            # under inference mode composite operators (conv2d, linear) arrive whole: count their parts,
            # as FlopCounterMode does
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self._collect()
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        packet = func._overloadpacket
        # other operators: half when their floating inputs are, leaving aside the module's own weights
        # and buffers (a BatchNorm of a half activation is half) and scalars
        acts = [t for t in ins if t.is_floating_point() and t.numel() > 1 and self._key(t) not in self.state]
        half_out = self.amp is not None and (packet in _AUTOCAST_HALF or (
            packet not in self.fp32_ops and bool(acts) and all(self._half(t) for t in acts)))
        for t in outs:
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in self.live:
                half = half_out and t.is_floating_point()
                size = storage.nbytes() // 2 if half else storage.nbytes()
                self.live[ref.cdata] = (ref, size, half)
                self.current += size
        self.peak = max(self.peak, self.current)
        if not getattr(func, "is_view", False) and outs:
            moved = sum(t.numel() * (2 if self._half(t) else t.element_size()) for t in ins + outs)
            flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
            half = packet in _AUTOCAST_HALF and self.amp is not None
            self.ops.append((float(flops), moved, half or any(t.dtype in HALF for t in ins if t.is_floating_point())))
        return out

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return StorageWeakRef(t.untyped_storage()).cdata

    def _half(self, t: torch.Tensor) -> bool:
        entry = self.live.get(StorageWeakRef(t.untyped_storage()).cdata)
        return bool(entry and entry[2])

    @property
    def flops(self) -> float:
        return sum(f for f, _, _ in self.ops)


# Autocast on the meta device, which has none, is accounted rather than run (the dtype checks of
# composite operators such as conv2d run above any dispatch mode, so a trace cannot change dtypes):
# the outputs of the operators autocast runs in the half dtype (its lower-precision list, as they reach
# aten, forward and backward) count 2 bytes per element; those it runs in float32 count 4; the rest
# count 2 when every floating input does (type promotion). Weights and the noise stay float32.
_AUTOCAST_HALF = {torch.ops.aten.convolution, torch.ops.aten.convolution_backward, torch.ops.aten.mm,
                  torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                  torch.ops.aten._scaled_dot_product_efficient_attention,
                  torch.ops.aten._scaled_dot_product_efficient_attention_backward}
# the operators autocast runs in float32, per device type (torch's own lists: CUDA keeps norms, softmax
# and reductions in float32; the CPU's autocast keeps only a few losses there)
_AUTOCAST_FP32 = {
    "cuda": {torch.ops.aten.native_layer_norm, torch.ops.aten.native_group_norm, torch.ops.aten._softmax,
             torch.ops.aten._log_softmax, torch.ops.aten.mse_loss, torch.ops.aten.nll_loss_forward,
             torch.ops.aten.exp, torch.ops.aten.log, torch.ops.aten.pow, torch.ops.aten.rsqrt,
             torch.ops.aten.logsumexp, torch.ops.aten.cumsum, torch.ops.aten.sum, torch.ops.aten.mean},
    "cpu": {torch.ops.aten.mse_loss, torch.ops.aten.nll_loss_forward, torch.ops.aten.binary_cross_entropy},
}


class _MetaAutocast:
    """While tracing: ``torch.autocast('meta', ...)`` (a loss that turns autocast off around its own
    arithmetic, e.g. rcm.train.rrcm_losses) means the CPU's autocast, which leaves meta tensors alone."""

    def __enter__(self):
        self.original = torch.autocast
        original = self.original

        class autocast(original):  # noqa: N801 - torch's name
            def __init__(self, device_type, *args, **kwargs):
                super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

        torch.autocast = autocast
        return self

    def __exit__(self, *exc):
        torch.autocast = self.original


class _EfficientAttention(torch.autograd.Function):
    """Fused attention on the meta device as a GPU runs it (the memory-efficient kernel: the output and
    one log-sum-exp per query are kept, never the attention matrix); the meta device would otherwise
    take scaled_dot_product_attention's unfused path, which materialises it."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
        dq, dk, dv, db = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, bias, out, lse, seed, offset, 0.0,
            [True, True, True, bias is not None and bias.requires_grad], False, scale=ctx.scale)
        return dq, dk, dv, (db if bias is not None and bias.requires_grad else None), None


class _FusedAttention:
    """While tracing for a GPU: F.scaled_dot_product_attention of meta tensors runs as _EfficientAttention."""

    def __init__(self, device_type: str = "cuda"):
        # a CPU plan keeps the unfused path, which writes the attention matrix out as rcm's ViT does
        # on a CPU (rcm.models.vit.Block)
        self.active = device_type != "cpu"

    def __enter__(self):
        from torch.nn import functional as F

        self.original = original = F.scaled_dot_product_attention
        if not self.active:
            return self

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            if q.device.type != "meta" or is_causal or kw.get("enable_gqa") or q.dim() != 4:
                return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
            bias = attn_mask
            if bias is not None:
                if bias.dtype == torch.bool:
                    bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device)
                bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return _EfficientAttention.apply(q, k, v, bias, scale)

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        from torch.nn import functional as F

        F.scaled_dot_product_attention = self.original


def state_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of ``modules``."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = StorageWeakRef(t.untyped_storage()).cdata
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Step ``optimizer`` once on zero gradients (its own state is created as in training) and count the
    state tensors that live beside the parameters (not the CPU step counters)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += v.numel() * v.element_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    return total


# ----------------------------------------------------------------------------------- networks

def _meta(build):
    """``build()`` with every tensor it creates on the meta device (parameters of any size, free)."""
    with torch.device("meta"):
        return build()


def certified_network(cfg: dict, method: str, sigma: float) -> nn.Module:
    """The base classifier ``method`` certifies at ``sigma`` (its preset builder, rcm.presets), on the
    meta device, eval mode."""
    from rcm import presets

    return _all_meta(_meta(lambda: presets.base_classifier(cfg, method, sigma)[0])).eval()


def _all_meta(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer on the meta device, those a builder made on the CPU on
    purpose too (a schedule read while it is built, as a Denoiser's). Plain tensor attributes stay
    where they are (a Denoiser's float64 noise ratios, read by t* alone)."""
    return model.to("meta")


def _rrcm_net(cfg: dict, classes: bool):
    from rcm import presets
    from rcm.models.vit import RRCMNet
    from rcm.train.rrcm_pretrain import PretrainOptions

    c, size, k = presets.image_shape(cfg)
    o = presets._options(PretrainOptions, cfg["rrcm_pretrain"])
    return RRCMNet(image_size=size, in_channels=c, patch_size=o.patch_size, dim=o.dim, depth=o.depth,
                   heads=o.heads, mlp_ratio=o.mlp_ratio, proj_dim=0 if classes else o.proj_dim,
                   proj_hidden=o.proj_hidden, num_classes=k if classes else 0)


# ----------------------------------------------------------------------------------- training steps

@dataclass
class Stage:
    """What a training stage holds in memory and does per step (one process, one micro-batch)."""

    model: nn.Module                           # trained
    optimizer: torch.optim.Optimizer
    step: object                               # step(model_for_step, batch, dtype) -> loss
    held: list[nn.Module] = field(default_factory=list)   # EMA copies, frozen networks


def stage_setup(cfg: dict, section: str, sigma: float = 0.25) -> Stage:
    """The stage's networks and optimiser as the stage builds them, and its step (rcm/train/*.py)."""
    from rcm import presets

    c, size, classes = presets.image_shape(cfg)
    sec = cfg[section]
    torch.manual_seed(0)
    if section == "classifier":
        from torch.nn import functional as F

        from rcm.train.classifier import ClassifierOptions

        o = presets._options(ClassifierOptions, sec)
        model = _meta(lambda: presets.classifier({**cfg, "classifier": {**sec, "pretrained": "",
                                                                        "pretrained_noisy": []}}, sigma)[0])
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                              weight_decay=o.weight_decay)

        def step(m, b, dtype):
            x = torch.rand((b, c, size, size), device="meta", dtype=dtype)
            x = x + sigma * torch.randn_like(x)
            y = torch.zeros(b, dtype=torch.long, device="meta")
            return F.cross_entropy(m(x).float(), y)
        return Stage(model, opt, step)
    if section == "denoiser":
        model = _all_meta(_meta(lambda: presets.denoiser({**cfg, "denoiser": {**sec, "pretrained": ""}})[0]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=sec.get("weight_decay", 0.0))

        def step(m, b, dtype):
            x0 = torch.rand((b, c, size, size), device="meta", dtype=dtype)
            return m.loss(x0, torch.Generator().manual_seed(0)).float()
        return Stage(model, opt, step, held=[_meta(lambda: copy.deepcopy(model))])
    if section == "finetune_denoiser":
        from rcm.train.mdds import FinetuneDenoiserOptions, MultiScaleLoss

        o = presets._options(FinetuneDenoiserOptions, sec)
        model = _all_meta(_meta(lambda: presets.denoiser(cfg)[0]))
        clf = _meta(lambda: presets.classifier(cfg, 0.0)[0])
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)

        def step(m, b, dtype):
            objective = MultiScaleLoss(m, clf.to(dtype), copies=o.copies, ac_weight=o.ac_weight,
                                       denoise_weight=o.denoise_weight, ac_target=o.ac_target)
            x = torch.rand((b, c, size, size), device="meta", dtype=dtype)
            y = torch.zeros(b, dtype=torch.long, device="meta")
            return objective(x, y, max(o.sigmas), torch.Generator().manual_seed(0))[0].float()
        return Stage(model, opt, step, held=[clf])
    if section == "rrcm_pretrain":
        from rcm.train.rrcm_losses import ConsistencyLoss, ContrastiveLoss
        from rcm.train.rrcm_pretrain import PretrainOptions, param_groups

        o = presets._options(PretrainOptions, sec)
        model = _meta(lambda: _rrcm_net(cfg, classes=False))
        target = _meta(lambda: copy.deepcopy(model)).requires_grad_(False)
        opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr)
        contrastive, consistency = ContrastiveLoss(o.temperature), ConsistencyLoss(o.temperature)
        world = processes(cfg, section)

        def step(m, b, dtype):
            # rcm.train.rrcm_pretrain.build_run's loss_fn on this process's b images: one online pass
            # with gradients over [v1, v2 | x at s_n], the target over [v1, v2], the stop-grad online
            # pass at s_{n+1}; keys gathered from all `world` processes
            tgt = target.to(dtype)
            x = torch.rand((b, c, size, size), device="meta", dtype=dtype)
            inputs = torch.cat([x, x, x])
            levels = torch.full((3 * b,), 1.0, device="meta", dtype=dtype)
            hs = m.representation(inputs, levels)
            z1, z2 = m.project(hs[:2 * b]).chunk(2)
            with torch.no_grad():
                t1, t2 = tgt.project(tgt.representation(inputs[:2 * b], levels[:2 * b])).chunk(2)
                h_next = m.representation(x, 0.5)
            gather = (lambda t: torch.cat([t] * world)) if world > 1 else (lambda t: t)
            return (contrastive(z1.float(), z2.float(), gather(t1).float(), gather(t2).float(), 0)
                    + consistency(hs[2 * b:].float(), gather(h_next).float(), 0))
        return Stage(model, opt, step, held=[target])
    if section == "rrcm_finetune":
        from rcm.models.vit import SigmaConditioned
        from rcm.train.rrcm_finetune import FinetuneOptions, consistency_weight
        from rcm.train.rrcm_losses import ConsistencyRegularization
        from rcm.train.rrcm_pretrain import param_groups

        o = presets._options(FinetuneOptions, sec)
        model = _meta(lambda: _rrcm_net(cfg, classes=True))
        opt = torch.optim.AdamW(param_groups(model, o.weight_decay, o.layer_decay), lr=o.lr)
        loss = ConsistencyRegularization(consistency_weight(o, sigma), o.eta)
        base = SigmaConditioned(model, sigma)

        def step(m, b, dtype):
            base.net = m
            x = torch.rand((o.num_draws * b, c, size, size), device="meta", dtype=dtype)
            logits = base(x).reshape(o.num_draws, b, -1)
            return loss.weighted(loss.terms(logits, torch.zeros(b, dtype=torch.long, device="meta")))
        return Stage(model, opt, step)
    raise ConfigError(f"no training stage '{section}' (known: {', '.join(SECTIONS)})")


def processes(cfg: dict, section: str) -> int:
    """Processes (GPUs) a training stage runs on: gpus x nodes (0 GPUs: one CPU process)."""
    return max(1, int(cfg["gpus"].get(section, 0))) * max(1, int(cfg.get("nodes", {}).get(section, 1)))


def per_device_batch(cfg: dict, section: str) -> int:
    sec = cfg[section]
    return max(1, math.ceil(sec["batch_size"] / processes(cfg, section) / max(1, sec.get("micro_batches", 1))))


@dataclass
class Estimate:
    """One job's per-device memory (bytes, with its parts) and its operators (FLOPs, bytes, half)."""

    parts: dict[str, int]
    ops: list[tuple[float, int, bool]]
    repeat: float = 1.0          # the traced ops run this many times per unit (micro-batches, batches)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def flops(self) -> float:
        return self.repeat * sum(f for f, _, _ in self.ops)


def _dtype(amp: str):
    return {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def training_estimate(stage: Stage, batch: int, amp: str, micro_batches: int = 1,
                      device_type: str = "cuda") -> Estimate:
    """Per-device peak memory and the operators of one optimiser step (``micro_batches`` passes), with
    ``device_type``'s autocast policy."""
    dtype = _dtype(amp)
    params = state_bytes(stage.model)
    held = state_bytes(*stage.held)
    grads = trainable_bytes(stage.model)
    opt_state = optimizer_state_bytes(stage.optimizer)
    stage.model.train()
    trace = Trace(None if dtype == torch.float32 else dtype, stage.model, *stage.held, device_type=device_type)
    with trace, _MetaAutocast(), _FusedAttention(device_type):
        stage.step(stage.model, batch, torch.float32).backward()
    # the trace ends holding the gradients, which autograd gives the weights' dtype (float32): counted
    # apart, so the activations are the trace's peak less what it ends with
    parts = {"parameters": params, "gradients": grads, "optimizer_state": opt_state, "ema_and_frozen": held,
             "activations": trace.peak - trace.current}
    if dtype != torch.float32:
        parts["autocast_weights"] = grads // 2  # autocast's half copy of every trained weight
    for p in stage.model.parameters():
        p.grad = None
    return Estimate(parts, trace.ops, repeat=micro_batches)


def certify_estimate(model: nn.Module, shape: tuple[int, ...], batch: int, amp: str,
                     device_type: str = "cuda") -> Estimate:
    """Per-device peak and operators of one certification batch (Smooth.sample_counts' loop body: noise
    drawn and added in float32, the base classifier under ``amp``)."""
    dtype = _dtype(amp)
    params = state_bytes(model)
    trace = Trace(None if dtype == torch.float32 else dtype, model, device_type=device_type)
    with trace, _FusedAttention(device_type), torch.inference_mode():
        x = torch.rand(shape, device="meta")
        noise = torch.randn((batch, *shape), device="meta")
        noisy = noise.mul_(0.5).add_(x)
        model(noisy).float().argmax(dim=1)
    parts = {"parameters": params, "activations": trace.peak}
    if dtype != torch.float32:
        parts["autocast_weights"] = params // 2
    return Estimate(parts, trace.ops)


# ----------------------------------------------------------------------------------- devices, time

@dataclass
class Rates:
    """FLOP/s per precision (peak x fraction), bytes/s and seconds per operator launch of one device."""

    name: str
    memory_gb: float | None
    flops: dict[str, float]
    sources: dict[str, str]
    bandwidth: float
    launch: float
    notes: list[str] = field(default_factory=list)
    overlap: bool = True   # a GPU overlaps an operator's arithmetic with its memory traffic; one CPU thread does not

    def seconds(self, est: Estimate, float32: str) -> float:
        """Roofline over the estimate's operators; float32 operators at ``float32`` ('fp32' or 'tf32')."""
        total = 0.0
        rate32 = self.flops[float32]
        for flops, moved, half in est.ops:
            rate = self.flops["half"] if half else rate32
            compute, memory = flops / rate, moved / self.bandwidth
            total += (max(compute, memory) if self.overlap else compute + memory) + self.launch
        return est.repeat * total


def calibrate_cpu(threads: int = 1) -> dict:
    """This machine at ``threads`` torch threads: the float32 matmul peak, memory bandwidth and
    per-operator latency, measured; and the one achieved fraction of that peak, as for every device the
    number that makes the plan's own model reproduce one measured reference workload: here Cohen et
    al.'s CIFAR ResNet-20 (random weights), inference at batch 256, timed on this machine now. It is
    none of the configured networks."""
    from rcm.models.cohen import CohenClassifier

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def best(fn, repeats=5):
            # the median, not the best: a certificate's `time` is what an image took among whatever
            # else the machine ran, and so is the typical timing here
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return sorted(times)[len(times) // 2]

        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        peak = 2 * 1024 ** 3 / best(lambda: a @ b)
        u, v = torch.randn(8_000_000), torch.randn(8_000_000)
        bandwidth = 3 * 4 * 8_000_000 / best(lambda: torch.add(u, v))
        s, t = torch.randn(8), torch.randn(8)
        launch = best(lambda: [torch.add(s, t) for _ in range(2000)]) / 2000
        torch.manual_seed(0)
        ref = CohenClassifier(arch="cifar_resnet20", num_classes=10, image_size=32).eval()
        x = torch.rand(256, 3, 32, 32)
        with torch.inference_mode():
            measured = best(lambda: ref(x))
    finally:
        torch.set_num_threads(old)
    est = certify_estimate(ref.to("meta"), (3, 32, 32), 256, "off")
    lo, hi = 1e-4, 1.0
    probe = Rates("cpu", None, {}, {}, bandwidth, launch, overlap=False)
    for _ in range(60):  # bisection: the modelled time falls as the fraction rises
        mid = (lo * hi) ** 0.5
        probe.flops = {"fp32": peak * mid, "tf32": peak * mid, "half": peak * mid}
        lo, hi = (mid, hi) if probe.seconds(est, "fp32") > measured else (lo, mid)
    return dict(peak=peak, fraction=hi, bandwidth=bandwidth, launch=launch, threads=threads,
                reference_seconds=measured)


def rates(name: str, precision: str, amp_dtype: str, calibration: dict | None = None) -> Rates:
    """``name``'s rates: float32 operators at ``precision`` ('fp32'/'tf32'), half ones at ``amp_dtype``."""
    info = device_info(name)
    notes = []
    if name == "cpu":
        cal = calibration or calibrate_cpu()
        rate = cal["peak"] * cal["fraction"]
        notes.append(f"cpu: calibrated at {cal['threads']} thread(s): float32 matmul {cal['peak'] / 1e9:.3g} "
                     f"GFLOP/s, achieved fraction {cal['fraction']:.3f} (reference: ResNet-20 at batch 256 in "
                     f"{cal['reference_seconds'] * 1e3:.1f} ms), {cal['bandwidth'] / 1e9:.3g} GB/s, "
                     f"{cal['launch'] * 1e6:.2f} us per operator; float32 is IEEE float32 here (no TF32)")
        flops = {"fp32": rate, "tf32": rate, "half": rate}
        sources = {p: f"measured: calibration run (fraction {cal['fraction']:.2f})" for p in PRECISIONS}
        import psutil

        memory = psutil.virtual_memory().total / 1e9
        return Rates(name, memory, flops, sources, cal["bandwidth"], cal["launch"], notes, overlap=False)
    peaks = info["peak_tflops"]

    def rate(p):
        if peaks[p] is None:
            notes.append(f"{name} has no native {p}: planned at its fp32 rate")
            return peaks["fp32"] * 1e12 * info["fraction"]["fp32"][0], info["fraction"]["fp32"][1]
        return peaks[p] * 1e12 * info["fraction"][p][0], info["fraction"][p][1]

    r32, s32 = rate(precision)
    half = amp_dtype if amp_dtype in ("bf16", "fp16") else "fp16"
    rh, sh = rate(half)
    return Rates(name, info["memory_gb"], {"fp32": r32, "tf32": r32, "half": rh},
                 {precision: s32, half: sh}, info["bandwidth_gbs"] * 1e9, info["launch_us"] * 1e-6, notes)


# ----------------------------------------------------------------------------------- the DAG

def _slurm_runtime(profile: Path) -> tuple[dict[str, list[float]], int]:
    """rule -> runtime limit in minutes per attempt, from the SLURM profile (``runtime: "N * attempt"``)."""
    import yaml

    if not profile.is_file():
        return {}, 1
    data = yaml.safe_load(profile.read_text()) or {}
    attempts = int(data.get("retries", 0)) + 1
    default = data.get("default-resources", {}).get("runtime", 60)
    out = {}
    for rule, res in (data.get("set-resources") or {}).items():
        expr = str(res.get("runtime", default))
        out[rule] = [float(eval(expr, {"__builtins__": {}}, {"attempt": a})) for a in range(1, attempts + 1)]
    out["*"] = [float(eval(str(default), {"__builtins__": {}}, {"attempt": a})) for a in range(1, attempts + 1)]
    return out, attempts


def stage_precision(cfg: dict, section: str, override: str | None) -> tuple[str, str]:
    """(float32 meaning 'fp32'/'tf32', amp 'off'/'bf16'/'fp16') of a stage, or of the --precision what-if."""
    if override:
        if override not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{override}'")
        return ("tf32" if override == "tf32" else "fp32"), (override if override in ("bf16", "fp16") else "off")
    sec = cfg[section]
    return ("tf32" if sec.get("tf32", False) else "fp32"), sec.get("amp", "off") or "off"


def jobs(cfg: dict) -> list[dict]:
    """The rules of the configured DAG that use an accelerator, one entry per rule and grid point: the
    training stages of the model files its methods read (rcm.stages; imports use none), then the
    certification of each method, cascade and sequential method."""
    from rcm import stages

    methods = list(cfg["methods"])
    seq = list(cfg.get("sequential_methods", []))
    sigmas = [float(s) for s in cfg["sigmas"]]
    out = [dict(rule=job.stage.rule, section=job.stage.section, method=None, sigma=job.sigma, jobs=1)
           for job in stages.needed(cfg) if job.trains]
    shards = cfg["certify"]["shards"]
    custom = set(cfg.get("custom_methods") or {})

    def rule(m: str, kind: str = "") -> str:      # a user's method certifies in the certify_custom* rules
        return f"certify{'_custom' if m in custom else ''}{kind}"

    def cascade(c: dict, kind: str) -> dict:
        return dict(rule=rule(c["method"], kind), section="certify", method=c["method"], sigma="cascade",
                    jobs=shards, stages=[float(s) for s in c["flags"]["sigmas"]])

    out += [dict(rule=rule(m), section="certify", method=m, sigma=s, jobs=shards) for m in methods for s in sigmas]
    out += [cascade(c, "_cascade") for c in cfg["cascades"]]
    out += [dict(rule=rule(m, "_sequential"), section="certify", method=m, sigma=s, jobs=shards)
            for m in seq for s in sigmas]
    # a sequential job draws at most what its fixed-n twin draws: planned as that bound
    out += [cascade(c, "_cascade_sequential") for c in cfg.get("sequential_cascades", [])]
    return out


def images_per_shard(cfg: dict) -> int:
    c = cfg["certify"]
    n = math.ceil(TEST_IMAGES[cfg["dataset"]] / c["skip"])
    n = min(n, c["max_images"]) if c["max_images"] else n
    return math.ceil(n / c["shards"])


def certify_batch(cfg: dict, method: str) -> int:
    c = cfg["certify"]
    for entry in c.get("batch_sizes", []):
        m, _, v = entry.partition("=")
        if m == method:
            return int(v)
    return c["batch_size"]


# ----------------------------------------------------------------------------------- the plan

def gpu_limits(cfg: dict) -> dict[str, float]:
    """``gpu_memory_gb`` per stage (one number applies to every stage)."""
    v = cfg.get("gpu_memory_gb")
    if v in (None, {}, 0):
        return {}
    if isinstance(v, (int, float)):
        return {s: float(v) for s in (*SECTIONS, "certify")}
    return {k: float(x) for k, x in v.items()}


def advice(cfg: dict, section: str, est: Estimate, limit_gb: float, method: str | None = None) -> str:
    """What would make a stage fit under ``limit_gb``."""
    if section == "certify":
        act = est.parts["activations"]
        room = limit_gb * 1e9 - (est.peak - act)
        b = certify_batch(cfg, method)
        smaller = max(1, int(b * room / act)) if room > 0 else 0
        hints = [f"certify.batch_sizes: [{method}={smaller}] (now {b})" if smaller else "a GPU with more memory",
                 "certify.amp: bf16" if cfg["certify"].get("amp", "off") == "off" else ""]
        return "; ".join(h for h in hints if h)
    sec = cfg[section]
    act = est.parts["activations"]
    fixed = est.peak - act
    hints = []
    if fixed >= limit_gb * 1e9:
        hints.append("parameters, gradients and optimiser state alone exceed the limit: a GPU with more memory")
    else:
        factor = math.ceil(act / (limit_gb * 1e9 - fixed))
        if section != "rrcm_pretrain":
            hints.append(f"micro_batches: {sec.get('micro_batches', 1) * factor}")
        hints.append(f"{factor}x the GPUs (gpus x nodes = {processes(cfg, section) * factor})")
        hints.append(f"batch_size: {max(1, sec['batch_size'] // factor)}")
    if sec.get("amp", "off") == "off":
        hints.append("amp: bf16 (about half the activations)")
    return "; ".join(hints)


@dataclass
class Plan:
    device: str
    config: list[str]
    rows: list[dict]
    notes: list[str]

    @property
    def total_device_hours(self) -> float:
        return sum(r["device_hours"] for r in self.rows)

    def as_json(self) -> dict:
        by_stage: dict[str, float] = {}
        for r in self.rows:
            by_stage[r["rule"]] = by_stage.get(r["rule"], 0.0) + r["device_hours"]
        by_method: dict[str, float] = {}             # fixed-n certification over the same sigmas
        for r in self.rows:
            if r["rule"] in ("certify", "certify_custom"):
                by_method[r["method"]] = by_method.get(r["method"], 0.0) + r["device_hours"]
        return {"device": self.device, "config": self.config, "rules": self.rows,
                "stage_device_hours": by_stage, "total_device_hours": self.total_device_hours,
                "certification_device_hours": by_method, "notes": self.notes}


def make_plan(files: list[str], device: str = "a100-80gb", precision: str | None = None,
              profile: str | Path = "profiles/slurm/config.yaml", calibration: dict | None = None,
              only: str | None = None) -> Plan:
    """The plan of the config ``files`` (merged in order) on ``device``."""
    from rcm import presets

    device_info(device)
    cfg = presets.load_config(files)
    _validate(cfg, files)
    return plan_config(cfg, files, device, precision, profile, calibration, only)


def _plannable_methods(cfg: dict, notes: list[str]) -> dict:
    """``cfg`` without the methods whose networks the plan cannot build (rcm.methods: a method without
    a ``preset`` builder, as a user's method is unless its entry names one), and without the train
    commands of users' methods; a note names what is left out. (A user's preset that fails while it
    is traced leaves its method out of the plan too: plan_config.)"""
    from rcm import methods, stages

    methods.register_config(cfg.get("custom_methods") or {})
    every = stages.certified_methods(cfg)
    left = [m for m in every if m in methods.names() and not methods.get(m).preset]
    commands = [f"train_{m}_{role}" for m in every if m in methods.names() for role in methods.get(m).train]
    if commands:
        notes.append(f"not planned: {', '.join(commands)} (a user's method's own train command)")
    if not left:
        return cfg
    notes.append(f"not planned: {', '.join(left)} (a user's method: give its custom_methods entry a preset, "
                 "MODULE:ATTR building its base classifier from (cfg, sigma), for rcm plan to trace it)")
    keep = lambda m: m not in left  # noqa: E731
    return {**cfg, "methods": [m for m in cfg["methods"] if keep(m)],
            "sequential_methods": [m for m in cfg.get("sequential_methods", []) if keep(m)],
            "cascades": [c for c in cfg["cascades"] if keep(c["method"])],
            "sequential_cascades": [c for c in cfg.get("sequential_cascades", []) if keep(c["method"])]}


def plan_config(cfg: dict, files: list[str], device: str = "a100-80gb", precision: str | None = None,
                profile: str | Path = "profiles/slurm/config.yaml", calibration: dict | None = None,
                only: str | None = None) -> Plan:
    """The plan of the (validated) config ``cfg``, read from ``files``, on ``device``."""
    from rcm import presets

    notes: list[str] = []
    cfg = _without_downloads(cfg, notes)
    cfg = _plannable_methods(cfg, notes)
    if only and only not in {j["rule"] for j in jobs(cfg)}:
        known = sorted({j["rule"] for j in jobs(cfg)})
        raise ConfigError(f"no rule '{only}' in this config's DAG (rules with a device: {', '.join(known)})")
    limits_min, attempts = _slurm_runtime(Path(profile))
    limits = gpu_limits(cfg)
    rows = []
    custom, failed = set(cfg.get("custom_methods") or {}), set()
    c, size, _ = presets.image_shape(cfg)
    cache: dict = {}
    cal = calibration if device != "cpu" else (calibration or calibrate_cpu())
    for job in jobs(cfg):
        if only and job["rule"] != only:
            continue
        section = job["section"]
        float32, amp = stage_precision(cfg, section, precision)
        dev = rates(device, float32, amp, cal)
        for n in dev.notes:
            if n not in notes:
                notes.append(n)
        row = dict(rule=job["rule"], section=section, method=job["method"], sigma=job["sigma"], jobs=job["jobs"],
                   precision=amp if amp != "off" else float32)
        if section == "certify" and job["method"] in failed:
            continue
        if section == "certify":
            try:
                row.update(_certify_row(cfg, job, amp, float32, dev, (c, size, size), cache))
            except Exception as exc:  # noqa: BLE001 - a user's preset: any failure is a note, not a crash
                if job["method"] not in custom:
                    raise
                failed.add(job["method"])
                problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                notes.append(f"not planned: {job['method']} (custom_methods.{job['method']}.preset could not be "
                             f"traced on the meta device at sigma {job['sigma']}: {problem})")
                continue
        else:
            row.update(_train_row(cfg, job, amp, float32, dev, cache))
        limit = limits.get(section)
        memory = limit if limit is not None else dev.memory_gb
        row["memory_limit_gb"] = memory
        row["fits_memory"] = memory is None or row["peak_memory_gb"] <= memory
        runtime = limits_min.get(job["rule"], limits_min.get("*"))
        row["runtime_limit_minutes"] = runtime
        hours = row["wall_hours_per_job"]
        if runtime:
            row["fits_runtime"] = ("yes" if hours * 60 <= runtime[0] else
                                   f"with {attempts - 1} resumed retries" if hours * 60 <= sum(runtime) else "no")
        else:
            row["fits_runtime"] = "yes"
        row["fits"] = bool(row["fits_memory"] and row["fits_runtime"] != "no")
        if not row["fits_memory"]:
            row["advice"] = advice(cfg, section, row.pop("_estimate"), memory, job["method"])
        row.pop("_estimate", None)
        rows.append(row)
    rows = [r for r in rows if r["method"] not in failed]   # a user's method is planned whole or not at all
    if device != "cpu":
        tf32 = sorted({r["rule"] for r in rows if r["precision"] == "tf32"})
        notes.append(f"float32 on {device}: IEEE float32 (rcm sets both TF32 switches off, rcm.precision."
                     "set_float32)" + (f", except TF32 in {', '.join(tf32)} (tf32: true or --precision tf32)"
                                       if tf32 else "; a stage's tf32: true, or --precision tf32, plans TF32"))
    return Plan(device, [str(f) for f in files], rows, notes)


def _without_downloads(cfg: dict, notes: list[str]) -> dict:
    """``cfg``, planned without files that are not there yet: a transformers classifier folder without
    its config.json (config/cifar10-dds.yaml before the download) is planned as transformers' default
    ViTConfig (ViT-B/16 at 224 px), with a note."""
    sec = cfg["classifier"]
    from rcm.importers import is_placeholder

    if sec.get("pretrained_format") == "hf" and not is_placeholder(sec.get("pretrained", "")) \
            and not (Path(sec["pretrained"]) / "config.json").is_file():
        import tempfile

        from transformers import ViTConfig

        from rcm import presets

        folder = Path(tempfile.mkdtemp(prefix="rcm-plan-"))
        ViTConfig(num_labels=presets.image_shape(cfg)[2]).to_json_file(str(folder / "config.json"))
        notes.append(f"classifier: {sec['pretrained']}/config.json is not there (not downloaded yet): planned as "
                     "transformers' default ViTConfig, a ViT-B/16 at 224 px")
        cfg = {**cfg, "classifier": {**sec, "pretrained": str(folder)}}
    return cfg


def _validate(cfg: dict, files) -> None:
    import yaml

    schema_file = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
    if not schema_file.is_file():
        return
    import jsonschema

    schema = yaml.safe_load(schema_file.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(map(str, e.path)))
    if errors:
        e = errors[0]
        where = ".".join(map(str, e.absolute_path)) or "(top level)"
        raise ConfigError(f"{' + '.join(map(str, files))} does not validate: {where}: {e.message}"
                          + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    from rcm import methods

    known = [*(m.name for m in methods.BUILTIN), *(cfg.get("custom_methods") or {})]
    problems = methods.batch_size_errors(cfg.get("certify", {}).get("batch_sizes", []), known)
    if problems:
        raise ConfigError(f"{' + '.join(map(str, files))} does not validate: {problems[0]}")


def _train_row(cfg, job, amp, float32, dev: Rates, cache) -> dict:
    section = job["section"]
    sec = cfg[section]
    key = ("train", section, job["sigma"] if section == "classifier" else None, amp)
    if key not in cache:
        stage = stage_setup(cfg, section, job["sigma"] if job["sigma"] is not None else 0.25)
        cache[key] = training_estimate(stage, per_device_batch(cfg, section), amp, sec.get("micro_batches", 1),
                                       "cpu" if dev.name == "cpu" else "cuda")
    est = cache[key]
    devices = processes(cfg, section)
    step_seconds = dev.seconds(est, float32)
    wall = sec["steps"] * step_seconds / 3600
    return dict(devices=devices, batch_per_device=per_device_batch(cfg, section), steps=sec["steps"],
                flops_per_step=est.flops * devices, flops=est.flops * devices * sec["steps"] * job["jobs"],
                peak_memory_gb=est.peak / 1e9, memory_parts_gb={k: v / 1e9 for k, v in est.parts.items()},
                seconds_per_step=step_seconds, wall_hours_per_job=wall,
                device_hours=wall * devices * job["jobs"], _estimate=est)


def _certify_row(cfg, job, amp, float32, dev: Rates, shape, cache) -> dict:
    c = cfg["certify"]
    method, batch = job["method"], certify_batch(cfg, job["method"])
    n0, n = c["n0"], c["n"]
    sigmas = job.get("stages") or [job["sigma"]]

    def cost(s, b):
        # per sigma: one model file for every sigma need not be one network (a denoiser's t*, a filter's width)
        key = ("certify", method, s, b, amp)
        if key not in cache:
            cache[key] = certify_estimate(certified_network(cfg, method, float(s)), shape, b, amp,
                                          "cpu" if dev.name == "cpu" else "cuda")
        return cache[key]

    per_image = flops_per_draw = 0.0
    peak = None
    for s in sigmas:
        full = cost(s, batch)
        seconds = 0.0
        for draws in (n0, n):
            k, rest = divmod(draws, batch)
            seconds += k * dev.seconds(full, float32) + (dev.seconds(cost(s, rest), float32) if rest else 0.0)
        per_image += seconds
        flops_per_draw += full.flops / batch
        peak = full if peak is None or full.peak > peak.peak else peak
    images = images_per_shard(cfg)
    draws = n0 + n
    row = dict(devices=1, batch=batch, n0=n0, n=n, images_per_job=images,
               flops_per_draw=flops_per_draw / len(sigmas), flops_per_image=flops_per_draw * draws,
               seconds_per_image=per_image, peak_memory_gb=peak.peak / 1e9,
               memory_parts_gb={k: v / 1e9 for k, v in peak.parts.items()}, _estimate=peak)
    cascade, sequential = "_cascade" in job["rule"], job["rule"].endswith("_sequential")   # built-in or custom
    if cascade:
        row["stages"] = len(sigmas)
    if cascade and not sequential:
        row["typical_seconds_per_image"] = per_image * TYPICAL_CASCADE_STAGE_FRACTION
        row["note"] = f"bound: all {len(sigmas)} stages per image; typical from the default run's measured 1.66 of 3"
    if sequential and not cascade:
        row["typical_seconds_per_image"] = per_image * TYPICAL_SEQUENTIAL_DRAW_FRACTION
        row["note"] = ("bound: n_max = certify.n draws per image; typical from the default run's measured 16% "
                       "of n_max (rcm bench-sequential)")
    if sequential and cascade:
        row["note"] = (f"bound: all {len(sigmas)} stages per image, n_max = certify.n draws each; no typical "
                       "figure measured")
    wall = per_image * images / 3600
    row.update(flops=row["flops_per_image"] * images * job["jobs"], wall_hours_per_job=wall,
               device_hours=wall * job["jobs"])
    return row


# ----------------------------------------------------------------------------------- output

COLUMNS = ("rule", "method", "sigma", "jobs", "precision", "flops", "peak_memory_gb", "memory_limit_gb",
           "seconds_per_image", "n0", "n", "wall_hours_per_job", "device_hours", "runtime_limit_minutes",
           "fits_runtime", "fits")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def render(plan: Plan, fmt: str) -> str:
    data = plan.as_json()
    if fmt == "json":
        return json.dumps(data, indent=1)
    rows = [[_fmt(r.get(c)) for c in COLUMNS] for r in plan.rows]
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        w.writerows(rows)
        return buf.getvalue()
    lines = [f"plan of {' + '.join(plan.config)} on {plan.device}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for stage, hours in data["stage_device_hours"].items():
        lines.append(f"- {stage}: {hours:.4g} device-hours")
    lines.append(f"- total: {data['total_device_hours']:.4g} device-hours")
    by_method = data["certification_device_hours"]
    if len(by_method) > 1 and min(by_method.values()) > 0:
        cheapest = min(by_method, key=by_method.get)
        lines.append("- certification (fixed n) per method: " + ", ".join(
            f"{m} {h:.4g} device-hours" + (f" ({h / by_method[cheapest]:.3g}x {cheapest})" if m != cheapest else "")
            for m, h in by_method.items()))
    for r in plan.rows:
        if "advice" in r:
            lines.append(f"- {oversize_line(r)}")
    lines += [f"- note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def oversize_line(r: dict, with_sigma: bool = True) -> str:
    """``rule (method, sigma): planned peak ... exceeds gpu_memory_gb ...; to fit: ...``"""
    what = [r["method"]] if r.get("method") else []
    what += [f"sigma {r['sigma']}"] if with_sigma and r.get("sigma") is not None else []
    where = r["rule"] + (f" ({', '.join(map(str, what))})" if what else "")
    return (f"{where}: planned peak {r['peak_memory_gb']:.3g} GB per device exceeds gpu_memory_gb "
            f"{r['memory_limit_gb']:.3g} GB; to fit: {r.get('advice', '')}")


def memory_errors(cfg_or_files, device: str = "a100-80gb") -> list[str]:
    """One line per stage whose planned peak exceeds ``gpu_memory_gb``: the workflow's config check
    (workflow/rules/common.smk, and DVC's prepare stage through ``rcm plan --check``). The peak does
    not depend on the device; ``device`` only names the plan's time columns."""
    from rcm import presets

    cfg = cfg_or_files if isinstance(cfg_or_files, dict) else presets.load_config(cfg_or_files)
    limits = gpu_limits(cfg)
    if not limits:
        return []
    plan = plan_config(cfg, ["(config)"], device)
    out, seen = [], set()
    for r in plan.rows:  # one line per stage: a rule, and a method for certification
        if r["section"] in limits and not r["fits_memory"] and (r["rule"], r["method"]) not in seen:
            seen.add((r["rule"], r["method"]))
            out.append(oversize_line(r, with_sigma=False))
    return out


def summary_line(plan: Plan) -> str:
    """The plan in one line: what the workflow prints first on a real run (RCM_PLAN=DEVICE snakemake)."""
    data = plan.as_json()
    jobs_total = sum(r["jobs"] for r in plan.rows)
    biggest = max(plan.rows, key=lambda r: r["peak_memory_gb"]) if plan.rows else None
    misfits = [r for r in plan.rows if not r["fits"]]
    stages = ", ".join(f"{k} {v:.3g}" for k, v in data["stage_device_hours"].items())
    return (f"rcm plan on {plan.device}: {jobs_total} device jobs, {data['total_device_hours']:.4g} device-hours "
            f"({stages}); largest peak {biggest['peak_memory_gb']:.3g} GB per device ({biggest['rule']}); "
            + (f"{len(misfits)} row(s) do not fit: " + ", ".join(sorted({r['rule'] for r in misfits}))
               if misfits else "every rule fits") if biggest else f"rcm plan on {plan.device}: no device jobs")


def workflow_summary(cfg: dict, files: list[str]) -> None:
    """Snakemake's onstart (a real run, not -n): with RCM_PLAN=DEVICE set, print the plan's summary line
    first. Imported only there, so parsing the DAG stays torch-free."""
    import os

    device = os.environ.get("RCM_PLAN")
    if device:
        print(summary_line(plan_config(cfg, files, device)), flush=True)


# ----------------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("--config", nargs="+", required=True, help="config file and overlays, merged in order")
    p.add_argument("--device", default="a100-80gb", help=f"one of {', '.join(DEVICES)}")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="what-if precision for every stage (default: what each stage's config says)")
    p.add_argument("--format", default="md", choices=("md", "csv", "json"))
    p.add_argument("--rule", default=None, help="only this rule")
    p.add_argument("--profile", default="profiles/slurm/config.yaml", help="SLURM profile (runtime limits)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 with one line per stage over gpu_memory_gb (the workflow's check)")


def main(args) -> None:
    device_info(args.device)
    if args.check:
        from rcm import presets

        cfg = presets.load_config(args.config)
        _validate(cfg, args.config)
        errors = memory_errors(cfg)
        if errors:
            raise ConfigError("a stage does not fit gpu_memory_gb:\n  " + "\n  ".join(errors))
        print("rcm plan: every stage fits gpu_memory_gb" if gpu_limits(cfg) else "rcm plan: gpu_memory_gb not set")
        return
    plan = make_plan(args.config, args.device, args.precision, args.profile, only=args.rule)
    sys.stdout.write(render(plan, args.format))


def calibrate_fraction(files: list[str], device: str, precision: str, method: str, seconds: float) -> float:
    """The achieved fraction of ``device``'s ``precision`` peak at which the plan of ``files`` gives
    ``seconds`` per certified image for ``method`` (its first sigma): how a published figure becomes a
    device's one fraction (rcm.plan_devices, docs/plan.md)."""
    from rcm import presets

    cfg = _without_downloads(presets.load_config(files), [])
    c, size, _ = presets.image_shape(cfg)
    info = device_info(device)
    job = next(j for j in jobs(cfg) if j["rule"] == "certify" and j["method"] == method)
    float32, amp = stage_precision(cfg, "certify", precision)
    cache: dict = {}
    lo, hi = 1e-4, 1.0
    for _ in range(50):
        mid = (lo * hi) ** 0.5
        peak = info["peak_tflops"][precision] * 1e12 * mid
        dev = Rates(device, info["memory_gb"], {"fp32": peak, "tf32": peak, "half": peak}, {},
                    info["bandwidth_gbs"] * 1e9, info["launch_us"] * 1e-6)
        got = _certify_row(cfg, job, amp, float32, dev, (c, size, size), cache)["seconds_per_image"]
        lo, hi = (mid, hi) if got > seconds else (lo, mid)
    return hi


def measured_peak(fn, *modules: nn.Module) -> int:
    """Peak bytes of one real run of ``fn()``: the parameter and buffer storages of ``modules`` (there
    before it starts) plus the peak of the tensor storages allocated while it runs, counted by the same
    Trace the plan uses (a TorchDispatchMode over real tensors): the yardstick of tests/test_plan.py."""
    static = state_bytes(*modules)
    trace = Trace()
    with trace:
        fn()
    return static + trace.peak
