"""`rcm bench certify --config`: a preset's base classifiers at full size with random weights, and FLOPs
counted on the meta device (equal to a real forward pass's count)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rcm import presets
from rcm.cli import main as cli
from rcm.errors import ConfigError
from rcm.flops import count_flops, flops_per_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["gaussian", "dds", "mdds", "rrcm"])
def test_meta_device_count_equals_a_real_forward_pass(method):
    cfg = presets.load_config([REPO / "config/config.yaml"])
    model, _ = presets.base_classifier(cfg, method, 0.5)
    c, size, _ = presets.image_shape(cfg)
    assert count_flops(model, (c, size, size)) == flops_per_sample(model, torch.rand(c, size, size))


def test_cifar10_presets_build_the_papers_networks(tmp_path):
    """Parameter counts are facts about the published networks: Cohen et al.'s ResNet-110 has 1.73M,
    improved-diffusion's cifar10_uncond_50M_500K 52.5M, ViT-B/16 with a 10-class head 85.8M."""
    cfg = presets.load_config([REPO / "config/cifar10.yaml", REPO / "config/cifar10-cohen.yaml"])
    resnet, text = presets.base_classifier(cfg, "gaussian", 0.25)
    assert "cifar_resnet110" in text and presets.parameters(resnet) == pytest.approx(1.73e6, rel=0.005)

    from transformers import ViTConfig

    ViTConfig(num_labels=10, image_size=224, patch_size=16).save_pretrained(tmp_path / "vit")
    overlay = tmp_path / "here.yaml"
    overlay.write_text(f"classifier:\n  pretrained: {tmp_path / 'vit'}\n")
    cfg = presets.load_config([REPO / "config/cifar10.yaml", REPO / "config/cifar10-dds.yaml", overlay])
    dds, text = presets.base_classifier(cfg, "dds", 0.25)
    assert "improved-diffusion" in text and "transformers vit at 224 px" in text
    assert presets.parameters(dds.denoiser) == pytest.approx(52.5e6, rel=0.005)
    assert presets.parameters(dds.classifier) == pytest.approx(85.8e6, rel=0.005)


def test_bench_flops_only_prints_the_preset_figures(capsys):
    assert cli(["bench", "certify", "--config", str(REPO / "config/cifar10.yaml"), "--method", "rrcm",
                "--sigma", "0.5", "--flops_only"]) == 0
    out = capsys.readouterr().out
    assert "rRCM ViT dim 768, depth 12, patch 4 (64 tokens)" in out and "3 x 32 x 32" in out
    flops = float(re.search(r"FLOPs per sample\s*: ([0-9.e+]+)", out).group(1))
    # ViT-B over 66 tokens: 12 blocks x (24 d^2 + 4 T d) x T multiply-adds, about 11 GFLOPs
    d, t = 768, 66
    assert flops == pytest.approx(2 * 12 * (12 * d * d * t + 2 * t * t * d), rel=0.05)


def test_bench_measures_a_users_method_by_its_preset(capsys, monkeypatch):
    """`rcm bench certify --config … --method median`: the config's own method is registered from its
    custom_methods entry and built by its preset (the median filter in front of the CIFAR-10 preset's
    classifier); the filter adds no FLOPs the counter knows, so the count is the classifier's."""
    from rcm import methods

    monkeypatch.chdir(REPO)               # the example's module imports from the working directory
    files = [str(REPO / "config/cifar10.yaml"), str(REPO / "examples/custom_method/config.yaml")]
    assert cli(["bench", "certify", "--config", *files, "--method", "median", "--sigma", "0.5", "--flops_only"]) == 0
    out = capsys.readouterr().out
    assert "5x5 median filter + " in out
    median = float(re.search(r"FLOPs per sample\s*: ([0-9.e+]+)", out).group(1))
    methods.unregister("median")
    assert cli(["bench", "certify", "--config", files[0], "--method", "gaussian", "--sigma", "0.5", "--flops_only"]) == 0
    clean = float(re.search(r"FLOPs per sample\s*: ([0-9.e+]+)", capsys.readouterr().out).group(1))
    assert median == pytest.approx(clean, rel=1e-6)


def test_bad_preset_inputs_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="config file not found"):
        presets.load_config([tmp_path / "nope.yaml"])
    (tmp_path / "overlay.yaml").write_text("methods: [dds]\n")
    with pytest.raises(ConfigError, match="no 'dataset' section"):
        presets.load_config([tmp_path / "overlay.yaml"])
    cfg = presets.load_config([REPO / "config/cifar10.yaml", REPO / "config/cifar10-dds.yaml"])
    with pytest.raises(ConfigError, match="config.json, which is not there"):
        presets.base_classifier(cfg, "dds", 0.25)
    assert cli(["bench", "certify", "--config", str(REPO / "config/cifar10.yaml"), "--flops_only"]) == 2
    assert "--config needs --method" in capsys.readouterr().err


def test_a_yaml_tag_that_would_build_a_python_object_is_refused(tmp_path):
    """Config files are read as plain YAML (yaml.safe_load): a python/object tag is an error, not a call."""
    import yaml

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"dataset: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=f"{evil}: not plain YAML: could not determine a constructor"):
        presets.load_config([evil])
    assert not marker.exists()
    yaml.unsafe_load(evil.read_text())  # the control: the tag is live
    assert marker.exists()
