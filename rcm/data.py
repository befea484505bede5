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

CIFAR-10's batch files (Python pickles) are read by ``read_cifar_file``, an unpickler that builds numpy
arrays and plain containers and refuses any other object a file names before anything in it runs,
whether or not their MD5s were checked; torchvision's format, MD5 check and download are kept.

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
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rcm import paths
from rcm.atomic import atomic_path, write_text
from rcm.errors import CheckpointError, DatasetError
from rcm.options import add_stage_options, from_args, option

DATASETS = paths.DATASETS
CIFAR_FILES = paths.CIFAR_FILES


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
        except (OSError, _DecompressionBomb) as exc:  # not an image (PIL never runs a file), or a bomb
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


try:
    from PIL.Image import DecompressionBombError as _DecompressionBomb
except ImportError:  # an old Pillow
    _DecompressionBomb = OSError


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


# ----------------------------------------------------------------------------- CIFAR-10 batch files
#
# The official cifar-10-batches-py/ files are Python 2 pickles of dicts holding a numpy uint8 array
# ('data', N x 3072), a list of int ('labels'), str and lists of str. torchvision reads them with a
# bare pickle.load, which would run whatever a crafted file names; rcm reads them itself, through an
# unpickler that resolves only the globals numpy's array pickles name (below) and refuses every other
# one before the file's objects are built. The on-disk format, the MD5 check (unless data.unverified)
# and torchvision's download are kept. A stand-in written by Python 3 reads with pickle protocol 3 or
# above (pickle.dump's default is 4); protocols 0-2 spell Python 3 bytes as a call of _codecs.encode,
# which is refused like any other global.


def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for the globals a numpy array's pickle names: ``_reconstruct``,
    ``ndarray`` and ``dtype`` (Python 2's protocol 2 and Python 3's 3 and 4; the official files spell
    the module numpy.core, NumPy 2 numpy._core) and ``_frombuffer`` (protocol 5). Each maps to
    numpy's own object, taken from what an array's pickle hands over, so nothing is imported by the
    name a file gives."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct, frombuffer = probe.__reduce__()[0], probe.__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class BlockedGlobal(pickle.UnpicklingError):
    """A pickle names a global that a CIFAR-10 batch never holds."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler of numpy arrays, dicts, lists, str, bytes and numbers: any other global is
    refused when the stream names it, before it is looked up (so before anything in the file runs)."""

    allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise BlockedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id, which a CIFAR-10 batch never holds")


def read_cifar_file(path: Path) -> dict:
    """One file of cifar-10-batches-py/ as a dict with str keys, read through ``_BatchUnpickler``
    (encoding='latin1', as torchvision reads the Python 2 pickles). Bytes keys (b'data', as a file
    loaded with encoding='bytes' and pickled again by Python 3 has them) are decoded to str; a crafted
    file is refused with one line naming it and the global it needs."""
    try:
        with open(path, "rb") as f:
            payload = _BatchUnpickler(f, encoding="latin1").load()
    except BlockedGlobal as exc:
        raise DatasetError(
            f"{path} refused before any of it ran: it needs the Python global {exc.module}.{exc.name}, "
            "and a CIFAR-10 batch holds only numpy arrays, lists, dicts, str, bytes and numbers (rcm never "
            "unpickles other objects, which can run code)") from None
    except Exception as exc:  # not a pickle, truncated, a numpy array that does not rebuild...
        raise DatasetError(f"CIFAR-10 file {path} is malformed: not a readable pickle "
                           f"({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise DatasetError(f"CIFAR-10 file {path} is malformed: it holds a {type(payload).__name__}, "
                           "not a dict")
    out: dict = {}
    for key, value in payload.items():
        text = key.decode("latin1") if isinstance(key, bytes) else key
        if text in out:
            raise DatasetError(f"CIFAR-10 file {path} is malformed: it holds the key '{text}' twice "
                               f"(as str and as bytes)")
        out[text] = value
    return out


