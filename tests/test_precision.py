"""Mixed precision in certification: autocast wraps the base classifier only, the noise stays float32,
and the certificate is the one of the function that actually ran (docs/methods.md, "Mixed precision")."""

from __future__ import annotations

import os
import pytest
import torch
from torch import nn

import rcm.certify as certify_mod
from rcm.certificate import read_certificate
from rcm.certify import CertifyOptions, certify_shard
from rcm.precision import Autocast, FixedBatch, native_support, wrap
from rcm.smoothing import Smooth


class SmallConvNet(nn.Module):
    def __init__(self, seed: int = 0, channels: int = 1, classes: int = 10):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)
        self.conv_dtypes: list[torch.dtype] = []

    def forward(self, x):
        h = self.conv(x)
        self.conv_dtypes.append(h.dtype)
        return self.head(h.relu().mean((2, 3)))


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_network_in_its_dtype_and_returns_float32_logits(amp, dtype):
    net = SmallConvNet()
    x = torch.rand(5, 1, 8, 8)
    logits = Autocast(net, amp)(x)
    assert net.conv_dtypes == [dtype] and logits.dtype == torch.float32
    assert torch.allclose(logits, net(x), atol=0.05)          # close to float32, not equal
    assert wrap(net, "off") is net                             # 'off' changes nothing


def test_channels_last_changes_the_layout_not_the_function():
    net = SmallConvNet()
    x = torch.rand(7, 1, 8, 8)
    expected = net(x)
    wrapped = wrap(net, "off", channels_last=True)
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(wrapped(x), expected, atol=1e-5)


