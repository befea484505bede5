"""Datasets: the embedded default (scikit-learn digits), CIFAR-10 and ImageNet.

Every split holds images in [0, 1], shape (N, C, H, W), with int64 labels. The ``prepare`` stage
writes three splits as ``{split}.pt`` files and a manifest with sizes and checksums:

- ``val``: a seeded, class-stratified share of the source's training split (``val_fraction``), the
  only images any training-time evaluation or monitor looks at;
- ``train``: the rest of the source's training split;
- ``test``: the source's test split (ImageNet: the certification subset of the validation set), read
  only by certification.

Digits and CIFAR-10 are small: their splits hold the pixels (uint8, a scale, labels and the index of
each image in its source split; a ``Split``). ImageNet's train and val splits are *file lists* (a
``FileSplit``: the data root, each image's path under it, its label, and the class names): no pixel
of the training set is decoded by ``prepare``, and training decodes each batch's images as it needs
them, in DataLoader workers (``rcm.loader``). Its test split, the certification subset (every
``skip``-th validation image, at most ``max_images``), holds pixels, and the manifest records the
source file and SHA-256 of each of its images.

``prepare`` runs in two parts that the workflow schedules as two jobs: ``test`` (test.pt and
manifest.json) and ``train`` (train.pt, val.pt and train_manifest.json). When every model is
imported, nothing needs the train part, and ImageNet's training folder is never read.

Certification takes every ``skip``-th test image up to ``max`` images; the ``idx`` in a certificate
is the index in the test split.
"""

from __future__ import annotations

import functools
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rcm import paths
from rcm.atomic import atomic_path, write_text
from rcm.errors import DatasetError
from rcm.options import add_stage_options, from_args, option

