"""rRCM stages: losses go down on a tiny batch, and both CLI stages run end to end on digits."""

import json

import pytest
import torch

from rcm import cli, paths
from rcm.checkpoint import save_checkpoint
from rcm.data import Split, load_split, prepare
from rcm.models import load_model
from rcm.models.vit import RRCMNet, SigmaConditioned
from rcm.train import rrcm_finetune, rrcm_pretrain
from rcm.train.loop import metrics_path
from test_loop import interrupt_at

TINY_NET = ["--patch_size", "4", "--dim", "16", "--depth", "1", "--heads", "2",
            "--proj_hidden", "32", "--proj_dim", "16"]


def tiny_split(n=32, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = (torch.rand(n, 1, 8, 8, generator=g) * 4 + labels.view(-1, 1, 1, 1) * 4).to(torch.uint8)
    return Split(images, labels, torch.arange(n), 16.0, 4)


def pretrain_options(**kw):
    base = dict(patch_size=4, dim=16, depth=1, heads=2, proj_hidden=32, proj_dim=16, steps=50,
                batch_size=16, lr=3e-3, warmup=1, eval_every=0)
    return rrcm_pretrain.PretrainOptions(**{**base, **kw})


def fixed_loss(run, step=7, seed=123):
    return run.loss_fn(step, torch.Generator().manual_seed(seed))[0].item()


def optimise(run, steps):
    for _ in range(steps):
        loss, _ = run.loss_fn(7, torch.Generator().manual_seed(123))   # the same batch every time
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()


def test_pretrain_loss_decreases_and_is_seeded(tmp_path):
    run = rrcm_pretrain.build_run(pretrain_options(), tiny_split(), None, tmp_path / "p.pt")
    again = rrcm_pretrain.build_run(pretrain_options(), tiny_split(), None, tmp_path / "p.pt")
    before = fixed_loss(run)
    assert before == fixed_loss(again)                     # same seed, same step: same loss
    loss, logs = run.loss_fn(0, torch.Generator().manual_seed(0))
    assert logs["grid_points"] == 21 and logs["ema_decay"] == pytest.approx(0.99)
    optimise(run, 15)
    assert fixed_loss(run) < before - 0.3


def test_finetune_loss_decreases(tmp_path):
    pre = RRCMNet(image_size=8, in_channels=1, patch_size=4, dim=16, depth=1, heads=2, proj_dim=16,
                  proj_hidden=32)
    path = tmp_path / "pre.pt"
    save_checkpoint(path, kind="rrcm", model_config=pre.config, model_state=pre.state_dict(), step=5)
    o = rrcm_finetune.FinetuneOptions(steps=50, batch_size=16, lr=3e-3, warmup=1, eval_every=0)
    run = rrcm_finetune.build_run(o, 0.5, path, tiny_split(), None, tmp_path / "f.pt")
    assert run.config["lambda"] == 20.0 and run.config["pretrained_step"] == 5
    before = fixed_loss(run)
    optimise(run, 15)
    assert fixed_loss(run) < before - 0.3
    assert rrcm_finetune.consistency_weight(o, 0.25) == 10.0
    assert rrcm_finetune.consistency_weight(o, 1.0) == 20.0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("rrcm")
    prepare("digits", root)
    return root


def test_cli_pretrain_then_finetune(results):
    r = str(results)
    assert cli.main(["pretrain-rrcm", "--dataset", "digits", "--results", r, "--steps", "3",
                     "--batch_size", "32", *TINY_NET, "--blur_prob", "1.0", "0.1"]) == 0
    pre = paths.rrcm_pretrained(r, "digits")
    model, payload = load_model(pre, kind="rrcm")
    assert payload["step"] == 3 and payload["ema"] is not None and model.projector is not None
    assert payload["config"]["blur_prob"] == [1.0, 0.1]
    rows = [json.loads(line) for line in metrics_path(pre).read_text().splitlines()]
    assert "knn_acc_sigma_0.5" in rows[-1]

    assert cli.main(["finetune-rrcm", "--dataset", "digits", "--results", r, "--sigma", "0.5",
                     "--steps", "2", "--batch_size", "32", "--eval_sigmas", "0.5"]) == 0
    out = paths.rrcm_finetuned(r, "digits", 0.5)
    net, payload = load_model(out, kind="rrcm")
    assert payload["config"]["sigma"] == 0.5 and net.config["num_classes"] == 10
    assert net.projector is None
    test = load_split(paths.prepared(r, "digits", "test"))
    with torch.no_grad():
        logits = SigmaConditioned(net, 0.5)(test.float_images()[:5] + 0.5 * torch.randn(5, 1, 8, 8))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    rows = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    assert {"clean_acc", "acc_sigma_0.5", "ce", "kl", "entropy"} <= set(rows[-1])


def test_cli_finetune_rejects_bad_pretrained_checkpoint(tmp_path, capsys):
    root = tmp_path / "res"
    prepare("digits", root)
    pre = paths.rrcm_pretrained(root, "digits")
    argv = ["finetune-rrcm", "--dataset", "digits", "--results", str(root), "--sigma", "0.25",
            "--steps", "1", "--batch_size", "8"]
    save_checkpoint(pre, kind="classifier", model_config={}, model_state={}, step=0)
    assert cli.main(argv) == 2
    assert "rrcm_pretrained.pt" in capsys.readouterr().err
    pre.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "rrcm_pretrained.pt" in err and "truncated" in err
    pre.unlink()
    assert cli.main(argv) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_rejects_bad_options(results, capsys):
    assert cli.main(["pretrain-rrcm", "--dataset", "digits", "--results", str(results), "--steps", "1",
                     "--batch_size", "1"]) == 2
    assert "--batch_size" in capsys.readouterr().err


def test_pretrain_resume_equals_uninterrupted(tmp_path):
    from rcm.train.loop import resume_path, train

    opts = pretrain_options(steps=4, checkpoint_every=2, batch_size=8)
    full = rrcm_pretrain.build_run(opts, tiny_split(), None, tmp_path / "full.pt")
    train(full)

    out = tmp_path / "cut.pt"
    cut = interrupt_at(rrcm_pretrain.build_run(opts, tiny_split(), None, out), 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    assert resume_path(out).exists() and not out.exists()
    train(rrcm_pretrain.build_run(opts, tiny_split(), None, out))
    a, b = torch.load(tmp_path / "full.pt"), torch.load(out)
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_layer_decay_scales_learning_rates():
    net = RRCMNet(image_size=8, in_channels=1, patch_size=4, dim=16, depth=2, heads=2, proj_dim=0,
                  num_classes=3)
    groups = rrcm_pretrain.param_groups(net, 0.05, layer_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=1.0)
    rrcm_pretrain.warmup_cosine(opt, warmup=1, steps=10)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(net.head.weight)] == pytest.approx(1.0)
    assert by_param[id(net.blocks[1].qkv.weight)] == pytest.approx(0.5)
    assert by_param[id(net.blocks[0].qkv.weight)] == pytest.approx(0.25)
    assert by_param[id(net.pos_embed)] == pytest.approx(0.125)
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decays[id(net.head.weight)] == 0.05 and decays[id(net.head.bias)] == 0.0
    assert decays[id(net.pos_embed)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