def test_the_smoothed_classifier_is_that_of_the_function_that_ran():
    """Smooth's counts under amp are exactly the counts of the autocast network on x + sigma * eps, with
    eps drawn in float32 from the same generator: what is certified is that function's smoothing."""
    net = SmallConvNet(seed=1)
    f_prime = wrap(net, "bf16")
    x, sigma = torch.rand(1, 8, 8), 0.5
    counts = Smooth(f_prime, 10, sigma).sample_counts(x, 300, 128, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    expected = torch.zeros(10, dtype=torch.long)
    for b in (128, 128, 44):
        eps = torch.randn((b, *x.shape), generator=g, dtype=torch.float32)
        with torch.inference_mode():
            expected += torch.bincount(f_prime(x + sigma * eps).argmax(1), minlength=10)
    assert counts.tolist() == expected.tolist()
    assert set(net.conv_dtypes) == {torch.bfloat16}


class DetectsQuantisedInput(nn.Module):
    """Class 1 when any input value is not a bfloat16 number (almost surely so for x + Gaussian noise drawn
    in float32), class 0 when the input was rounded to bfloat16. The test is elementwise float32 work,
    which autocast leaves in float32, so this network means the same thing under amp."""

    def forward(self, x):
        off_grid = (x.float() - x.float().bfloat16().float()).abs().flatten(1).amax(1) > 0
        return torch.stack([(~off_grid).float(), off_grid.float()], dim=1) * 10


class NoiseInBf16(Smooth):
    """An unsound variant: noise drawn and added in bfloat16 (say, the whole sampling run under a
    half-precision policy). Its draws are not N(x, sigma^2 I): they lie on bf16's grid."""

    @torch.inference_mode()
    def sample_counts(self, x, num, batch_size, generator=None):
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            noise = torch.randn((b, *x.shape), generator=generator).bfloat16()
            batch = noise * self.sigma + x.bfloat16()
            counts += torch.bincount(self.base_classifier(batch).argmax(1), minlength=self.num_classes)
        return counts.numpy()


def test_noise_must_stay_float32_an_unsound_variant_certifies_the_wrong_class():
    """g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is class 1 here with probability 1 - 0
    (a float32 Gaussian draw is off bf16's grid almost surely). rcm under amp=bf16 certifies class 1;
    the variant that draws noise in bf16 certifies class 0 with a large radius: a wrong certificate."""
    f_prime = wrap(DetectsQuantisedInput(), "bf16")
    x = torch.rand(1, 8, 8)
    sound = Smooth(f_prime, 2, 0.25).certify(x, 20, 500, 0.001, 100, torch.Generator().manual_seed(0))
    unsound = NoiseInBf16(f_prime, 2, 0.25).certify(x, 20, 500, 0.001, 100, torch.Generator().manual_seed(0))
    assert sound[0] == 1 and sound[1] > 0.5
    assert unsound[0] == 0 and unsound[1] > 0.5              # certifies the class g does not predict


def test_certificates_record_amp_and_each_methods_batch_size(digits_results, monkeypatch):
    nets = {}

    def stub(method, sigma, results, dataset, device, **kwargs):
        nets[method] = SmallConvNet(seed=int(sigma * 100))
        return nets[method]

    monkeypatch.setattr(certify_mod, "base_classifier", stub)
    o = CertifyOptions(n0=10, n=40, batch_size=25, batch_sizes=["dds=7"], skip=90, amp="bf16",
                       channels_last=True)
    common = dict(dataset="digits", results=str(digits_results), sigma="0.5", shard=0, o=o, progress=False)
    dds = read_certificate(certify_shard(method="dds", **common))
    rrcm = read_certificate(certify_shard(method="rrcm", **common))
    assert set(dds.amp) == {"bf16"} and set(dds.batch_size) == {7} and set(rrcm.batch_size) == {25}
    counted, *certified = nets["dds"].conv_dtypes           # one float32 pass counts the FLOPs
    assert counted == torch.float32 and set(certified) == {torch.bfloat16}
    assert len(dds) == 4 and (dds.flops > 0).all()          # FLOPs counted on the network, not the wrapper
    # the same images in float32: the function changes (its rounding), the protocol columns do not
    o32 = CertifyOptions(n0=10, n=40, batch_size=25, skip=90, max_images=0)
    gauss = read_certificate(certify_shard(method="gaussian", **{**common, "o": o32}))
    assert set(gauss.amp) == {"off"} and set(nets["gaussian"].conv_dtypes) == {torch.float32}
    # the report's cost table says which precision each entry's base classifier ran in
    from rcm.cli import main as cli
    from rcm import paths

    out = digits_results / "report"
    files = [paths.certificate(digits_results, "digits", m, "0.5", 0, 1) for m in ("dds", "gaussian")]
    assert cli(["report", *map(str, files), "--out", str(out)]) == 0
    assert "| dds_sigma_0.5 | bf16 |" in (out / "cost.md").read_text()
    assert "| gaussian_sigma_0.5 | off |" in (out / "cost.md").read_text()


def test_native_support_is_reported_per_device():
    assert native_support("off", torch.device("cpu"))
    assert isinstance(native_support("bf16", torch.device("cpu")), bool)


def test_training_applies_its_float32_and_determinism_options(digits_results, monkeypatch):
    """`tf32` and `deterministic` of a training stage reach torch before the first step: float32 is
    strict IEEE float32 on CUDA unless tf32 (both switches, whatever torch's defaults), and
    deterministic turns on torch's deterministic algorithms with cuBLAS's fixed workspace."""
    from rcm import cli
    from rcm.train import loop

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}
    steps = loop._steps

    def spy(*args, **kwargs):
        seen.update(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32,
                    deterministic=torch.are_deterministic_algorithms_enabled(),
                    workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return steps(*args, **kwargs)

    monkeypatch.setattr(loop, "_steps", spy)
    small = ["--results", str(digits_results), "--sigma", "0.5", "--steps", "1", "--eval_every", "1",
             "--batch_size", "16", "--eval_sigmas", "0.5"]
    try:
        assert cli.main(["train-classifier", *small, "--tf32", "--deterministic"]) == 0
        assert seen == dict(matmul=True, cudnn=True, deterministic=True, workspace=":4096:8")
        assert cli.main(["train-classifier", *small]) == 0
        assert seen == dict(matmul=False, cudnn=False, deterministic=False, workspace=":4096:8")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.allow_tf32 = True   # torch's defaults, for the tests that follow
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_native_from_compute_capability_8_0_of_the_device_used(monkeypatch, capability, native):
    """torch.cuda.is_bf16_supported() counts emulation by default (a V100 or T4 says yes); native_support
    asks the compute capability of the device certification or training actually runs on."""
    asked = []

    def capability_of(index):
        asked.append(index)
        return capability if index == 1 else (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation counts there
    assert native_support("bf16", torch.device("cuda", 1)) is native
    assert native_support("bf16", torch.device("cuda")) is native               # 'cuda': the current device
    assert asked == [1, 1]
    assert native_support("bf16", torch.device("cuda", 0))                       # another device, another answer
    assert native_support("fp16", torch.device("cuda", 1)) and native_support("off", torch.device("cuda", 1))


def test_fixed_batch_pads_short_batches_and_returns_only_the_real_rows():
    seen = []

    class Rows(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.flatten(1)[:, :3] * 2

    model = FixedBatch(Rows(), 8)
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(model(x), x.flatten(1)[:, :3] * 2) and seen == [8]
    assert model(torch.rand(8, 1, 4, 4)).shape == (8, 3) and seen == [8, 8]
    with pytest.raises(ValueError, match="a batch of 9 rows"):
        model(torch.rand(9, 1, 4, 4))
