"""Data sets: the digits default, and CIFAR-10 / ImageNet on tiny files in their real on-disk formats."""

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crafted import RunsCode, crafted_pickle, runs_when_unpickled
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


def _python2_batch(data, labels, batch_label):
    """A batch pickled as the official files are: Python 2's cPickle (protocol 2) with NumPy 1.x, so
    str are 8-bit strings (read back with encoding='latin1') and the array names numpy.core.multiarray."""
    text = lambda b: b"T" + struct.pack("<i", len(b)) + b  # noqa: E731  BINSTRING, Python 2's str
    num = lambda n: b"J" + struct.pack("<i", n)  # noqa: E731  BININT
    dtype = (b"cnumpy\ndtype\n" + text(b"u1") + num(0) + num(1) + b"\x87R(" + num(3) + text(b"|") + b"NNN"
             + num(-1) + num(-1) + num(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85" + text(b"b") + b"\x87R("
             + num(1) + num(data.shape[0]) + num(data.shape[1]) + b"\x86" + dtype + b"\x89" + text(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + text(b"data") + array + text(b"labels") + b"](" + b"".join(num(y) for y in labels)
            + b"e" + text(b"batch_label") + text(batch_label.encode()) + b"u.")


def test_cifar10_reads_the_official_python2_pickles(tmp_path):
    """The official files' own format (Python 2 pickles, numpy.core) reads as plain unpickling reads it."""
    base = _write_cifar(tmp_path / "raw")
    data = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    (base / "test_batch").write_bytes(_python2_batch(data, [7, 0, 9], "testing batch 1 of 1"))
    with open(base / "test_batch", "rb") as f:
        plain = pickle.load(f, encoding="latin1")  # torchvision's reading, the reference
    assert plain["labels"] == [7, 0, 9] and np.array_equal(plain["data"], data)
    test = load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)
    assert torch.equal(test.images, torch.from_numpy(data.reshape(3, 3, 32, 32))) and test.labels.tolist() == [7, 0, 9]


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar10_stand_ins_pickled_by_python3_read(tmp_path, protocol):
    base = _write_cifar(tmp_path / "raw")
    images = np.random.default_rng(4).integers(0, 256, (2, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": images, "labels": [1, 2]}, f, protocol=protocol)
    test = load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)
    assert torch.equal(test.images.reshape(2, -1), torch.from_numpy(images)) and test.labels.tolist() == [1, 2]


def test_python3_protocol_2_names_codecs_encode_and_is_refused(tmp_path):
    base = _write_cifar(tmp_path / "raw")
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match="needs the Python global _codecs.encode"):
        load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)


def write_crafted_cifar(root, marker):
    """A CIFAR-10 tree whose test_batch also holds an object that runs a command when unpickled."""
    base = _write_cifar(root)
    with open(base / "test_batch", "rb") as f:
        batch = pickle.load(f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({**batch, "extra": RunsCode(marker)}, f)
    return base / "test_batch"


def test_the_crafted_batch_does_run_code_when_unpickled(tmp_path):
    """The control: torchvision's reading of a batch (pickle.load, encoding='latin1') runs the payload."""
    marker = tmp_path / "ran"
    crafted = write_crafted_cifar(tmp_path / "raw", marker)
    with open(crafted, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert marker.exists() and "data" in entry


@pytest.mark.parametrize("unverified", [True, False])
def test_prepare_refuses_a_crafted_batch_before_it_runs(tmp_path, capsys, monkeypatch, unverified):
    """`rcm prepare` reads CIFAR-10 through the restricted unpickler, MD5s checked or not: one line naming
    the file and the global, the payload never run, nothing written. With MD5s checked, the official
    sums are swapped for the crafted files' own (as if a copy matched them), so that the reading itself
    is what is tested."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    marker, out = tmp_path / "ran", tmp_path / "results"
    crafted = write_crafted_cifar(tmp_path / "raw", marker)
    flags = ["--unverified"] if unverified else []
    if not unverified:
        sums = {name: calculate_md5(str(crafted.parent / name)) for name in CIFAR_FILES}
        assert cli(["prepare", "--dataset", "cifar10", "--root", str(tmp_path / "raw"), "--part", "test",
                    "--results", str(out)]) == 2  # the official sums: refused on them
        assert "not the official files (their MD5 differs)" in capsys.readouterr().err
        monkeypatch.setattr(CIFAR10, "train_list", [[n, sums[n]] for n, _ in CIFAR10.train_list])
        monkeypatch.setattr(CIFAR10, "test_list", [[n, sums[n]] for n, _ in CIFAR10.test_list])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums["batches.meta"]})
    rc = cli(["prepare", "--dataset", "cifar10", "--root", str(tmp_path / "raw"), "--part", "test",
              "--results", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{crafted} refused before any of it ran" in err and "posix.system" in err, err
    assert not marker.exists() and not out.exists()


def test_a_batch_with_other_keys_names_the_keys_found_and_expected(tmp_path):
    base = _write_cifar(tmp_path / "raw")
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"images": images, "targets": [1, 2, 3, 4]}, f)
    with pytest.raises(DatasetError, match=r"test_batch is malformed: its keys are 'images', 'targets'; "
                                           r"expected 'data' .* and 'labels'"):
        load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)


def test_a_batch_with_bytes_keys_reads_as_str_keys(tmp_path):
    """A copy loaded with encoding='bytes' and pickled again by Python 3 has b'data', b'labels': torchvision
    (entry['data']) fails on it; rcm decodes the keys."""
    base = _write_cifar(tmp_path / "raw")
    images = np.random.default_rng(3).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing", b"data": images, b"labels": [5, 6, 7, 8]}, f)
    with open(base / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert "data" not in entry and b"data" in entry  # the control: torchvision's entry["data"] is a KeyError
    test = load_raw("cifar10", "test", root=tmp_path / "raw", verify_checksums=False)
    assert test.labels.tolist() == [5, 6, 7, 8] and torch.equal(test.images, torch.from_numpy(images.reshape(4, 3, 32, 32)))


def test_a_root_that_is_the_batches_folder_itself_is_named(tmp_path):
    base = _write_cifar(tmp_path / "raw")
    with pytest.raises(DatasetError, match="data.root points at the cifar-10-batches-py folder itself; "
                                           "set it to its parent"):
        load_raw("cifar10", "test", root=base, verify_checksums=False)
    assert len(load_raw("cifar10", "test", root=base.parent, verify_checksums=False)) == 4  # its parent reads


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


def test_a_crafted_prepared_split_is_refused_before_it_runs(tmp_path, digits_results):
    """A test.pt that is not what prepare wrote (a co-author's, a DVC remote's) is read with
    torch.load(weights_only=True): refused in one line, its payload never run."""
    marker, target = tmp_path / "ran", paths.prepared(digits_results, "digits", "test")
    torch.save({"images": torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "x": RunsCode(marker)}, target)
    with pytest.raises(DatasetError) as err:
        load_split(target)
    assert str(target) in str(err.value) and "refused before any of it ran" in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()
    torch.load(target, weights_only=False)  # the control: the file is live
    assert marker.exists()


def test_imagenet_a_pickle_saved_as_a_jpeg_is_not_run(tmp_path):
    """ImageNet's images are decoded by PIL, which reads image formats only: a pickle named .JPEG is
    a file that cannot be decoded, never unpickled."""
    root, marker = tmp_path / "imagenet", tmp_path / "ran"
    _write_imagenet(root)
    crafted = root / "val" / "n01440764" / "val_n01440764_0.JPEG"
    crafted.write_bytes(crafted_pickle(marker))
    with pytest.raises(DatasetError, match=f"{crafted} cannot be decoded"):
        load_raw("imagenet", "test", root=root, image_size=32)
    assert not marker.exists()
    assert runs_when_unpickled(crafted, marker)  # the control: the file is live


def test_imagenet_a_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch):
    """PIL refuses an image of more than twice MAX_IMAGE_PIXELS (DecompressionBombError, not an OSError):
    named like any image that cannot be decoded. The limit is lowered so the tiny test images are bombs."""
    root = tmp_path / "imagenet"
    _write_imagenet(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match=r"\.JPEG cannot be decoded: Image size .* decompression bomb"):
        load_raw("imagenet", "test", root=root, image_size=32)


def test_cifar10_download_fetches_only_what_is_missing(tmp_path, monkeypatch):
    """data.download: torchvision's archive is fetched (here: a stand-in writer) when a file is missing,
    and not again once the files are there; what it fetched is read like any other copy."""
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        _write_cifar(Path(root))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    first = load_raw("cifar10", "test", root=tmp_path / "raw", download=True, verify_checksums=False)
    again = load_raw("cifar10", "test", root=tmp_path / "raw", download=True, verify_checksums=False)
    assert [c[1] for c in calls] == ["cifar-10-python.tar.gz"] and torch.equal(first.images, again.images)
