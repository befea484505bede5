"""Data sets: the digits default, and CIFAR-10 / ImageNet on tiny files in their real on-disk formats."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rcm import paths
from rcm.cli import main as cli
from rcm.data import CIFAR_FILES, load_raw, load_split, prepare
from rcm.errors import DatasetError


def test_digits_split_is_deterministic_stratified_and_in_unit_range():
    a, b = load_raw("digits", "test"), load_raw("digits", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    train = load_raw("digits", "train")
    assert len(a) + len(train) == 1797 and a.images.shape[1:] == (1, 8, 8)
    x = a.float_images()
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert torch.bincount(a.labels).min() >= 30  # every class in the test split
    assert torch.equal(a.indices, torch.arange(len(a)))


def test_prepare_writes_splits_and_manifest(tmp_path):
    manifest = prepare("digits", tmp_path)
    test_part = json.loads(paths.manifest(tmp_path, "digits").read_text())
    train_part = json.loads(paths.train_manifest(tmp_path, "digits").read_text())
    assert set(test_part["splits"]) == {"test"} and set(train_part["splits"]) == {"train", "val"}
    assert manifest == {**test_part, **train_part, "splits": {**train_part["splits"], **test_part["splits"]}}
    assert manifest["num_classes"] == 10 and "skip" not in train_part["source"]
    assert manifest["splits"]["test"]["size"] == 360 and len(manifest["splits"]["train"]["sha256"]) == 64
    test = load_split(paths.prepared(tmp_path, "digits", "test"))
    assert torch.equal(test.images, load_raw("digits", "test").images)


def test_validation_is_a_seeded_stratified_share_of_train(tmp_path):
    manifest = prepare("digits", tmp_path, val_fraction=0.1, val_seed=3)
    raw = load_raw("digits", "train")
    train = load_split(paths.prepared(tmp_path, "digits", "train"))
    val = load_split(paths.prepared(tmp_path, "digits", "val"))
    assert manifest["splits"]["val"]["size"] == len(val) and manifest["validation"] == {"fraction": 0.1, "seed": 3}
    # disjoint, together the whole training split, each image where it came from
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(len(raw)))
    assert torch.equal(val.images, raw.images[val.indices]) and torch.equal(val.labels, raw.labels[val.indices])
    # stratified: every class holds out round(10%) of its images
    for c in range(10):
        assert (val.labels == c).sum() == round(0.1 * (raw.labels == c).sum().item())
    for where, seed in (("again", 3), ("other", 4)):
        prepare("digits", tmp_path / where, val_fraction=0.1, val_seed=seed)
    held_out = {where: load_split(paths.prepared(tmp_path / where, "digits", "val")).indices.tolist()
                for where in ("again", "other")}
    assert held_out["again"] == val.indices.tolist() and held_out["other"] != val.indices.tolist()
    with pytest.raises(DatasetError, match="val_fraction"):
        prepare("digits", tmp_path / "bad", val_fraction=1.0)


def test_certification_subset_every_skip_th_up_to_max(tmp_path):
    prepare("digits", tmp_path)
    test = load_split(paths.prepared(tmp_path, "digits", "test"))
    rows = test.certification_rows(skip=20, max_images=5)
    assert test.indices[rows].tolist() == [0, 20, 40, 60, 80]
    assert len(test.certification_rows(20, None)) == 18


def _write_cifar(root, n_train=6, n_test=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        if name == "batches.meta":
            payload = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
        else:
            n = n_test if name == "test_batch" else n_train
            payload = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                       "labels": rng.integers(0, 10, n).tolist(), "batch_label": name}
        with open(base / name, "wb") as f:
            pickle.dump(payload, f)
    return base


def test_cifar10_from_files_in_the_real_format(tmp_path):
    base = _write_cifar(tmp_path / "raw")
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f)
    test = load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)
    train = load_raw("cifar10", "train", root=tmp_path / "raw", verify_checksums=False)
    assert len(train) == 30 and len(test) == 4 and test.images.shape[1:] == (3, 32, 32)
    # the row-major 3072 bytes are R plane, G plane, B plane of a 32x32 image
    assert torch.equal(test.images[1], torch.from_numpy(raw["data"][1].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw["labels"]
    assert test.float_images().max() <= 1.0


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    _write_cifar(tmp_path / "raw")
    with pytest.raises(DatasetError, match="not found or corrupted"):
        load_raw("cifar10", "test", root=tmp_path / "raw")


def test_cifar10_missing_root_and_missing_files(tmp_path, capsys):
    assert cli(["prepare", "--dataset", "cifar10", "--root", str(tmp_path / "nope"),
                "--results", str(tmp_path)]) == 2
    assert f"dataset root {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_raw("cifar10", "train", root=tmp_path / "empty", verify_checksums=False)


def test_cifar10_malformed_batch(tmp_path):
    base = _write_cifar(tmp_path / "raw")
    (base / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="malformed"):
        load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)


def _write_imagenet(root, classes=("n01440764", "n01443537", "n01484850"), per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{split}_{c}_{i}.JPEG", format="JPEG")
    # one grayscale image, as ImageNet has a few
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(
        root / "val" / classes[0] / "val_gray.JPEG", format="JPEG")


def test_imagenet_class_per_folder(tmp_path):
    _write_imagenet(tmp_path / "imagenet")
    out = tmp_path / "results"
    assert cli(["prepare", "--dataset", "imagenet", "--root", str(tmp_path / "imagenet"),
                "--image_size", "32", "--skip", "2", "--val_fraction", "0.4", "--results", str(out)]) == 0
    test = load_split(paths.prepared(out, "imagenet", "test"))
    assert test.num_classes == 3 and test.images.shape[1:] == (3, 32, 32)
    assert test.indices.tolist() == [0, 2, 4, 6, 8]  # 10 validation images, every 2nd
    assert test.labels.tolist() == [0, 0, 1, 1, 2]  # ImageFolder sorts files within a class
    assert test.certification_rows(skip=2, max_images=None).tolist() == [0, 1, 2, 3, 4]
    train = load_split(paths.prepared(out, "imagenet", "train"))
    val = load_split(paths.prepared(out, "imagenet", "val"))
    assert (len(train), len(val)) == (6, 3) and sorted(val.labels.tolist()) == [0, 1, 2]  # one per class
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(9))  # held out of train


def test_imagenet_missing_split_folder(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="class-per-folder directory .*val"):
        load_raw("imagenet", "test", root=tmp_path / "imagenet")


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_raw("mnist", "test")


def test_imagenet_protocol_is_every_100th_validation_image_resized_256_and_centre_cropped_224(tmp_path):
    """The papers' ImageNet protocol, as config/imagenet.yaml sets it: torchvision's Resize(256) (shorter
    side, bilinear) then CenterCrop(224) of every 100th validation image in ImageFolder order."""
    import yaml
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    preset = yaml.safe_load((paths.Path(__file__).resolve().parents[1] / "config/imagenet.yaml").read_text())
    assert preset["data"]["image_size"] == 224 and preset["data"]["skip"] == 100
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 2), ("val", 70)):
        for c in ("n01440764", "n01443537", "n01484850"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = (30 + i % 7, 41) if i % 2 else (52, 33 + i % 5)   # landscape and portrait
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i:03d}.JPEG", format="JPEG")
    out = tmp_path / "results"
    assert cli(["prepare", "--dataset", "imagenet", "--root", str(root), "--results", str(out),
                "--image_size", str(preset["data"]["image_size"]), "--skip", str(preset["data"]["skip"]),
                "--max_images", "500", "--val_fraction", "0.5"]) == 0
    test = load_split(paths.prepared(out, "imagenet", "test"))
    assert test.indices.tolist() == [0, 100, 200] and test.images.shape[1:] == (3, 224, 224)
    reference = ImageFolder(str(root / "val"), transform=transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()]))
    for row, idx in enumerate(test.indices.tolist()):
        image, label = reference[idx]
        assert torch.equal(test.images[row], image) and int(test.labels[row]) == label


def test_preparing_again_writes_the_same_bytes(tmp_path):
    """DVC compares contents: a prepare stage that reruns (another data key changed) must write the
    same files, or everything downstream would rerun."""
    first, second = prepare("digits", tmp_path / "a"), prepare("digits", tmp_path / "b")
    assert {k: v["sha256"] for k, v in first["splits"].items()} == {k: v["sha256"] for k, v in second["splits"].items()}
