"""Reading a checkpoint never runs code from it, and a damaged payload is a CheckpointError."""

import os
import pickle

import pytest
import torch

from rcm import paths
from rcm.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from rcm.cli import main as cli
from rcm.errors import CheckpointError
from rcm.models import load_model


class _RunsCode:
    """Unpickling this object runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(tmp_path):
    marker = tmp_path / "ran"
    zipped = tmp_path / "crafted.pt"  # torch's zip format, with an rcm header
    torch.save({"format": FORMAT, "kind": "classifier", "model_config": {}, "model": {},
                "payload": _RunsCode(marker)}, zipped)
    legacy = tmp_path / "crafted.pkl"  # a bare pickle, as torch.save wrote before 1.6
    with open(legacy, "wb") as f:
        pickle.dump({"format": FORMAT, "payload": _RunsCode(marker)}, f)
    return marker, [zipped, legacy]


def test_the_crafted_files_do_run_code_when_unpickled(tmp_path):
    """The control: the files below are live, so the refusal is what keeps the marker away."""
    marker, (zipped, legacy) = _crafted(tmp_path)
    with open(legacy, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    torch.load(zipped, weights_only=False)
    assert marker.exists()


def test_loading_refuses_objects_that_could_run_code(tmp_path):
    marker, files = _crafted(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match=f"{path.name}.*refused before any of it ran"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=path.name):
            load_model(path)
    assert not marker.exists()


def test_certify_refuses_a_crafted_model_file_with_one_line(digits_results, tmp_path, capsys):
    marker, (zipped, _) = _crafted(tmp_path)
    target = paths.classifier(digits_results, "digits", 0.25)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(zipped.read_bytes())
    rc = cli(["certify", "--dataset", "digits", "--results", str(digits_results), "--method", "gaussian",
              "--sigma", "0.25", "--n0", "10", "--n", "20", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and str(target) in err and "refused" in err and "Traceback" not in err
    assert not marker.exists()
    assert not paths.certificate(digits_results, "digits", "gaussian", 0.25, 0, 1).exists()


@pytest.mark.parametrize("missing", ["kind", "model_config", "model"])
def test_a_payload_without_a_required_key_names_it(tmp_path, missing):
    path = tmp_path / "partial.pt"
    payload = {"format": FORMAT, "kind": "classifier", "model_config": {}, "model": {}}
    del payload[missing]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"partial.pt.*lacks {missing}"):
        load_model(path)


def test_every_checkpoint_rcm_writes_loads_safely(tmp_path):
    """What save_checkpoint writes (model, optimiser, EMA, RNG state, metrics) needs no unpickling
    beyond tensors and containers."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path, rng = tmp_path / "ck.pt", torch.get_rng_state()
    save_checkpoint(path, kind="classifier", model_config={"width": 4, "sizes": [1, 2]},
                    model_state=net.state_dict(), step=3, config={"lr": 0.1, "name": "x"},
                    optimizer=opt.state_dict(), ema=net.state_dict(), rng=rng,
                    metrics=[{"step": 1, "loss": 0.5}])
    payload = load_checkpoint(path)
    assert payload["step"] == 3 and payload["optimizer"]["state"][0]["step"] == 1
    assert torch.equal(payload["rng"], rng) and payload["metrics"][0]["loss"] == 0.5


def _not_checkpoints(tmp_path):
    """Files found where a checkpoint was expected that are no torch file at all."""
    good = tmp_path / "good.pt"
    torch.save({"format": FORMAT, "kind": "classifier", "model_config": {}, "model": {"w": torch.zeros(64)}}, good)
    whole = good.read_bytes()
    files = {"random.pt": bytes(range(7, 256)) * 4, "truncated.pt": whole[: len(whole) // 2],
             "page.pt": b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
             "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return good, [tmp_path / name for name in files]


def test_a_file_that_is_no_torch_file_is_named_as_such(tmp_path):
    good, files = _not_checkpoints(tmp_path)
    assert load_checkpoint(good)["model"]["w"].shape == (64,)  # the control: the truncated one's whole
    for path in files:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"not a torch checkpoint: {path} ") and "\n" not in message, message
        assert "Python objects" not in message and "refused" not in message
    with pytest.raises(CheckpointError, match="truncated or damaged zip"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_checkpoint(tmp_path / "page.pt")


def test_every_row_of_the_readers_table_names_tests_that_exist():
    """docs/architecture.md, "What rcm reads, and how": each row names at least one test, and each named
    test function exists in the named file."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs/architecture.md").read_text()
    section = text[text.index("## What rcm reads, and how"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| file ")]
    assert len(rows) >= 10
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.rstrip(" |").rsplit(" | ", 1)[-1])
        assert named, f"no test named in: {row[:80]}"
        for file, name in named:
            assert re.search(rf"^def {name}\(", (root / "tests" / file).read_text(), re.M), f"{file}::{name}"