def _malformed(path: Path, payload: dict, expected: str) -> DatasetError:
    found = ", ".join(repr(k) for k in payload) or "none"
    return DatasetError(f"CIFAR-10 file {path} is malformed: its keys are {found}; expected {expected} "
                        "(str keys, as torchvision and rcm read the official files; bytes keys such as "
                        "b'data' are read as the same str)")


BATCH_KEYS = "'data' (N x 3072 uint8 array) and 'labels' (N class indices 0..9)"


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A data_batch_k / test_batch file's (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    d = read_cifar_file(path)
    if "data" not in d or "labels" not in d:
        raise _malformed(path, d, BATCH_KEYS)
    data, labels = d["data"], d["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise DatasetError(f"CIFAR-10 file {path} is malformed: 'data' is {what}; expected an N x 3072 "
                           "uint8 array (R, G and B planes of a 32x32 image per row)")
    try:
        labels = np.asarray(labels)
        ok = labels.shape == (len(data),) and labels.dtype.kind in "iu" and ((labels >= 0) & (labels < 10)).all()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"CIFAR-10 file {path} is malformed: 'labels' must be {len(data)} class "
                           "indices in 0..9, one per row of 'data'")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_missing(root: Path, base: Path, verify_checksums: bool) -> list[str]:
    """The files of cifar-10-batches-py/ that are absent or, when verifying, not the official ones."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    md5 = dict(CIFAR10.train_list + CIFAR10.test_list)
    md5[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return [name for name in CIFAR_FILES
            if not check_integrity(str(base / name), md5[name] if verify_checksums else None)]


def _cifar10(root: Path, split: str, download: bool, verify_checksums: bool) -> Split:
    """CIFAR-10 in torchvision's on-disk format (cifar-10-batches-py/), each file checked against the
    official MD5 unless ``verify_checksums`` is off, and read by ``read_cifar_file`` (never
    torchvision's pickle.load)."""
    from torchvision.datasets import CIFAR10

    base = root / CIFAR10.base_folder
    with _download_lock(root, download):  # the two prepare jobs may start at once
        bad = _cifar_missing(root, base, verify_checksums)
        if bad and download:
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                             md5=CIFAR10.tgz_md5)
            except (OSError, RuntimeError) as exc:
                raise DatasetError(f"CIFAR-10 download into {root} failed: {type(exc).__name__}: {exc}") from exc
            bad = _cifar_missing(root, base, verify_checksums)
    if bad:
        absent = [name for name in bad if not (base / name).is_file()]
        if not base.is_dir():
            what = f"{base}/ does not exist"
            if any((root / name).is_file() for name in CIFAR_FILES):
                what += (f"; {root} itself holds CIFAR-10 batch files: data.root points at the "
                         f"cifar-10-batches-py folder itself; set it to its parent")
        elif absent:
            what = f"{base}/ lacks {', '.join(absent)}"
        else:
            what = f"{', '.join(bad)} under {base}/ are not the official files (their MD5 differs)"
        raise DatasetError(
            f"CIFAR-10 not found or corrupted under {root}: {what}. Expected {base}/ holding "
            f"{', '.join(CIFAR_FILES)} (torchvision's format; set data.download: true to fetch it, "
            f"or data.unverified: true for non-official files)")
    meta = read_cifar_file(base / CIFAR10.meta["filename"])
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise _malformed(base / CIFAR10.meta["filename"], meta, "'label_names' (the 10 class names)")
    files = [name for name, _ in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]
    batches = [_cifar_batch(base / name) for name in files]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([b[0] for b in batches])))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
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
    from rcm.checkpoint import load_weights

    try:
        d = load_weights(path)  # tensors and plain containers only; a crafted file is refused unrun
    except CheckpointError as exc:
        raise DatasetError(f"prepared data unreadable: {exc}") from None
    try:
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
