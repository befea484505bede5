"""Datasets: the embedded default (scikit-learn digits), CIFAR-10 and ImageNet.

Every split is a float tensor of images in [0, 1], shape (N, C, H, W), with int64 labels. The
``prepare`` stage writes the splits as ``{split}.pt`` files (uint8 pixels, a scale, labels and the
index of each image in its source split) and a manifest with sizes and checksums:

- ``val``: a seeded, class-stratified share of the source's training split (``val_fraction``), the
  only images any training-time evaluation or monitor looks at;
- ``train``: the rest of the source's training split;
- ``test``: the source's test split (ImageNet: the validation subset), read only by certification.

Certification takes every ``skip``-th test image up to ``max`` images; the ``idx`` in a certificate
is the index in the test split.
"""

from __future__ import annotations

import hashlib
import json
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

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images as float in [0, 1]; (N, C, H, W)."""
        x = self.images if rows is None else self.images[rows]
        return x.float() / self.scale

    def certification_rows(self, skip: int, max_images: int | None) -> torch.Tensor:
        """Rows of every ``skip``-th image of the original split, at most ``max_images`` of them."""
        if skip < 1:
            raise DatasetError(f"skip must be >= 1, got {skip}")
        rows = torch.nonzero(self.indices % skip == 0).flatten()
        return rows if max_images is None else rows[:max_images]


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


def _imagenet(root: Path, split: str, image_size: int, skip: int = 1,
              max_images: int | None = None) -> Split:
    """A class-per-folder directory (``root/train``, ``root/val``) as torchvision's ImageFolder reads it.

    Images are resized (shorter side image_size * 256/224) and centre-cropped to image_size. For the
    validation split only every ``skip``-th image (at most ``max_images``) is decoded, so preparing
    the 500-image certification subset of the 50 000-image validation set does not decode the rest.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetError(f"ImageNet split not found: expected a class-per-folder directory {folder} "
                           f"(e.g. {folder}/n01440764/*.JPEG)")
    tf = transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                             transforms.CenterCrop(image_size), transforms.PILToTensor()])
    try:
        ds = ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{folder} is not a class-per-folder image directory: {exc}") from exc
    wanted = range(len(ds)) if split == "train" else range(0, len(ds), skip)[:max_images]
    images, labels = [], []
    for r in wanted:  # decoding is per file by nature; this is data preparation, not a hot path
        img, label = ds[r]
        images.append(img.expand(3, -1, -1) if img.shape[0] == 1 else img)
        labels.append(label)
    if not images:
        raise DatasetError(f"no images found under {folder}")
    return Split(torch.stack(images), torch.tensor(labels), torch.tensor(list(wanted)), 255.0,
                 len(ds.classes))


def load_raw(dataset: str, split: str, *, root: str | Path | None = None, download: bool = False,
             verify_checksums: bool = True, image_size: int = 224, skip: int = 1,
             max_images: int | None = None) -> Split:
    """Load one split straight from its source. ImageNet's test split keeps only the
    certification subset (every ``skip``-th image, at most ``max_images``)."""
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
    return _imagenet(root, split, image_size, skip, max_images)


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train without the validation images, validation): per class, a seeded random
    ``round(fraction * n_c)`` of its n_c images, so the validation set keeps the class balance."""
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

    def part(rows):
        return Split(train.images[rows], train.labels[rows], train.indices[rows], train.scale, train.num_classes)
    return part(torch.nonzero(keep).flatten()), part(val_rows)


# ----------------------------------------------------------------------------- prepared files

def save_split(split: Split, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({"images": split.images, "labels": split.labels, "indices": split.indices,
                    "scale": split.scale, "num_classes": split.num_classes}, tmp)


def load_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prepared data not found: {path} (run `rcm prepare` first)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return Split(d["images"], d["labels"], d["indices"], float(d["scale"]), int(d["num_classes"]))
    except Exception as exc:
        raise DatasetError(f"prepared data {path} is unreadable: {type(exc).__name__}: {exc}") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(dataset: str, out_root: str | Path, val_fraction: float = 0.1, val_seed: int = 0,
            **source) -> dict:
    """Write train.pt, val.pt, test.pt and manifest.json for ``dataset`` under ``out_root`` (val:
    ``carve_validation`` of the source's training split); return the manifest."""
    src = {k: (str(v) if isinstance(v, Path) else v) for k, v in source.items()}
    manifest = {"dataset": dataset, "source": src, "validation": {"fraction": val_fraction, "seed": val_seed},
                "splits": {}}
    train, val = carve_validation(load_raw(dataset, "train", **source), val_fraction, val_seed)
    for split, data in (("train", train), ("val", val), ("test", None)):
        data = load_raw(dataset, "test", **source) if data is None else data
        target = paths.prepared(out_root, dataset, split)
        save_split(data, target)
        manifest["splits"][split] = {"size": len(data), "shape": list(data.images.shape[1:]),
                                     "file": target.name, "sha256": _sha256(target)}
        manifest["num_classes"] = data.num_classes
    write_text(paths.manifest(out_root, dataset), json.dumps(manifest, indent=2) + "\n")
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


def main(args) -> None:
    o = from_args(PrepareOptions, args)
    source = {"root": o.root or None, "download": o.download, "verify_checksums": not o.unverified,
              "image_size": o.image_size, "skip": o.skip, "max_images": o.max_images or None}
    manifest = prepare(args.dataset, args.results, o.val_fraction, o.val_seed, **source)
    sizes = {k: v["size"] for k, v in manifest["splits"].items()}
    print(f"prepared {args.dataset}: {sizes}, {manifest['num_classes']} classes -> "
          f"{paths.data_dir(args.results, args.dataset)}")
