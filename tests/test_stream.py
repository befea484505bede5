"""ImageNet streamed from a tree of JPEGs: `prepare` lists files, training decodes batches in
DataLoader workers, and memory does not grow with the training split."""

import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from rcm import distributed, loader, paths
from rcm.cli import main as cli
from rcm.data import FileSplit, Split, load_split, prepare
from rcm.errors import DatasetError
from rcm.loader import TrainBatches, eval_batches
from trees import CLASSES, write_tree

def reference(root, split, image_size):
    """torchvision's ImageFolder with the protocol's transform: what every row must decode to."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root / split), transform=transforms.Compose(
        [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
         transforms.PILToTensor()]))


def test_prepare_train_lists_files_and_decodes_as_imagefolder(tmp_path):
    root = write_tree(tmp_path / "imagenet", per_class=5)
    out = tmp_path / "results"
    assert cli(["prepare", "--part", "train", "--dataset", "imagenet", "--root", str(root), "--results", str(out),
                "--image_size", "32", "--val_fraction", "0.2"]) == 0
    assert not paths.prepared(out, "imagenet", "test").exists()
    train = load_split(paths.prepared(out, "imagenet", "train"))
    val = load_split(paths.prepared(out, "imagenet", "val"))
    assert isinstance(train, FileSplit) and isinstance(val, FileSplit)
    assert (len(train), len(val)) == (17, 4) and train.shape == (3, 32, 32) and train.classes == list(CLASSES)
    # the prepared file holds names, not pixels
    assert paths.prepared(out, "imagenet", "train").stat().st_size < 17 * 3 * 32 * 32
    manifest = json.loads(paths.train_manifest(out, "imagenet").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["splits"]["train"]["size"] == 17
    assert "streamed" in manifest["splits"]["train"] and manifest["validation"] == {"fraction": 0.2, "seed": 0}
    ref = reference(root, "train", 32)
    rows = torch.arange(len(train))
    images = torch.cat([x for x, _ in eval_batches(train, rows, batch_size=4)])
    for row, idx in enumerate(train.indices.tolist()):
        image, label = ref[idx]
        assert torch.equal((images[row] * 255).round().to(torch.uint8), image)
        assert int(train.labels[row]) == label and train.file(row) == str(
            paths.Path(ref.samples[idx][0]).relative_to(root))
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(21))


def test_train_and_val_class_lists_must_match(tmp_path):
    root = write_tree(tmp_path / "imagenet", per_class=2)
    (root / "val" / "n09999999").mkdir()
    Image.new("RGB", (40, 40)).save(root / "val" / "n09999999" / "a.JPEG")
    (root / "val" / CLASSES[1]).rename(root / "val" / "n01443538")
    with pytest.raises(DatasetError, match=r"different classes.*only in train/: n01443537.*"
                                           r"only in val/: n01443538, n09999999"):
        prepare("imagenet", tmp_path / "results", part="train", root=root, image_size=32)
    assert not paths.prepared(tmp_path / "results", "imagenet", "train").exists()


def test_prepare_test_reads_only_the_certification_subset(tmp_path):
    """With every model imported nothing trains: the test part needs no train/ folder, and decodes only
    every skip-th validation image; the manifest names each one's file and SHA-256."""
    root = write_tree(tmp_path / "imagenet", per_class=0, val_per_class=5)
    for path in (root / "train").rglob("*"):
        if path.is_file():
            path.unlink()
    for c in CLASSES:
        (root / "train" / c).rmdir()
    (root / "train").rmdir()
    # a file that cannot be decoded, where the subset does not look
    (root / "val" / CLASSES[0] / f"{CLASSES[0]}_00001.JPEG").write_bytes(b"not an image")
    out = tmp_path / "results"
    assert cli(["prepare", "--part", "test", "--dataset", "imagenet", "--root", str(root), "--results", str(out),
                "--image_size", "32", "--skip", "4"]) == 0
    test = load_split(paths.prepared(out, "imagenet", "test"))
    assert test.indices.tolist() == [0, 4, 8, 12, 16] and isinstance(test, Split)
    manifest = json.loads(paths.manifest(out, "imagenet").read_text())
    assert [e["idx"] for e in manifest["certification"]] == [0, 4, 8, 12, 16]
    for entry in manifest["certification"]:
        assert entry["sha256"] == hashlib.sha256((root / entry["file"]).read_bytes()).hexdigest()
    assert not paths.prepared(out, "imagenet", "train").exists()


def test_a_missing_file_is_named_also_from_a_worker(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "imagenet", per_class=3)
    prepare("imagenet", tmp_path / "results", part="train", root=root, image_size=32, val_fraction=0.25)
    train = load_split(paths.prepared(tmp_path / "results", "imagenet", "train"))
    (root / train.file(2)).unlink()
    message = f"^{root / train.file(2)} is missing: it was listed by `rcm prepare`; prepare again if the data set moved"
    with pytest.raises(DatasetError, match=message):
        train.float_images(torch.tensor([2]))
    monkeypatch.setattr(loader, "WORKERS", 1)  # the DataLoader's worker raises; the user reads the same message
    with pytest.raises(DatasetError, match=message):
        list(eval_batches(train))
    with pytest.raises(DatasetError, match=message):
        TrainBatches(train, len(train), seed=0)(0)


