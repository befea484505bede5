"""Data-parallel training under torchrun on CPUs (gloo): two processes at the same global batch and seed
reach the weights one process reaches, up to the order of floating-point reductions.

Tolerance (``_same_training``): the two runs differ only in the order of float32 additions (each
process sums its half of the gradient, then the halves are added), which changes a gradient by a few
units of float32 rounding (eps = 1.2e-7) relative to its terms. Two things can enlarge that: Adam
divides by the gradient's own size, so a component whose gradient is itself at rounding level can
move differently by up to lr per step; and a few steps propagate differences through the network.
Both are bounded by the size of what training did, and the components with rounding-level gradients
are few. So each weight tensor must agree to 1e-3 of its own change over the run, in Frobenius norm
(||two - one|| <= 1e-3 ||one - start||), plus 16 eps of its scale (||one||) for tensors that barely
moved. (A max norm is not bounded so: one component whose gradient is at rounding level can move by
its whole update.) Measured on an AVX-512/AMX CPU: at most 0.064 of the tolerance. Nothing here is fitted to a machine: a run with another seed,
or per-process BatchNorm statistics, differs by the order of the change itself. BatchNorm stages (the classifier, rRCM pretraining's projector) use
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


def _mismatch(one: dict, two: dict, start: dict) -> float:
    """The largest ratio, over weight tensors, of |two - one| to its tolerance (docstring above):
    <= 1 when two runs trained the same weights up to float32 reduction order."""
    one, two, start = (_without_null_directions(s) for s in (one, two, start))
    worst = 0.0
    for k, w in one.items():
        if not w.is_floating_point():
            continue
        w, diff = w.double(), (two[k].double() - w.double()).norm().item()
        change = (w - start[k].double()).norm().item()
        eps = torch.finfo(torch.float32).eps
        worst = max(worst, diff / (1e-3 * change + 16 * eps * w.norm().item() + 1e-30))
    return worst


def _start(root, argv, out) -> dict:
    """The weights a stage starts from: the same stage run with learning rate 0 in a copy of ``root``
    (every optimiser here leaves weights alone at lr 0)."""
    start = root.parent / f"{root.name}-start-{argv[0]}"
    if not start.exists():
        shutil.copytree(root, start)
        assert cli.main([argv[0], "--results", str(start), *argv[1:], "--lr", "0"]) == 0
    return load_checkpoint(out(start))["model"]


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
    assert _mismatch(one["model"], two["model"], _start(single, argv, out)) <= 1, stage
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
    assert _mismatch(a["model"], b["model"], _start(one, argv, lambda r: paths.denoiser(r, "imagenet"))) <= 1
    assert b["metrics"][0]["loss"] == pytest.approx(a["metrics"][0]["loss"], rel=1e-5)
    assert b["metrics"][0]["mse_sigma_0.5"] == pytest.approx(a["metrics"][0]["mse_sigma_0.5"], rel=1e-5)


def test_the_tolerance_is_far_below_what_a_different_run_changes(single, tmp_path):
    argv, out = STAGES["train-denoiser"]
    root = tmp_path / "seed"
    shutil.copytree(single, root)
    assert cli.main([argv[0], "--results", str(root), *argv[1:], "--seed", "1"]) == 0
    assert _mismatch(load_checkpoint(out(single))["model"], load_checkpoint(out(root))["model"],
                     _start(single, argv, out)) > 100


def test_gradient_accumulation_equals_the_whole_batch(single, tmp_path):
    """--micro_batches 4: four passes of 4 images accumulate the gradient of the 16-image batch."""
    for stage in ("train-denoiser", "finetune-rrcm"):
        argv, out = STAGES[stage]
        root = tmp_path / stage
        shutil.copytree(single, root)
        assert cli.main([argv[0], "--results", str(root), *argv[1:], "--micro_batches", "4"]) == 0
        assert _mismatch(load_checkpoint(out(single))["model"], load_checkpoint(out(root))["model"],
                         _start(single, argv, out)) <= 1


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


def _claimer(candidates: list[int], uuids: str, wait: float = 0) -> str:
    """A process that claims one of ``candidates`` (visible GPU indices whose UUIDs are ``uuids``, a
    comma-separated list by index), prints the index and holds it until its stdin closes."""
    return ("import sys; from rcm.distributed import claim_gpu; "
            f"u = {uuids!r}.split(','); "
            f"print(claim_gpu({candidates!r}, wait={wait}, poll=0.1, uuid=lambda i: u[i]), flush=True); "
            "sys.stdin.readline()")


def test_concurrent_jobs_each_claim_their_own_gpu(tmp_path):
    """Claims are by GPU UUID, so neither a shared index nor a renumbering makes two processes share a
    GPU: three processes on a workstation showing GPUs A, B, C get one each; a fourth waits, then stops
    with one line; a job that sees only GPU B (as its cuda:0, as SLURM numbers a job's GPUs) is refused
    it while it is held, and a job that sees only D (also its cuda:0) gets it at once. Checked with
    pretended UUIDs (the claim needs no GPU)."""
    env = {**os.environ, "RCM_GPU_LOCKS": str(tmp_path)}

    def start(candidates, uuids):
        return subprocess.Popen([sys.executable, "-c", _claimer(candidates, uuids)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    procs = [start([0, 1, 2], "A,B,C") for _ in range(3)]
    try:
        claimed = sorted(int(p.stdout.readline()) for p in procs)
        assert claimed == [0, 1, 2]
        extra = subprocess.run([sys.executable, "-c", _claimer([0, 1, 2], "A,B,C", wait=0.5)], input="\n",
                               capture_output=True, text=True, env=env)
        assert extra.returncode != 0 and extra.stdout == ""
        assert "is held by another rcm process" in extra.stderr and "waited 0 s" in extra.stderr
        renumbered = subprocess.run([sys.executable, "-c", _claimer([0], "B")], input="\n",
                                    capture_output=True, text=True, env=env)
        assert renumbered.returncode != 0 and "held by another rcm process" in renumbered.stderr
        other = subprocess.run([sys.executable, "-c", _claimer([0], "D")], input="\n",
                               capture_output=True, text=True, env=env)
        assert other.returncode == 0 and other.stdout.strip() == "0"
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    again = subprocess.run([sys.executable, "-c", _claimer([0, 1, 2], "A,B,C")], input="\n",
                           capture_output=True, text=True, env=env)
    assert again.stdout.strip() == "0" and again.stderr == ""          # released when the jobs ended


def test_a_claim_waits_for_a_gpu_to_free_up(tmp_path):
    env = {**os.environ, "RCM_GPU_LOCKS": str(tmp_path)}
    holder = subprocess.Popen([sys.executable, "-c", _claimer([0], "A")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "0"
    waiter = subprocess.Popen([sys.executable, "-c", _claimer([0], "A", wait=60)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "waiting up to 60 s" in waiter.stderr.readline()
        holder.communicate("\n", timeout=60)                            # the holder ends: the GPU is free
        assert waiter.stdout.readline().strip() == "0"
    finally:
        waiter.communicate("\n", timeout=60)


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


FAIL_IN_BACKWARD = """
import sys

from rcm import cli, distributed
from rcm.train import loop

backward, calls = loop._Precision.backward, []


def failing(self, loss):
    calls.append(1)
    if distributed.rank() == 1 and len(calls) == 2:
        raise RuntimeError("CUDA out of memory (simulated in rank 1's backward pass)")
    backward(self, loss)


loop._Precision.backward = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failing_process_ends_the_job_promptly(single, tmp_path):
    """One of two processes raises in its backward pass of step 1 (as CUDA out-of-memory would), while
    the other waits in that step's gradient all-reduce: the failing process reports and exits at once,
    torchrun stops the other, and the job ends non-zero within 60 s, not at the 2-hour timeout."""
    import time

    argv, _ = STAGES["train-classifier"]
    root = tmp_path / "fail"
    shutil.copytree(single, root)
    script = tmp_path / "fail.py"
    script.write_text(FAIL_IN_BACKWARD)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "--threads", "1", argv[0], "--results", str(root), *argv[1:]],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert "rank 1 of 2): failed" in r.stderr and "simulated in rank 1's backward pass" in r.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


