"""Multi-scale denoiser fine-tuning (Jeong & Shin 2023): the two calibration losses and the stage."""

from __future__ import annotations

import json

import pytest
import torch

from rcm import cli, paths
from rcm.checkpoint import save_checkpoint
from rcm.data import prepare
from rcm.errors import CheckpointError, ConfigError
from rcm.models import load_model
from rcm.models.classifier import Classifier
from rcm.models.denoiser import Denoiser
from rcm.train.mdds import MultiScaleLoss, anti_consistency_loss, brier_loss


def test_loss_values_on_hand_computed_cases():
    probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])     # (B=1, M=2, K=3)
    # ||(1,0,0) - e_0||^2 = 0, ||(0,1,0) - e_0||^2 = 2 -> mean 1
    torch.testing.assert_close(brier_loss(probs, torch.tensor([0])), torch.tensor([1.0]))
    # mean = (0.5, 0.5, 0) -> squared norm 0.5; full agreement -> 1
    torch.testing.assert_close(anti_consistency_loss(probs), torch.tensor([0.5]))
    agree = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    torch.testing.assert_close(anti_consistency_loss(agree), torch.tensor([1.0]))


def _descend(loss_of_probs, logits: torch.Tensor, steps: int = 100, lr: float = 5.0) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=lr)
    for _ in range(steps):
        loss = loss_of_probs(logits.softmax(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach().softmax(-1)


def test_brier_pulls_every_copy_toward_the_label():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 3, 5), generator=g)                    # (B, M, K)
    labels = torch.tensor([0, 1, 2, 3])
    before = logits.softmax(-1)[torch.arange(4), :, labels]         # (B, M): p(y) of every copy
    after = _descend(lambda p: brier_loss(p, labels), logits)[torch.arange(4), :, labels]
    assert (after > before).all() and after.min() > 0.6


def test_anti_consistency_lowers_the_agreement_of_copies():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 6, 5), generator=g)
    logits[..., 2] += 3.0                                            # every copy votes class 2
    before = logits.softmax(-1)
    after = _descend(anti_consistency_loss, logits)
    votes = lambda p: (p.argmax(-1) == 2).float().mean()            # noqa: E731
    assert anti_consistency_loss(after).max() < anti_consistency_loss(before).min()
    assert after.mean(1)[..., 2].max() < 0.5 < before.mean(1)[..., 2].min()
    assert votes(after) < votes(before)


def _tiny_pair(classifier: str = "resnet"):
    torch.manual_seed(0)
    den = Denoiser(block_out_channels=[8, 16], norm_num_groups=4)
    if classifier == "resnet":
        return den, Classifier(width=8).eval()
    # a linear classifier with large weights: its votes follow the denoised pixels closely, so a few
    # steps on the denoiser move the loss well beyond noise
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        clf[1].weight.mul_(10.0)
    return den, clf


def test_objective_splits_images_by_recoverability_and_a_few_steps_lower_it():
    den, clf = _tiny_pair("linear")
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        pred = clf(x).argmax(1)
    y = torch.where(torch.arange(8) < 4, pred, (pred + 1) % 10)     # first half recoverable, the rest not
    objective = MultiScaleLoss(den, clf, copies=3, ac_weight=2.0, denoise_weight=0.0)
    loss, logs = objective(x, y, 0.5, torch.Generator().manual_seed(0))
    assert logs["recoverable"] == 0.5 and "ddpm" not in logs
    torch.testing.assert_close(loss, torch.tensor(logs["brier"] + 2.0 * logs["ac"]))
    clf_before = {k: v.clone() for k, v in clf.state_dict().items()}
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    for step in range(10):
        loss, _ = objective(x, y, 0.5, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    first = MultiScaleLoss(*_tiny_pair("linear"), copies=3, ac_weight=2.0, denoise_weight=0.0)(
        x, y, 0.5, torch.Generator().manual_seed(0))[0]
    after = objective(x, y, 0.5, torch.Generator().manual_seed(0))[0]
    assert after.item() < 0.7 * first.item()
    assert all(torch.equal(v, clf_before[k]) for k, v in clf.state_dict().items())  # classifier frozen
    assert all(not p.requires_grad for p in clf.parameters())


def test_denoise_weight_adds_the_ddpm_loss():
    den, clf = _tiny_pair()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    loss, logs = MultiScaleLoss(den, clf, copies=2, denoise_weight=0.5)(x, y, 0.25, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, torch.tensor(logs["brier"] + logs["ac"] + 0.5 * logs["ddpm"]))


def test_copies_below_two_is_an_error():
    with pytest.raises(ConfigError, match="copies"):
        MultiScaleLoss(*_tiny_pair(), copies=1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Prepared digits with a tiny clean classifier and base denoiser, written as the stages would."""
    root = tmp_path_factory.mktemp("results")
    prepare("digits", root)
    den, clf = _tiny_pair()
    save_checkpoint(paths.classifier(root, "digits", 0.0), kind="classifier", model_config=clf.config,
                    model_state=clf.state_dict(), step=1)
    save_checkpoint(paths.denoiser(root, "digits"), kind="denoiser", model_config=den.config,
                    model_state=den.state_dict(), step=7, ema=den.state_dict())
    return root


def test_cli_finetune_denoiser(digits):
    argv = ["finetune-denoiser", "--dataset", "digits", "--results", str(digits), "--steps", "3",
            "--batch_size", "4", "--copies", "2", "--sigmas", "0.25", "0.5", "--ac_weight", "0.5",
            "--eval_every", "2", "--checkpoint_every", "2"]
    assert cli.main(argv) == 0
    out = paths.denoiser(digits, "digits", finetuned=True)
    model, payload = load_model(out, kind="denoiser")
    assert payload["step"] == 3 and model.config["block_out_channels"] == [8, 16]
    cfg = payload["config"]
    assert (cfg["ac_weight"], cfg["denoise_weight"], cfg["copies"], cfg["sigmas"]) == (0.5, 1.0, 2, [0.25, 0.5])
    assert cfg["base_denoiser_step"] == 7
    base, _ = load_model(paths.denoiser(digits, "digits"))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert {"clean_acc", "acc_sigma_0.25", "acc_sigma_0.5", "brier", "ac", "ddpm"} <= rows[-1].keys()


def test_cli_finetune_without_a_denoiser_names_the_missing_file(tmp_path, capsys):
    prepare("digits", tmp_path)
    assert cli.main(["finetune-denoiser", "--dataset", "digits", "--results", str(tmp_path), "--steps", "1"]) == 2
    assert "denoiser.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_model(paths.denoiser(tmp_path, "digits"))


def test_wrong_class_anti_consistency_ignores_the_true_class():
    agree_true = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])   # both copies certain of class 1 = y
    agree_wrong = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # both certain of class 0 != y
    split = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])        # mean (1/2, 0, 1/2)
    y = torch.tensor([1])
    assert anti_consistency_loss(agree_true, y).item() == 0.0          # agreeing on y is not penalised
    assert anti_consistency_loss(agree_true).item() == 1.0             # ... by the wrong-class form only
    assert anti_consistency_loss(agree_wrong, y).item() == 1.0
    torch.testing.assert_close(anti_consistency_loss(split, y), torch.tensor([0.5]))
    with pytest.raises(ConfigError, match="ac_target"):
        MultiScaleLoss(*_tiny_pair(), ac_target="other")
