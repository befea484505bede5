"""Data-parallel training under torchrun on CPUs (gloo): two processes at the same global batch and seed
reach the weights one process reaches, up to the order of floating-point reductions.

Tolerance: the two runs differ only in how per-sample gradients are summed (each process sums its half,
then gloo adds the two halves), which changes float32 rounding at about 1e-7 relative per step; after a
few Adam steps of these tiny models the weights agree to well under 1e-5. A run with another seed, for
scale, differs by more than 1e-2. BatchNorm stages (the classifier, rRCM pretraining's projector) use
the global batch's statistics (rcm.distributed.CPUSyncBatchNorm on CPUs, torch's SyncBatchNorm on
GPUs), so they agree too; an unsynchronised variant, per-process statistics, does not. Weights whose
gradient is zero in exact arithmetic are left out of the comparison (``_without_null_directions``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from rcm import cli, paths
from rcm.checkpoint import load_checkpoint
from rcm.data import prepare

SMALL = ["--steps", "3", "--batch_size", "16", "--eval_every", "3", "--checkpoint_every", "2"]
STAGES = {
    "train-denoiser": (["train-denoiser", *SMALL, "--block_out_channels", "8", "16", "--norm_num_groups", "4",
                        "--eval_sigmas", "0.5"], lambda r: paths.denoiser(r, "digits")),
    "finetune-denoiser": (["finetune-denoiser", *SMALL, "--copies", "2", "--sigmas", "0.5"],
                          lambda r: paths.denoiser(r, "digits", finetuned=True)),
    "finetune-rrcm": (["finetune-rrcm", *SMALL, "--sigma", "0.5", "--eval_sigmas", "0.5", "--num_draws", "2"],
                      lambda r: paths.rrcm_finetuned(r, "digits", 0.5)),
    "train-classifier": (["train-classifier", *SMALL, "--sigma", "0.5", "--eval_sigmas", "0.5"],
                         lambda r: paths.classifier(r, "digits", 0.5)),
    "pretrain-rrcm": (["pretrain-rrcm", *SMALL, "--patch_size", "4", "--dim", "16", "--depth", "1", "--heads", "2",
                       "--proj_hidden", "32", "--proj_dim", "16", "--eval_sigmas", "0.5"],
                      lambda r: paths.rrcm_pretrained(r, "digits")),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Every stage trained by one process (in this one), in workflow order: the reference, and the
    inputs the fine-tuning stages read."""
    root = tmp_path_factory.mktemp("one")
    prepare("digits", root)
    assert cli.main(["train-classifier", "--results", str(root), *SMALL, "--sigma", "0.0", "--eval_sigmas", "0.5"]) == 0
    for name in ("train-denoiser", "train-classifier", "pretrain-rrcm", "finetune-denoiser", "finetune-rrcm"):
        argv, _ = STAGES[name]
        assert cli.main([argv[0], "--results", str(root), *argv[1:]]) == 0, name
    return root


def _torchrun(root, argv, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "rcm", "--threads", "1", argv[0], "--results", str(root), *argv[1:]],
                          capture_output=True, text=True, env=env, timeout=600)