class _BatchBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every tensor storage created while it is active, up to the first forward
    pass of any module: what a training step allocates to build its batch (images, augmented views,
    noise, the network's input), not the network's activations. Every new storage counts (a total, not
    a peak); views and in-place results add nothing."""

    def __init__(self):
        super().__init__()
        self.total, self._building = 0, True

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda *a: setattr(self, "_building", False))
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        if self._building:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in inputs:
                        self.total += storage.nbytes()
        return out


def _step_bytes(run, monkeypatch, rank: int, world: int, step: int) -> int:
    """Bytes a training step allocates for its batch in process ``rank`` of ``world`` (pretended in
    this process: the other processes' InfoNCE keys are stood in for by copies of this one's)."""
    from rcm import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "gather", lambda t: torch.cat([t.detach()] * world))
    with distributed.part(rank, world), _BatchBytes() as counter:
        run.loss_fn(step, torch.Generator().manual_seed(step))  # a step not read before: nothing cached
    return counter.total


def test_each_process_builds_only_its_own_rows(tmp_path, monkeypatch):
    """Of two processes, each allocates at most 60% of the bytes that one process allocates to build a
    step's batch (its half of the images, the augmented views and the noise): nothing of the global
    batch is built whole. rRCM pretraining, whose step draws the most (two views and a noise image per
    image), and the Gaussian classifier."""
    from rcm.data import load_split
    from rcm.train import classifier, rrcm_pretrain

    prepare("digits", tmp_path)
    train = load_split(paths.prepared(tmp_path, "digits", "train"))
    opts = rrcm_pretrain.PretrainOptions(batch_size=64, patch_size=4, dim=16, depth=1, heads=2, proj_hidden=32,
                                         proj_dim=16)
    runs = {"pretrain-rrcm": rrcm_pretrain.build_run(opts, train, None, tmp_path / "r.pt"),
            "train-classifier": classifier.make_run(classifier.ClassifierOptions(batch_size=64), "digits",
                                                    str(tmp_path), 0.5)}
    for name, run in runs.items():
        _step_bytes(run, monkeypatch, 0, 1, step=4)              # the epoch's order, computed once
        one = _step_bytes(run, monkeypatch, 0, 1, step=5)
        for rank in (0, 1):
            two = _step_bytes(run, monkeypatch, rank, 2, step=6 + rank)
            assert two <= 0.6 * one, (name, rank)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", ["train-classifier", "pretrain-rrcm"])
def test_two_nodes_train_what_one_process_trains(single, tmp_path, stage):
    """Two torchrun agents, as on two nodes (--nnodes 2, node ranks 0 and 1, one process each), meet at
    a c10d rendezvous on 127.0.0.1 and train, over gloo, the weights one process trains: the
    classifier (BatchNorm statistics over both nodes) and rRCM pretraining (InfoNCE against the keys
    gathered from both)."""
    argv, out = STAGES[stage]
    root = tmp_path / "nodes"
    shutil.copytree(single, root)
    out(root).unlink()
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                                "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                "--rdzv-id", "rcm-two-nodes", "-m", "rcm", "--threads", "1", argv[0],
                                "--results", str(root), *argv[1:]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for node in (0, 1)]
    results = [a.communicate(timeout=600) for a in agents]
    for agent, (stdout, stderr) in zip(agents, results):
        assert agent.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert sum(stdout.count("wrote") for stdout, _ in results) == 1       # rank 0 alone reports
    one, two = load_checkpoint(out(single)), load_checkpoint(out(root))
    assert _mismatch(one["model"], two["model"], _start(single, argv, out)) <= 1, stage
    assert two["metrics"][0]["loss"] == pytest.approx(one["metrics"][0]["loss"], rel=1e-5)
