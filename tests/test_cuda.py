"""CUDA paths (marker ``cuda``; skipped without a GPU; `make gpu-check` runs them on one): certification on
a GPU, amp training steps with a GradScaler, SyncBatchNorm in a one-process NCCL group, the GPU claim."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class ConstantClass(nn.Module):
    """Class 3 whatever the input, through a real matmul (so the network runs on the device)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.arange(10) == 3)

    def forward(self, x):
        return self.lin(x.flatten(1))


class Guesser(nn.Module):
    """An answer that depends on the noisy input, so the noise stream shows in the rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.lin.weight.copy_(torch.randn(10, 64, generator=g))
            self.lin.bias.copy_(torch.randn(10, generator=g))

    def forward(self, x):
        return self.lin(x.flatten(1))


def _certify(monkeypatch, results, net, device, **options):
    import copy

    import rcm.certify as certify_mod
    from rcm.certificate import read_certificate

    monkeypatch.setattr(certify_mod, "base_classifier",
                        lambda method, sigma, results, dataset, device, **k: copy.deepcopy(net).to(device))
    o = certify_mod.CertifyOptions(**{"n0": 20, "n": 200, "batch_size": 64, "skip": 60, "device": device, **options})
    shards = []
    for k in range(o.shards):
        shards.append(read_certificate(certify_mod.certify_shard(dataset="digits", results=str(results), method="gaussian",
                                                                 sigma="0.5", shard=k, o=o, progress=False)))
    import pandas as pd

    return pd.concat(shards).sort_values("idx").reset_index(drop=True)


def test_certification_on_cuda_records_the_gpu_and_agrees_with_the_cpu_where_noise_cannot_matter(
        digits_results, monkeypatch, tmp_path):
    import shutil

    other = tmp_path / "cpu"
    shutil.copytree(digits_results / "digits", other / "digits")
    gpu = _certify(monkeypatch, digits_results, ConstantClass(), "cuda")
    cpu = _certify(monkeypatch, other, ConstantClass(), "cpu")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    assert set(gpu.device_type) == {"cuda"} and set(gpu.device_name) == {torch.cuda.get_device_name(index)}
    assert set(gpu.capability) == {float(f"{major}.{minor}")} and set(gpu.tf32_matmul) == set(gpu.tf32_cudnn) == {0}
    columns = ["idx", "label", "predict", "radius", "correct", "count_a", "p_a_lower"]
    assert gpu[columns].equals(cpu[columns])              # every draw says class 3, on either device


def test_cuda_rows_do_not_depend_on_the_sharding_and_tf32_is_recorded(digits_results, monkeypatch, tmp_path):
    import shutil

    other = tmp_path / "two"
    shutil.copytree(digits_results / "digits", other / "digits")
    one = _certify(monkeypatch, digits_results, Guesser(), "cuda")
    two = _certify(monkeypatch, other, Guesser(), "cuda", shards=2)
    assert one.drop(columns=["time"]).equals(two.drop(columns=["time"]))
    shutil.copytree(digits_results / "digits", tmp_path / "tf32" / "digits")
    from rcm.precision import set_float32

    try:
        tf32 = _certify(monkeypatch, tmp_path / "tf32", Guesser(), "cuda", tf32=True)
    finally:
        set_float32(torch.device("cuda"), False)
    assert set(tf32.tf32_matmul) == set(tf32.tf32_cudnn) == {1}


def test_compiled_certification_on_cuda_compiles_once(digits_results, monkeypatch):
    import functools

    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    rows = _certify(monkeypatch, digits_results, Guesser(), "cuda", n0=7, n=51, batch_size=25, compile=True)
    assert counter.frame_count == 1 and len(rows) == 6
    torch._dynamo.reset()


def test_native_bf16_follows_the_compute_capability():
    from rcm.precision import native_support

    device = torch.device("cuda", torch.cuda.current_device())
    assert native_support("bf16", device) == (torch.cuda.get_device_capability(device) >= (8, 0))


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_steps_on_cuda(tmp_path, amp):
    from rcm.checkpoint import load_checkpoint
    from rcm.train.loop import Run, train

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(32, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    seen = []

    def loss_fn(step, g):
        logits = model(x + 0.1 * torch.randn(x.shape, generator=g).to(device))
        seen.append(logits.dtype)
        return F.cross_entropy(logits, y), {}

    run = Run(out=tmp_path / "m.pt", kind="classifier", model=model, model_config={}, config={},
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn, steps=20, seed=0, amp=amp)
    train(run)
    assert set(seen) == {torch.float16 if amp == "fp16" else torch.bfloat16}
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    payload = load_checkpoint(tmp_path / "m.pt", kind="classifier")
    assert payload["amp"] == amp and (payload["scaler"] is not None) == (amp == "fp16")
    assert 0 <= payload["skipped_steps"] < 20          # fp16: a few overflowing steps while the scale settles


def test_sync_batchnorm_in_a_one_process_group_equals_batchnorm(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda().train()
        import copy

        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        assert isinstance(synced[1], nn.SyncBatchNorm)
        x = torch.randn(6, 3, 8, 8, device="cuda")
        a, b = plain(x), synced(x)
        a.square().mean().backward()
        b.square().mean().backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(plain[1].running_var, synced[1].running_var)
        torch.testing.assert_close(plain[0].weight.grad, synced[0].weight.grad)
    finally:
        dist.destroy_process_group()


def test_the_gpu_claim_gives_this_process_a_cuda_device_it_is_current_on(tmp_path, monkeypatch):
    from rcm.distributed import local_device

    monkeypatch.setenv("RCM_GPU_LOCKS", str(tmp_path))
    device = local_device(torch.device("cuda"))
    assert device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device()
    assert torch.cuda.current_device() == index
    assert torch.zeros(1, device="cuda").device.index == index


def test_an_interrupted_cuda_shard_resumes_to_the_uninterrupted_certificate(digits_results, monkeypatch, tmp_path,
                                                                             capsys):
    """Bit-for-bit resume on one GPU: the rows certified before an interruption, then the rest, equal an
    uninterrupted run's (time aside)."""
    import shutil

    from rcm import paths
    from rcm.partial import partial_path

    calls = {"n": 0}

    class Dies(Guesser):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 9:
                raise KeyboardInterrupt
            return super().forward(x)

    other = tmp_path / "uninterrupted"
    shutil.copytree(digits_results / "digits", other / "digits")
    with pytest.raises(KeyboardInterrupt):
        _certify(monkeypatch, digits_results, Dies(), "cuda")
    out = paths.certificate(digits_results, "digits", "gaussian", 0.5, 0, 1)
    assert not out.exists() and len(partial_path(out).read_text().splitlines()) >= 2
    calls["n"] = -10 ** 9
    capsys.readouterr()
    resumed = _certify(monkeypatch, digits_results, Guesser(), "cuda")
    assert "resuming after 1 certified images" in capsys.readouterr().err
    fresh = _certify(monkeypatch, other, Guesser(), "cuda")
    assert resumed.drop(columns=["time"]).equals(fresh.drop(columns=["time"]))
