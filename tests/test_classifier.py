"""Classifier: shapes at every resolution, checkpoint round trip, training, and the train-classifier stage."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from rcm import cli, paths
from rcm.checkpoint import save_checkpoint
from rcm.data import prepare
from rcm.errors import CheckpointError
from rcm.models import load_model
from rcm.models.classifier import Classifier
from rcm.train.classifier import augment, warmup_cosine


@pytest.mark.parametrize("channels, size, classes", [(1, 8, 10), (3, 32, 10), (3, 224, 1000)])
def test_logits_shape_at_every_resolution(channels, size, classes):
    torch.manual_seed(0)
    model = Classifier(in_channels=channels, num_classes=classes, image_size=size, width=8, blocks=1,
                       stages=3 if size > 8 else 2).eval()
    x = torch.rand(2, channels, size, size) + 0.5 * torch.randn(2, channels, size, size)  # noisy: outside [0, 1]
    assert model(x).shape == (2, classes)


def test_strided_stem_only_for_large_inputs():
    small = Classifier(in_channels=3, image_size=32, width=8)
    large = Classifier(in_channels=3, image_size=224, width=8)
    assert isinstance(small.stem, torch.nn.Conv2d) and small.stem.stride == (1, 1)
    assert large.stem[0].stride == (2, 2)


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    a = Classifier(mean=[0.0], std=[1.0]).eval()
    b = Classifier(mean=[0.5], std=[2.0]).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(b(x), a((x - 0.5) / 2.0))


def _trained_tiny(seed=0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(width=8, mean=[0.3], std=[0.4])
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))  # one train-mode pass: BatchNorm running stats are not the defaults
    return model.eval()


def test_save_load_gives_identical_logits(tmp_path):
    model = _trained_tiny()
    path = tmp_path / "clf.pt"
    save_checkpoint(path, kind="classifier", model_config=model.config, model_state=model.state_dict(), step=5)
    loaded, payload = load_model(path)
    assert payload["step"] == 5 and loaded.config == model.config
    x = torch.rand(8, 1, 8, 8) - 0.2
    assert torch.equal(loaded(x), model(x))


def test_other_architecture_or_truncated_file_names_the_file(tmp_path):
    small = Classifier(width=8)
    path = tmp_path / "other.pt"
    config = {**small.config, "width": 16}  # config says width 16, weights are width 8
    save_checkpoint(path, kind="classifier", model_config=config, model_state=small.state_dict(), step=0)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(path)
    good = tmp_path / "good.pt"
    save_checkpoint(good, kind="classifier", model_config=small.config, model_state=small.state_dict(), step=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="good.pt"):
        load_model(good, kind="denoiser")


def test_a_few_steps_lower_cross_entropy():
    torch.manual_seed(0)
    model = Classifier(width=8)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = F.cross_entropy(model(x), y)
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.8 * first.item()


def test_augment_translates_and_flips():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), 0, False), x)
    g = torch.Generator().manual_seed(1)
    shifted = augment(x, g, 2, False)
    assert shifted.shape == x.shape
    for b in range(2):  # every output is a zero-padded translation of its own input
        pad = F.pad(x[b], (2, 2, 2, 2))
        assert any(torch.equal(shifted[b], pad[:, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))
    flipped = augment(x, torch.Generator().manual_seed(2), 0, True)
    assert all(torch.equal(flipped[b], x[b]) or torch.equal(flipped[b], x[b].flip(-1)) for b in range(2))


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    prepare("digits", root)
    return root


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_cli_train_classifier(digits, sigma):
    argv = ["train-classifier", "--dataset", "digits", "--results", str(digits), "--sigma", str(sigma),
            "--steps", "4", "--batch_size", "16", "--eval_every", "2", "--checkpoint_every", "2",
            "--eval_sigmas", "0.25", "1.0", "--crop_padding", "1"]
    assert cli.main(argv) == 0
    out = paths.classifier(digits, "digits", sigma)
    model, payload = load_model(out, kind="classifier")
    assert payload["step"] == 4 and payload["config"]["sigma"] == sigma
    assert payload["config"]["eval_sigmas"] == [0.25, 1.0] and payload["config"]["crop_padding"] == 1
    assert model.config["image_size"] == 8 and model.config["num_classes"] == 10
    assert not out.with_name(out.name + ".resume").exists()
    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"clean_acc", "acc_sigma_0.25", "acc_sigma_1.0"} <= rows[-1].keys()


def test_cli_rejects_negative_sigma(digits, capsys):
    assert cli.main(["train-classifier", "--dataset", "digits", "--results", str(digits),
                     "--sigma", "-0.1", "--steps", "1"]) == 2
    assert "sigma" in capsys.readouterr().err


def test_cohen_architecture_trains_and_resumes_as_its_own_kind(tmp_path):
    """--arch cifar_resnet20: Cohen et al.'s network (their normalisation) trained by the same stage;
    the checkpoint rebuilds it, and is accepted wherever a classifier is."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "cifar", n_train=8, n_test=4)
    prepare("cifar10", tmp_path / "results", root=str(tmp_path / "cifar"), verify_checksums=False)
    argv = ["train-classifier", "--dataset", "cifar10", "--results", str(tmp_path / "results"), "--sigma", "0.25",
            "--arch", "cifar_resnet20", "--steps", "2", "--batch_size", "4", "--eval_every", "2",
            "--checkpoint_every", "1", "--eval_sigmas", "0.25"]
    assert cli.main(argv) == 0
    model, payload = load_model(paths.classifier(tmp_path / "results", "cifar10", 0.25), kind="classifier")
    assert payload["kind"] == "cohen_resnet" and model.config["arch"] == "cifar_resnet20"
    assert model.config["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])


def test_cohen_architecture_refuses_data_it_cannot_read(digits, capsys):
    assert cli.main(["train-classifier", "--dataset", "digits", "--results", str(digits), "--sigma", "0.0",
                     "--arch", "cifar_resnet110", "--steps", "1"]) == 2
    assert "--arch cifar_resnet110 takes 3-channel 32 x 32 images; the data has 1 channels at 8 x 8" in \
        capsys.readouterr().err