def _in_memory(split: FileSplit) -> Split:
    images = torch.stack([split.decode(r) for r in range(len(split))])
    return Split(images, split.labels, split.indices, 255.0, split.num_classes)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches_and_restart_at_any_step(tmp_path, monkeypatch, workers):
    root = write_tree(tmp_path / "imagenet", per_class=6)
    prepare("imagenet", tmp_path / "results", part="train", root=root, image_size=32, val_fraction=0.2)
    streamed = load_split(paths.prepared(tmp_path / "results", "imagenet", "train"))
    memory = _in_memory(streamed)
    monkeypatch.setattr(loader, "WORKERS", workers)
    a, b = TrainBatches(streamed, 8, seed=3), TrainBatches(memory, 8, seed=3)
    for step in [0, 1, 2, 3, 7, 8, 2]:          # 7 and the second 2: a resume restarts the stream there
        (xa, ya), (xb, yb) = a(step), b(step)
        assert xa.shape == (8, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a(2)[0].data_ptr() == a(2)[0].data_ptr()  # gradient-accumulation passes decode a step once
    x_eval = torch.cat([x for x, _ in eval_batches(streamed, batch_size=5)])
    assert torch.equal(x_eval, memory.float_images())


def test_each_process_decodes_only_its_share(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "imagenet", per_class=4)
    prepare("imagenet", tmp_path / "results", part="train", root=root, image_size=32, val_fraction=0.25)
    streamed = load_split(paths.prepared(tmp_path / "results", "imagenet", "train"))
    full = TrainBatches(streamed, 8, seed=0)(0)[0]
    decoded = []
    monkeypatch.setattr(FileSplit, "decode", lambda self, row: decoded.append(row) or torch.full((3, 32, 32), 255,
                                                                                                   dtype=torch.uint8))
    monkeypatch.setattr(loader, "WORKERS", 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    batches = TrainBatches(streamed, 8, seed=0)
    with distributed.part(1, 2):
        x, _ = batches(0)
    assert sorted(decoded) == sorted(batches.rows(0)[4:].tolist())   # rank 1 of 2: rows 4..7 only
    assert x.shape == (4, *full.shape[1:]) and (x == 1).all()        # and it holds those rows alone


def _peak_anonymous_kib(tmp_path, *args) -> int:
    """Peak anonymous resident memory (KiB: heap, tensors; RssAnon in /proc, sampled every 5 ms) of
    `python -m rcm ARGS`. Not the whole resident set: that also counts the pages of torch's shared
    libraries that the kernel happens to map in, which vary by tens of MB from run to run."""
    proc = subprocess.Popen([sys.executable, "-m", "rcm", "--threads", "1", "--workers", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    peak = 0
    while proc.poll() is None:
        try:
            status = (paths.Path("/proc") / str(proc.pid) / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max([peak] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")])
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return peak


@pytest.mark.slow
@pytest.mark.skipif(not paths.Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_memory_of_prepare_and_training_does_not_grow_with_the_training_split(tmp_path):
    """Two trees, 600 and 7 200 training images at 64 px, each with the same 120 held out for
    validation: decoded, the larger one's pixels would take 81 MB more as uint8 (324 MB more as floats).
    Listed and streamed, the peaks stay within the noise: 12 MB for `prepare`, 40 MB for training,
    whose peak varies by up to 30 MB between runs on the same files (torch's own allocations)."""
    peaks = {}
    for per_class, fraction in ((150, "0.2"), (1800, "0.0166667")):
        root = write_tree(tmp_path / f"tree{per_class}", per_class=per_class, size=(72, 76))
        results = str(tmp_path / f"results{per_class}")
        common = ["--dataset", "imagenet", "--results", results]
        prepare_peak = _peak_anonymous_kib(tmp_path, "prepare", "--part", "train", *common, "--root", str(root),
                                           "--image_size", "64", "--val_fraction", fraction)
        assert len(load_split(paths.prepared(results, "imagenet", "val"))) == 120
        train_peak = _peak_anonymous_kib(tmp_path, "train-classifier", *common, "--sigma", "0.25", "--width", "8",
                                         "--steps", "3", "--batch_size", "32", "--eval_every", "0", "--device", "cpu")
        peaks[per_class] = (prepare_peak, train_peak)
    print(f"\npeak anonymous memory, KiB (prepare, training) by images per class: {peaks}")
    (small_prepare, small_train), (large_prepare, large_train) = peaks[150], peaks[1800]
    assert abs(large_prepare - small_prepare) < 12 * 1024, peaks
    assert abs(large_train - small_train) < 40 * 1024, peaks
