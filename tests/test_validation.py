"""Every training stage evaluates on the validation split; only certification reads the test split."""

import json

import pytest

from rcm import cli, data, paths
from rcm.data import prepare

TRAINING_MODULES = ["rcm.train.classifier", "rcm.train.denoiser", "rcm.train.mdds", "rcm.train.rrcm_pretrain",
                    "rcm.train.rrcm_finetune"]


@pytest.fixture
def reads(monkeypatch):
    """The prepared files every stage loads, in order (rcm.data.load_split, wherever imported)."""
    import importlib

    seen = []
    original = data.load_split

    def recording(path):
        seen.append(paths.Path(path).name)
        return original(path)
    monkeypatch.setattr(data, "load_split", recording)
    for name in TRAINING_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "load_split", recording)
    return seen


def _stage(argv, reads) -> list[str]:
    start = len(reads)
    assert cli.main(argv) == 0, argv
    return reads[start:]


def _stages(root, *extra) -> dict[str, list[str]]:
    """Every training stage, tiny, in the order the workflow runs them."""
    common = ["--dataset", "digits", "--results", str(root)]
    small = ["--steps", "2", "--batch_size", "16", "--eval_every", "2", "--checkpoint_every", "2", *extra]
    stages = {
        "train-classifier 0.0": ["train-classifier", *common, "--sigma", "0.0", *small, "--eval_sigmas", "0.5"],
        "train-classifier 0.5": ["train-classifier", *common, "--sigma", "0.5", *small, "--eval_sigmas", "0.5"],
        "train-denoiser": ["train-denoiser", *common, *small, "--block_out_channels", "8", "16",
                           "--norm_num_groups", "4", "--eval_sigmas", "0.5"],
        "finetune-denoiser": ["finetune-denoiser", *common, *small, "--copies", "2", "--sigmas", "0.5"],
        "pretrain-rrcm": ["pretrain-rrcm", *common, *small, "--patch_size", "4", "--dim", "16", "--depth", "1",
                          "--heads", "2", "--proj_hidden", "32", "--proj_dim", "16", "--eval_sigmas", "0.5"],
        "finetune-rrcm": ["finetune-rrcm", *common, *small, "--sigma", "0.5", "--eval_sigmas", "0.5"],
    }
    return stages


def test_no_training_stage_reads_the_test_split(tmp_path, reads):
    prepare("digits", tmp_path)
    test = paths.prepared(tmp_path, "digits", "test")
    test.rename(tmp_path / "elsewhere.pt")  # any read of the test split would now fail
    stages = _stages(tmp_path)
    for name, argv in stages.items():
        loaded = _stage(argv, reads)
        assert "test.pt" not in loaded, name
        assert "val.pt" in loaded, f"{name} evaluates on {loaded}"
    # and each evaluation was logged: the monitors ran, on validation images
    for out in [paths.classifier(tmp_path, "digits", 0.5), paths.denoiser(tmp_path, "digits"),
                paths.denoiser(tmp_path, "digits", finetuned=True), paths.rrcm_pretrained(tmp_path, "digits"),
                paths.rrcm_finetuned(tmp_path, "digits", 0.5)]:
        rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
        assert any(k.startswith(("acc_", "mse_", "knn_", "clean_acc")) for k in rows[-1]), out.name


def test_every_training_stage_trains_under_bf16_autocast(tmp_path, monkeypatch):
    """`--amp bf16` in every stage: the forward passes run in bfloat16 (CPU autocast), the weights and
    the checkpoint stay float32, and the checkpoint records the precision it was trained in."""
    import torch

    from rcm.checkpoint import load_checkpoint

    prepare("digits", tmp_path)
    lowered = []
    original = torch.nn.Linear.forward

    def recording(self, x):
        out = original(self, x)
        lowered.append(out.dtype)
        return out
    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    outs = {"train-classifier 0.0": paths.classifier(tmp_path, "digits", 0.0),
            "train-classifier 0.5": paths.classifier(tmp_path, "digits", 0.5),
            "train-denoiser": paths.denoiser(tmp_path, "digits"),
            "finetune-denoiser": paths.denoiser(tmp_path, "digits", finetuned=True),
            "pretrain-rrcm": paths.rrcm_pretrained(tmp_path, "digits"),
            "finetune-rrcm": paths.rrcm_finetuned(tmp_path, "digits", 0.5)}
    for name, argv in _stages(tmp_path, "--amp", "bf16").items():
        lowered.clear()
        assert cli.main(argv) == 0, name
        assert torch.bfloat16 in lowered, f"{name}: no layer ran in bfloat16"
        payload = load_checkpoint(outs[name])
        assert payload["amp"] == "bf16", name
        assert all(t.dtype != torch.bfloat16 for t in payload["model"].values()), name
        rows = [json.loads(line) for line in outs[name].with_suffix(".metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["loss"] is not None, name     # a finite loss (NaN would be logged as null)
