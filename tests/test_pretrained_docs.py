"""docs/pretrained.md's by-hand section, run exactly as printed: the commands of the block after the
marker comment, in a fresh folder holding CIFAR-10's `cifar-10-batches-py/` and Cohen et al.'s
`checkpoint.pth.tar` in their real on-disk formats (random contents: the MD5 sums rcm checks are the
stand-ins', as if they were the official files)."""

from __future__ import annotations

import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from rcm.cli import main as cli
from rcm.paths import CIFAR_FILES

DOC = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"
MARKER = "<!-- by hand: tests/test_pretrained_docs.py runs the commands of the next block -->"


def by_hand_commands() -> list[list[str]]:
    """The marked block's commands, continuation lines joined, each as argv after `rcm`."""
    text = DOC.read_text()
    assert MARKER in text, "docs/pretrained.md lost its by-hand block"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(c[0] == "rcm" for c in commands), commands
    return [c[1:] for c in commands]


def write_cifar10(base: Path, n_test: int = 10_000) -> None:
    """`cifar-10-batches-py/` as the official archive unpacks it: Python pickles of dicts with str keys,
    uint8 rows of 3072 bytes (R, G, B planes of 32 x 32), int labels."""
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        if name == "batches.meta":
            payload = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 10_000,
                       "num_vis": 3072}
        else:
            n = n_test if name == "test_batch" else 10
            payload = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                       "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                       "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.slow
def test_the_by_hand_section_runs_as_written(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    from rcm.models.cohen import CohenClassifier
    from test_import import _cohen_file, _randomise

    monkeypatch.chdir(tmp_path)
    commands = by_hand_commands()
    root = Path(commands[0][commands[0].index("--root") + 1])
    write_cifar10(root / "cifar-10-batches-py")
    sums = {name: calculate_md5(str(root / "cifar-10-batches-py" / name)) for name in CIFAR_FILES}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, sums[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, sums[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums["batches.meta"]})
    source = Path(commands[1][commands[1].index("cohen") + 1])
    source.parent.mkdir(parents=True)
    _cohen_file(source, "cifar_resnet110", _randomise(CohenClassifier(arch="cifar_resnet110").net))

    printed = []
    for argv in commands:
        assert cli(argv) == 0, argv
        printed.append(capsys.readouterr())
    # the import prints the certify command that the section runs next (less its protocol flags)
    certify = " ".join(commands[2])
    suggested = re.search(r"certify with it: rcm (.*)", printed[1].out).group(1)
    assert certify.startswith(suggested), (suggested, certify)
    report = Path("results/cifar10/report")
    assert (report / "certified_accuracy.md").is_file() and (report / "certified_accuracy.png").is_file()
    certificate = Path(commands[3][1])
    rows = certificate.read_text().splitlines()
    assert len(rows) == 1 + 3 and "classifier=cohen_cifar10_0.25.pt@" in rows[1]
    assert not Path("results/cifar10/models").exists()          # nothing copied under the results root


@pytest.mark.slow
def test_the_cohen_preset_with_cpu_small_runs_on_a_cpu(tmp_path):
    """docs/pretrained.md's stack for Cohen et al.'s ResNet-110s, `config/cpu-small.yaml` last, on one
    sigma (the one key changed; the preset's other pretrained_noisy entries are ignored), through the
    workflow, on CIFAR-10 batches and a checkpoint.pth.tar in the real formats (stand-ins, hence
    data.unverified), to a report."""
    import yaml

    from rcm.models.cohen import CohenClassifier
    from test_import import _cohen_file, _randomise
    from test_workflow import make_copy, snakemake, tail

    stack = ["config/cifar10.yaml", "config/cifar10-cohen.yaml", "config/cpu-small.yaml"]
    assert f"--configfile {' '.join(stack)}" in DOC.read_text()           # the stack the docs show
    repo = make_copy(tmp_path / "repo", config="config/config.yaml")
    preset = yaml.safe_load((repo / "config/cifar10-cohen.yaml").read_text())
    root = yaml.safe_load((repo / "config/cifar10.yaml").read_text())["data"]["root"]
    write_cifar10(repo / root / "cifar-10-batches-py", n_test=5000)
    (entry,) = [e for e in preset["classifier"]["pretrained_noisy"] if e.startswith("0.25=")]
    source = repo / entry.split("=", 1)[1]
    source.parent.mkdir(parents=True)
    _cohen_file(source, "cifar_resnet110", _randomise(CohenClassifier(arch="cifar_resnet110").net))
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"sigmas": [0.25], "data": {"unverified": True}}))
    r = snakemake(repo, "--cores", "2", "--configfile", *stack, str(mine))
    assert r.returncode == 0, tail(r, 6000)
    assert "ignoring the entries for sigma 0.12, 0.5, 1.0" in r.stdout + r.stderr
    results = repo / "results-cpu-small/cifar10"
    rows = (results / "certify/gaussian/sigma_0.25/shard_0-of-1.tsv").read_text().splitlines()
    assert len(rows) == 1 + 5
    assert (results / "report/certified_accuracy.md").is_file()
    log = (results / "logs/import_classifier/sigma_0.25.log").read_text()
    assert "fit check of" in log and ": passed" in log