def _max_difference(a: dict, b: dict) -> float:
    a, b = _without_null_directions(a), _without_null_directions(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _without_null_directions(state: dict) -> dict:
    """The weights less those whose gradient is zero in exact arithmetic: a Linear bias that feeds
    BatchNorm (the normalisation subtracts it again), attention's key bias (it adds the same logit to
    every key of a query), and the running means of those BatchNorm layers, which carry the bias.
    Their gradients are rounding noise, which changes with the order of reductions, and Adam turns any
    noise into steps of up to lr: one process and two differ there by about 3e-4 after 3 steps of rRCM
    pretraining, a drift the single-process run has too. They do not change what the network computes
    in training mode. rRCM's projector and ViT blocks are where rcm has them."""
    out = {}
    for key, value in state.items():
        if re.fullmatch(r"(.*\.)?projector\.[03]\.bias|(.*\.)?projector\.[14]\.running_mean", key):
            continue
        if key.endswith("qkv.bias"):  # q, k, v thirds: drop k
            d = value.shape[0] // 3
            value = torch.cat([value[:d], value[2 * d:]])
        out[key] = value
    return out


# the denoiser's launch is the streamed one below (ImageNet files): one torchrun launch per stage
@pytest.mark.parametrize("stage", [s for s in STAGES if s != "train-denoiser"])
def test_two_processes_train_what_one_trains(single, tmp_path, stage):
    argv, out = STAGES[stage]
    root = tmp_path / "two"
    shutil.copytree(single, root)
    out(root).unlink()
    r = _torchrun(root, argv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1                        # rank 0 reports, once
    one, two = load_checkpoint(out(single)), load_checkpoint(out(root))
    assert two["step"] == 3 and [m["step"] for m in two["metrics"]] == [3]
    assert len(out(root).with_suffix(".metrics.jsonl").read_text().splitlines()) == 1
    assert not paths.Path(str(out(root)) + ".resume").exists()
    assert _max_difference(one["model"], two["model"]) < 1e-5, stage
    assert two["metrics"][0]["loss"] == pytest.approx(one["metrics"][0]["loss"], rel=1e-5)


def test_two_processes_stream_imagenet_files_as_one_process_does(tmp_path, monkeypatch):
    """ImageNet from a tree of JPEGs, decoded in a DataLoader worker per process: each of two processes
    decodes only its half of every global batch (the other half stays zero and never reaches its loss),
    and the denoiser ends where one process's does, within the tolerance above."""
    from trees import write_tree

    from rcm import loader

    monkeypatch.setattr(loader, "WORKERS", None)  # restored after cli.main's --workers
    tree = write_tree(tmp_path / "imagenet", per_class=8)
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        prepare("imagenet", root, part="train", root=tree, image_size=16, val_fraction=0.25)
    argv, _ = STAGES["train-denoiser"]
    argv = [argv[0], "--dataset", "imagenet", "--workers", "1", *argv[1:]]
    assert cli.main([argv[0], "--results", str(one), *argv[1:]]) == 0
    r = _torchrun(two, argv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load_checkpoint(paths.denoiser(one, "imagenet")), load_checkpoint(paths.denoiser(two, "imagenet"))
    assert _max_difference(a["model"], b["model"]) < 1e-5
    assert b["metrics"][0]["loss"] == pytest.approx(a["metrics"][0]["loss"], rel=1e-5)
    assert b["metrics"][0]["mse_sigma_0.5"] == pytest.approx(a["metrics"][0]["mse_sigma_0.5"], rel=1e-5)


def test_the_tolerance_is_far_below_what_a_different_run_changes(single, tmp_path):
    argv, out = STAGES["train-denoiser"]
    root = tmp_path / "seed"
    shutil.copytree(single, root)
    assert cli.main([argv[0], "--results", str(root), *argv[1:], "--seed", "1"]) == 0
    assert _max_difference(load_checkpoint(out(single))["model"], load_checkpoint(out(root))["model"]) > 1e-2


def test_gradient_accumulation_equals_the_whole_batch(single, tmp_path):
    """--micro_batches 4: four passes of 4 images accumulate the gradient of the 16-image batch."""
    for stage in ("train-denoiser", "finetune-rrcm"):
        argv, out = STAGES[stage]
        root = tmp_path / stage
        shutil.copytree(single, root)
        assert cli.main([argv[0], "--results", str(root), *argv[1:], "--micro_batches", "4"]) == 0
        assert _max_difference(load_checkpoint(out(single))["model"], load_checkpoint(out(root))["model"]) < 1e-5


def test_a_batch_that_does_not_split_is_refused(single, tmp_path, capsys):
    argv, _ = STAGES["train-denoiser"]
    root = tmp_path / "odd"
    shutil.copytree(single, root)
    assert cli.main([argv[0], "--results", str(root), *argv[1:], "--micro_batches", "3"]) == 2
    assert "global batch of 16 cannot be split into 3 equal parts" in capsys.readouterr().err


def test_only_training_stages_run_under_torchrun(single):
    r = _torchrun(single, ["certify", "--method", "rrcm", "--sigma", "0.5"])
    assert r.returncode != 0
    assert "only the training stages run under torchrun" in r.stderr


def test_concurrent_jobs_each_claim_their_own_gpu(tmp_path):
    """On a multi-GPU workstation, concurrent single-process jobs ask for 'cuda' and get different
    devices: each holds an flock on its device's lock file until it exits. Checked with three processes
    and a pretended count of 3 GPUs (the claim needs no GPU), then a fourth that finds all held."""
    code = ("import sys, time; from rcm.distributed import claim_gpu; print(claim_gpu(3), flush=True); "
            "sys.stdin.readline()")
    env = {**os.environ, "RCM_GPU_LOCKS": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    try:
        claimed = sorted(int(p.stdout.readline()) for p in procs)
        assert claimed == [0, 1, 2]
        extra = subprocess.run([sys.executable, "-c", code], input="\n", capture_output=True, text=True, env=env)
        assert extra.stdout.strip() == "0" and "all 3 GPUs are held" in extra.stderr
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    again = subprocess.run([sys.executable, "-c", code], input="\n", capture_output=True, text=True, env=env)
    assert again.stdout.strip() == "0" and again.stderr == ""          # released when the jobs ended


def test_refusals_name_the_problem(single, tmp_path, capsys, monkeypatch):
    argv, _ = STAGES["pretrain-rrcm"]
    root = tmp_path / "mb"
    shutil.copytree(single, root)
    assert cli.main([argv[0], "--results", str(root), *argv[1:], "--micro_batches", "2"]) == 2
    assert "--micro_batches must be 1 for rRCM pretraining" in capsys.readouterr().err
    from rcm.distributed import local_device
    from rcm.errors import TrainingError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="use 'cuda'"):
        local_device(torch.device("cuda", 1))


def _batchnorm_parts(rank: int, world: int, port: int, x: torch.Tensor, upstream: torch.Tensor, queue) -> None:
    """One of ``world`` gloo processes: BatchNorm2d on this process's rows of x, synchronised and not."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from rcm.distributed import CPUSyncBatchNorm

        for synced in (True, False):
            bn = torch.nn.BatchNorm2d(3, momentum=0.3)
            bn = CPUSyncBatchNorm.convert(bn) if synced else bn
            part = x.chunk(world)[rank].clone().requires_grad_(True)
            y = bn(part)
            (y * upstream.chunk(world)[rank]).sum().backward()
            torch.distributed.all_reduce(bn.weight.grad)       # what DistributedDataParallel adds up
            values = (y.detach(), part.grad, bn.weight.grad, bn.running_mean, bn.running_var)
            queue.put((synced, rank, *(v.numpy().copy() for v in values)))  # by value, not shared memory
    finally:
        torch.distributed.destroy_process_group()


def test_cpu_sync_batchnorm_is_batchnorm_of_the_global_batch():
    """Two gloo processes, each with half of a batch whose halves differ: synchronised BatchNorm gives
    the outputs, input and weight gradients and running statistics of one BatchNorm over the whole
    batch; per-process BatchNorm (the unsynchronised variant) does not."""
    import multiprocessing
    import socket

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) + torch.tensor([0.0, 3.0]).repeat_interleave(4)[:, None, None, None]
    upstream = torch.randn(8, 3, 5, 5, generator=g)
    whole = torch.nn.BatchNorm2d(3, momentum=0.3)
    xw = x.clone().requires_grad_(True)
    y = whole(xw)
    (y * upstream).sum().backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_batchnorm_parts, args=(r, 2, port, x, upstream, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by = {(synced, rank): [torch.from_numpy(v) for v in rest] for synced, rank, *rest in results}
    for synced in (True, False):
        out = torch.cat([by[synced, r][0] for r in range(2)])
        grad = torch.cat([by[synced, r][1] for r in range(2)])
        weight_grad, running_mean, running_var = by[synced, 0][2:]
        close = [torch.allclose(out, y, atol=1e-5), torch.allclose(grad, xw.grad, atol=1e-5),
                 torch.allclose(weight_grad, whole.weight.grad, atol=1e-4),
                 torch.allclose(running_mean, whole.running_mean, atol=1e-6),
                 torch.allclose(running_var, whole.running_var, atol=1e-5)]
        assert all(close) if synced else not any(close[:2]), (synced, close)