DATASETS = paths.DATASETS
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@dataclass
class Split:
    """One prepared split. ``images`` holds raw integers; ``scale`` maps them to [0, 1]."""

    images: torch.Tensor   # (N, C, H, W) uint8
    labels: torch.Tensor   # (N,) int64
    indices: torch.Tensor  # (N,) int64, the index of each image in its original split
    scale: float
    num_classes: int
    sources: list[str] | None = None  # ImageNet's test split: each image's file under the data root

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def float_images(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images as float in [0, 1]; (N, C, H, W)."""
        x = self.images if rows is None else self.images[rows]
        return x.float() / self.scale

    def subset(self, rows: torch.Tensor) -> Split:
        return Split(self.images[rows], self.labels[rows], self.indices[rows], self.scale, self.num_classes)

    def certification_rows(self, skip: int, max_images: int | None) -> torch.Tensor:
        """Rows of every ``skip``-th image of the original split, at most ``max_images`` of them."""
        if skip < 1:
            raise DatasetError(f"skip must be >= 1, got {skip}")
        rows = torch.nonzero(self.indices % skip == 0).flatten()
        return rows if max_images is None else rows[:max_images]


@dataclass
class FileSplit:
    """A split streamed from image files: ``root / files[i]`` is image i, decoded by ``decode``.

    What it holds grows with the split only by a path and a label per image (about 70 bytes), never
    by pixels. The paths are one fixed-width bytes array, not a list of Python strings: DataLoader
    workers are forked, and reading a Python object in a worker writes its reference count, which
    would copy the pages of a 1.3-million-string list into every worker over an epoch.
    ``float_images`` decodes the rows asked for, in this process; training and evaluation go through
    ``rcm.loader``, which decodes in DataLoader workers.
    """

    root: str              # as configured (a relative root is relative to the working directory)
    files: np.ndarray      # paths relative to root, UTF-8 bytes, e.g. b'train/n01440764/n01440764_10026.JPEG'
    labels: torch.Tensor   # (N,) int64
    indices: torch.Tensor  # (N,) int64, the index of each image in its folder's sorted listing
    classes: list[str]     # class (folder) names; label c is classes[c]
    image_size: int
    scale: float = 255.0

    def __post_init__(self):
        if not isinstance(self.files, np.ndarray):  # a list of str, as listed or as saved
            self.files = np.asarray([f.encode() for f in self.files], dtype=bytes)

    def __len__(self) -> int:
        return len(self.labels)

    def file(self, row: int) -> str:
        """Image ``row``'s path under the root."""
        return self.files[row].decode()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def decode(self, row: int) -> torch.Tensor:
        """Image ``row`` as uint8 (3, image_size, image_size): the ImageNet protocol's resize and crop."""
        path = Path(self.root) / self.file(row)
        try:
            return imagenet_transform(self.image_size)(_open_rgb(path))
        except FileNotFoundError:
            raise DatasetError(f"{path} is missing: it was listed by `rcm prepare`; prepare again if the "
                               "data set moved or changed") from None
        except OSError as exc:
            raise DatasetError(f"{path} cannot be decoded: {exc}") from exc

    def float_images(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        wanted = range(len(self))[rows] if isinstance(rows, slice) else \
            range(len(self)) if rows is None else torch.as_tensor(rows).reshape(-1).tolist()
        if not len(wanted):
            return torch.zeros((0, *self.shape))
        return torch.stack([self.decode(int(r)) for r in wanted]).float() / self.scale

    def subset(self, rows: torch.Tensor) -> FileSplit:
        return FileSplit(self.root, self.files[rows.numpy()], self.labels[rows], self.indices[rows],
                         self.classes, self.image_size, self.scale)


@functools.lru_cache
def imagenet_transform(image_size: int):
    """Resize the shorter side to image_size * 256 / 224, centre-crop image_size, uint8 (C, H, W):
    Resize(256), CenterCrop(224) at the papers' 224."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                               transforms.CenterCrop(image_size), transforms.PILToTensor()])


def _open_rgb(path: Path):
    """An image file as an RGB PIL image (torchvision's ImageFolder loader: grey and CMYK converted)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


# ----------------------------------------------------------------------------- loading raw data

def _digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1 797 8x8 digits (pixel values 0..16), split by a seeded stratified shuffle."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    order = np.arange(len(images))
    train_rows, test_rows = train_test_split(order, test_size=test_fraction, random_state=seed,
                                             stratify=digits.target)
    rows = np.sort(train_rows if split == "train" else test_rows)
    return Split(torch.from_numpy(images[rows]), torch.from_numpy(digits.target[rows]).long(),
                 torch.arange(len(rows)), 16.0, 10)


def _cifar10(root: Path, split: str, download: bool, verify_checksums: bool) -> Split:
    """CIFAR-10 through torchvision's loader and its on-disk format (cifar-10-batches-py/)."""
    from torchvision.datasets import CIFAR10

    class _Cifar(CIFAR10):
        # torchvision verifies each batch file and the metadata against the official MD5s; a user may
        # turn that off (our tests write tiny batch files in the real pickle format, which cannot match).
        meta = CIFAR10.meta if verify_checksums else {**CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            if verify_checksums:
                return super()._check_integrity()
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name in CIFAR_FILES)

    base = root / "cifar-10-batches-py"
    try:
        with _download_lock(root, download):  # the two prepare jobs may start at once
            ds = _Cifar(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise DatasetError(
            f"CIFAR-10 not found or corrupted under {root}: expected {base}/ holding "
            f"{', '.join(CIFAR_FILES)} (torchvision's format; set data.download: true to fetch it, "
            f"or data.unverified: true for non-official files). torchvision said: {exc}"
        ) from exc
    except Exception as exc:  # malformed pickles and the like
        raise DatasetError(f"CIFAR-10 files under {base} are malformed: {type(exc).__name__}: {exc}") from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return Split(images, labels, torch.arange(len(labels)), 255.0, 10)


@contextmanager
def _download_lock(root: Path, download: bool):
    """An exclusive lock on ``root`` while torchvision may download into it."""
    if not download:
        yield
        return
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".rcm-download.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _split_folder(root: Path, split: str) -> Path:
    """ImageNet's class-per-folder directory of one split: root/train, or root/val for the test split."""
    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetError(f"ImageNet split not found: expected a class-per-folder directory {folder} "
                           f"(e.g. {folder}/n01440764/*.JPEG)")
    return folder


def _listed(root: Path, split: str, image_size: int) -> FileSplit:
    """Every image of one split as a file list, in torchvision ImageFolder's order and labels (the
    tree is listed, nothing decoded)."""
    from torchvision.datasets import ImageFolder

    folder = _split_folder(root, split)
    try:
        listing = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{folder} is not a class-per-folder image directory: {exc}") from exc
    if not listing.samples:
        raise DatasetError(f"no images found under {folder}")
    files = [str(Path(path).relative_to(root)) for path, _ in listing.samples]
    labels = torch.tensor([label for _, label in listing.samples], dtype=torch.long)
    return FileSplit(str(root), files, labels, torch.arange(len(files)), list(listing.classes), image_size)


def _imagenet_classes(root: Path, split: str) -> list[str]:
    """The class folders of one split, sorted (ImageFolder's labels), without listing their files."""
    from torchvision.datasets.folder import find_classes

    folder = _split_folder(root, split)
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as exc:
        raise DatasetError(f"{folder} is not a class-per-folder image directory: {exc}") from exc


def check_same_classes(train: list[str], val: list[str], root: Path) -> None:
    """Labels are indices into the sorted class folders: train/ and val/ must hold the same classes."""
    if train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))

    def some(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise DatasetError(
        f"{root}/train and {root}/val hold different classes ({len(train)} and {len(val)} folders), so a "
        f"label would name another class in each: "
        + "; ".join(part for part in (f"only in train/: {some(only_train)}" if only_train else "",
                                      f"only in val/: {some(only_val)}" if only_val else "") if part))


def _imagenet_train(root: Path, image_size: int) -> FileSplit:
    """The training split as a file list (nothing decoded); its classes must be val/'s."""
    train = _listed(root, "train", image_size)
    check_same_classes(train.classes, _imagenet_classes(root, "val"), root)
    return train


def _imagenet_test(root: Path, image_size: int, skip: int = 1, max_images: int | None = None) -> Split:
    """The certification subset of the validation split, decoded: every ``skip``-th image, at most
    ``max_images`` (the other images of val/ are listed, never read); ``sources`` names each row's file."""
    val = _listed(root, "test", image_size)
    wanted = list(range(0, len(val), skip)[:max_images])
    return Split(torch.stack([val.decode(r) for r in wanted]), val.labels[wanted], torch.tensor(wanted), 255.0,
                 val.num_classes, sources=[val.file(r) for r in wanted])


def load_raw(dataset: str, split: str, *, root: str | Path | None = None, download: bool = False,
             verify_checksums: bool = True, image_size: int = 224, skip: int = 1,
             max_images: int | None = None) -> Split | FileSplit:
    """Load one split straight from its source. ImageNet's train split is a file list; its test split
    keeps only the certification subset (every ``skip``-th image, at most ``max_images``)."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split '{split}' (train or test)")
    if dataset == "digits":
        return _digits(split)
    if root is None:
        raise DatasetError(f"dataset '{dataset}' needs data.root (the directory holding it)")
    root = Path(root)
    if not root.is_dir() and not (dataset == "cifar10" and download):
        raise DatasetError(f"dataset root {root} does not exist (dataset '{dataset}')")
    if dataset == "cifar10":
        return _cifar10(root, split, download, verify_checksums)
    if split == "train":
        return _imagenet_train(root, image_size)
    return _imagenet_test(root, image_size, skip, max_images)


def carve_validation(train: Split | FileSplit, fraction: float, seed: int):
    """(train without the validation images, validation): per class, a seeded random
    ``round(fraction * n_c)`` of its n_c images, so the validation set keeps the class balance.
    Only the labels are read: a file list is carved without decoding an image."""
    if not 0 < fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(train.labels).tolist():
        rows = torch.nonzero(train.labels == c).flatten()
        take = int(round(fraction * len(rows)))
        chosen.append(rows[torch.randperm(len(rows), generator=gen)[:take]])
    val_rows = torch.sort(torch.cat(chosen)).values
    if len(val_rows) == 0 or len(val_rows) == len(train):
        raise DatasetError(f"val_fraction {fraction} of {len(train)} training images leaves "
                           f"{len(val_rows)} for validation: choose a fraction that keeps both non-empty")
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_rows] = False
    return train.subset(torch.nonzero(keep).flatten()), train.subset(val_rows)


# ----------------------------------------------------------------------------- prepared files

def save_split(split: Split | FileSplit, path: Path) -> None:
    if isinstance(split, FileSplit):
        record = {"format": "files", "root": split.root, "files": [f.decode() for f in split.files],
                  "labels": split.labels,
                  "indices": split.indices, "classes": split.classes, "image_size": split.image_size,
                  "scale": split.scale}
    else:
        record = {"images": split.images, "labels": split.labels, "indices": split.indices,
                  "scale": split.scale, "num_classes": split.num_classes}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(record, f)  # through a file object: the same split gives the same bytes (DVC's hashes)


def load_split(path: str | Path) -> Split | FileSplit:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prepared data not found: {path} (run `rcm prepare` first)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("format") == "files":
            split = FileSplit(d["root"], list(d["files"]), d["labels"], d["indices"], list(d["classes"]),
                              int(d["image_size"]), float(d["scale"]))
        else:
            return Split(d["images"], d["labels"], d["indices"], float(d["scale"]), int(d["num_classes"]))
    except Exception as exc:
        raise DatasetError(f"prepared data {path} is unreadable: {type(exc).__name__}: {exc}") from exc
    if not Path(split.root).is_dir():
        raise DatasetError(f"{path} lists images under {split.root}, which does not exist (moved? "
                           "prepare again with data.root where the images are now)")
    return split


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PARTS = {"test": ("test",), "train": ("train", "val")}
# the source settings each part reads (a change to another one leaves that part's files as they are)
PART_SOURCE = {"test": ("root", "download", "verify_checksums", "image_size", "skip", "max_images"),
               "train": ("root", "download", "verify_checksums", "image_size")}


def _describe(split: Split | FileSplit, target: Path) -> dict:
    entry = {"size": len(split), "shape": list(split.shape), "file": target.name, "sha256": _sha256(target)}
    if isinstance(split, FileSplit):
        entry["streamed"] = f"a list of {len(split)} image files under {split.root}, decoded as training reads them"
    return entry


def prepare(dataset: str, out_root: str | Path, val_fraction: float = 0.1, val_seed: int = 0,
            part: str = "all", **source) -> dict:
    """Write one part of the prepared data under ``out_root`` and return its manifest:

    - ``test``: test.pt and manifest.json (ImageNet: the certification subset, with each image's source
      file and SHA-256);
    - ``train``: train.pt, val.pt (``carve_validation`` of the source's training split) and
      train_manifest.json;
    - ``all``: both (their manifests merged in the returned dict).
    """
    if part == "all":
        test = prepare(dataset, out_root, val_fraction, val_seed, "test", **source)
        train = prepare(dataset, out_root, val_fraction, val_seed, "train", **source)
        return {**test, **train, "splits": {**train["splits"], **test["splits"]}}
    if part not in PARTS:
        raise DatasetError(f"unknown part '{part}' (test, train or all)")
    src = {k: (str(v) if isinstance(v, Path) else v) for k, v in source.items() if k in PART_SOURCE[part]}
    manifest: dict = {"dataset": dataset, "source": src, "splits": {}}
    if part == "train":
        manifest["validation"] = {"fraction": val_fraction, "seed": val_seed}
        splits = dict(zip(("train", "val"),
                          carve_validation(load_raw(dataset, "train", **source), val_fraction, val_seed)))
    else:
        splits = {"test": load_raw(dataset, "test", **source)}
    for name, data in splits.items():
        target = paths.prepared(out_root, dataset, name)
        save_split(data, target)
        manifest["splits"][name] = _describe(data, target)
        manifest["num_classes"] = data.num_classes
        if isinstance(data, FileSplit):
            manifest["classes"] = data.classes
    test = splits.get("test")
    if test is not None and test.sources is not None:  # ImageNet: where each certified image comes from
        root = Path(source["root"])
        manifest["certification"] = [{"idx": int(i), "file": f, "label": int(y), "sha256": _sha256(root / f)}
                                     for i, f, y in zip(test.indices, test.sources, test.labels)]
    out = paths.manifest(out_root, dataset) if part == "test" else paths.train_manifest(out_root, dataset)
    write_text(out, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- CLI

@dataclass
class PrepareOptions:
    """Where the raw data is and how to read it (the `data` section of the config)."""

    root: str = option("", "directory holding the raw dataset (unused for digits)")
    download: bool = option(False, "let torchvision download CIFAR-10 into root")
    unverified: bool = option(False, "accept CIFAR-10 batch files whose MD5 is not the official one")
    image_size: int = option(224, "ImageNet: centre-crop size")
    skip: int = option(1, "ImageNet: keep every skip-th validation image (the certification subset)")
    max_images: int = option(0, "ImageNet: at most this many validation images (0: all)")
    val_fraction: float = option(0.1, "share of the training images held out (per class) as the "
                                      "validation split every training-time evaluation uses")
    val_seed: int = option(0, "seed of the validation split")


def add_arguments(p) -> None:
    add_stage_options(p, PrepareOptions)
    p.add_argument("--part", choices=["all", *PARTS], default="all",
                   help="test: the certification split (test.pt, manifest.json); train: the training and "
                        "validation splits (train.pt, val.pt, train_manifest.json); all: both (default)")


def main(args) -> None:
    o = from_args(PrepareOptions, args)
    source = {"root": o.root or None, "download": o.download, "verify_checksums": not o.unverified,
              "image_size": o.image_size, "skip": o.skip, "max_images": o.max_images or None}
    manifest = prepare(args.dataset, args.results, o.val_fraction, o.val_seed, args.part, **source)
    sizes = {k: v["size"] for k, v in manifest["splits"].items()}
    print(f"prepared {args.dataset}: {sizes}, {manifest['num_classes']} classes -> "
          f"{paths.data_dir(args.results, args.dataset)}")
