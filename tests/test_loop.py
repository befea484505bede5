"""The shared training loop: interrupted-and-resumed runs equal uninterrupted ones; NaN stops cleanly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rcm.checkpoint import load_checkpoint
from rcm.errors import TrainingError
from rcm.train.loop import Run, batch_rows, metrics_path, resume_path, step_seed, train

DATA_X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
DATA_Y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))


class Interrupt(Exception):
    pass


def interrupt_at(run: Run, step: int, exc: type[BaseException] = Interrupt) -> Run:
    """``run`` with its loss function raising ``exc`` when it reaches ``step`` (a kill mid-training)."""
    inner = run.loss_fn

    def dies(k, g):
        if k == step:
            raise exc
        return inner(k, g)

    run.loss_fn = dies
    return run


def make_run(out, *, fail_at: int | None = None, nan_at: int | None = None, steps: int = 10,
             calls: list | None = None) -> Run:
    """A run that touches every piece of state the loop must restore: BatchNorm buffers, dropout (global
    RNG), generator noise, Adam moments, an LR scheduler, EMA weights and an extra module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    temperature = nn.Linear(1, 1)  # an extra module trained alongside
    opt = torch.optim.Adam([*model.parameters(), *temperature.parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

    def loss_fn(step: int, g: torch.Generator):
        if calls is not None:
            calls.append(step)
        if step == fail_at:
            raise Interrupt(step)
        rows = batch_rows(len(DATA_Y), 8, step, seed=3)
        x = DATA_X[rows] + 0.1 * torch.randn((len(rows), 6), generator=g)
        logits = model(x) * temperature(torch.ones(1, 1))
        loss = F.cross_entropy(logits, DATA_Y[rows])
        if step == nan_at:
            loss = loss * float("nan")
        return loss, {"lr": opt.param_groups[0]["lr"]}

    def eval_fn(m):
        return {"acc": (m(DATA_X).argmax(1) == DATA_Y).float().mean().item()}

    return Run(out=out, kind="classifier", model=model, model_config={"toy": True}, config={"steps": steps},
               optimizer=opt, loss_fn=loss_fn, steps=steps, seed=3, checkpoint_every=3, eval_every=2,
               eval_fn=eval_fn, scheduler=sched, grad_clip=1.0, ema=copy.deepcopy(model),
               ema_decay=lambda step: 0.9, extra_modules={"temperature": temperature}, desc="toy")


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole.pt"
    train(make_run(whole))

    parts = tmp_path / "parts.pt"
    with pytest.raises(Interrupt):
        train(make_run(parts, fail_at=7))             # checkpoints at steps 3 and 6, dies in step 7
    assert resume_path(parts).exists() and not parts.exists()
    assert load_checkpoint(resume_path(parts))["step"] == 6
    calls = []
    train(make_run(parts, calls=calls))               # a fresh process would rebuild everything like this
    assert calls == [6, 7, 8, 9]                      # it resumed rather than starting again

    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a["step"] == b["step"] == 10
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    for name in a["extra"]["temperature"]:
        assert torch.equal(a["extra"]["temperature"][name], b["extra"]["temperature"][name])
    assert a["scheduler"] == b["scheduler"]
    assert a["metrics"] == b["metrics"]
    assert [r["step"] for r in a["metrics"]] == [2, 4, 6, 8, 10]
    assert metrics_path(whole).read_text() == metrics_path(parts).read_text()
    assert not resume_path(parts).exists()


def test_nan_loss_names_the_step_and_keeps_the_resume_file(tmp_path):
    out = tmp_path / "nan.pt"
    with pytest.raises(TrainingError, match="at step 5") as info:
        train(make_run(out, nan_at=5))
    assert str(resume_path(out)) in str(info.value)
    assert load_checkpoint(resume_path(out))["step"] == 3
    assert not out.exists()
    rows = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_batches_and_step_seeds_depend_on_the_step_alone():
    assert torch.equal(batch_rows(40, 8, 7, seed=3), batch_rows(40, 8, 7, seed=3))
    assert not torch.equal(batch_rows(40, 8, 7, seed=3), batch_rows(40, 8, 7, seed=4))
    epoch = torch.cat([batch_rows(40, 8, k, seed=3) for k in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))  # one epoch covers every row once
    assert len({step_seed(0, k) for k in range(1000)}) == 1000


def _amp_run(out, amp: str, steps: int = 4, loss_scale: float = 1.0) -> Run:
    """A small convolutional run (autocast lowers convolutions and linear layers) trained under ``amp``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_all = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def loss_fn(step: int, g: torch.Generator):
        rows = batch_rows(16, 8, step, seed=0)
        logits = model(x_all[rows])
        seen.append(logits.dtype)
        return F.cross_entropy(logits, DATA_Y[rows]) * loss_scale, {}

    run = Run(out=out, kind="classifier", model=model, model_config={"toy": True}, config={}, optimizer=opt,
              loss_fn=loss_fn, steps=steps, seed=0, checkpoint_every=2, eval_every=2,
              eval_fn=lambda m: {"acc": 0.0}, grad_clip=1.0, desc="amp", amp=amp)
    run.seen = seen
    return run


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_pass_in_its_dtype_and_keeps_float32_weights(tmp_path, amp, dtype):
    run = _amp_run(tmp_path / "m.pt", amp)
    train(run)
    assert set(run.seen) == {dtype}                       # the forward pass ran in the asked precision
    payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["amp"] == amp
    assert all(t.dtype in (torch.float32, torch.int64) for t in payload["model"].values())
    first = dict(_amp_run(tmp_path / "ref.pt", amp).model.state_dict())
    assert any(not torch.equal(first[k], v) for k, v in payload["model"].items())  # it did train


def test_fp16_overflowing_steps_are_skipped_counted_and_resumed(tmp_path):
    """A loss scaled by 100 overflows fp16's gradients (max 65504) once multiplied by GradScaler's
    initial 2**16: such a step is skipped and the scale halved, until the gradients fit. Every skip is
    counted, the optimiser stepped only on the others, and the count is logged and survives resume."""
    out = tmp_path / "fp16.pt"
    train(_amp_run(out, "fp16", steps=10, loss_scale=100.0))
    payload = load_checkpoint(out)
    skipped = payload["skipped_steps"]
    assert 1 <= skipped < 10
    assert payload["scaler"]["scale"] == 2.0 ** 16 / 2 ** skipped     # halved once per skipped step
    assert payload["optimizer"]["state"][0]["step"] == 10 - skipped   # Adam stepped on the others only
    rows = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    counts = [r["skipped_steps"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == skipped

    parts = tmp_path / "parts.pt"
    with pytest.raises(Interrupt):
        train(interrupt_at(_amp_run(parts, "fp16", steps=10, loss_scale=100.0), 5))
    assert load_checkpoint(resume_path(parts))["skipped_steps"] == counts[1]   # the state at step 4
    train(_amp_run(parts, "fp16", steps=10, loss_scale=100.0))
    resumed = load_checkpoint(parts)
    assert resumed["skipped_steps"] == skipped and resumed["scaler"] == payload["scaler"]
    for name, value in payload["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_resuming_under_another_amp_is_refused(tmp_path):
    out = tmp_path / "m.pt"
    with pytest.raises(Interrupt):
        train(interrupt_at(_amp_run(out, "bf16", steps=4), 3))
    with pytest.raises(TrainingError, match="amp=bf16"):
        train(_amp_run(out, "off", steps=4))
    assert resume_path(out).exists()                      # nothing lost


def test_unknown_amp_is_a_config_error(tmp_path):
    from rcm.errors import ConfigError

    with pytest.raises(ConfigError, match="amp must be one of off, bf16, fp16"):
        train(_amp_run(tmp_path / "m.pt", "fp8"))
