"""Every output path of the pipeline, built in one place.

A path encodes its grid point (dataset, method, sigma, shard) exactly once, so a CLI flag and the
file name it produces can never disagree. The workflow (Snakemake and DVC) and the CLI both call
these functions; nothing else formats a result path.
"""

from __future__ import annotations

from pathlib import Path

DATASETS = ("digits", "cifar10", "imagenet")
# CIFAR-10's raw data as torchvision lays it out: data.root / CIFAR_FOLDER / each of CIFAR_FILES
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CASCADE = "cascade"  # the "sigma" of a multi-scale cascade certificate


def __getattr__(name: str):
    """``METHODS``: the built-in methods' names, in the registry's order (rcm.methods.BUILTIN)."""
    if name == "METHODS":
        from rcm.methods import BUILTIN

        return tuple(m.name for m in BUILTIN)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fmt_sigma(sigma: float | str) -> str:
    """Canonical text of a noise level: 0.25 -> '0.25', 1 -> '1.0'.

    'cascade' and Snakemake wildcards such as '{sigma}' pass through unchanged, so the workflow
    builds its path patterns with these same functions.
    """
    if isinstance(sigma, str):
        if sigma == CASCADE or (sigma.startswith("{") and sigma.endswith("}")):
            return sigma
        try:
            sigma = float(sigma)
        except ValueError:
            raise ValueError(f"sigma must be a number or '{CASCADE}', got '{sigma}'") from None
    return repr(float(sigma))


def data_dir(root: str | Path, dataset: str) -> Path:
    return Path(root) / dataset / "data"


def prepared(root: str | Path, dataset: str, split: str) -> Path:
    """One prepared split: 'train', 'val' (held out of train) or 'test' (certification only)."""
    return data_dir(root, dataset) / f"{split}.pt"


def manifest(root: str | Path, dataset: str) -> Path:
    """The test split's manifest (``rcm prepare --part test``)."""
    return data_dir(root, dataset) / "manifest.json"


def train_manifest(root: str | Path, dataset: str) -> Path:
    """The train and val splits' manifest (``rcm prepare --part train``)."""
    return data_dir(root, dataset) / "train_manifest.json"


def model_dir(root: str | Path, dataset: str) -> Path:
    return Path(root) / dataset / "models"


def denoiser(root: str | Path, dataset: str, finetuned: bool = False) -> Path:
    return model_dir(root, dataset) / ("denoiser_finetuned.pt" if finetuned else "denoiser.pt")


def classifier(root: str | Path, dataset: str, sigma: float | str) -> Path:
    """sigma = 0 is the clean classifier used by dds/mdds; sigma > 0 is Cohen's baseline."""
    return model_dir(root, dataset) / f"classifier_sigma_{fmt_sigma(sigma)}.pt"


def rrcm_pretrained(root: str | Path, dataset: str) -> Path:
    return model_dir(root, dataset) / "rrcm_pretrained.pt"


def rrcm_finetuned(root: str | Path, dataset: str, sigma: float | str) -> Path:
    return model_dir(root, dataset) / f"rrcm_sigma_{fmt_sigma(sigma)}.pt"


SEQUENTIAL = "sequential"  # the folder suffix of a sequential certificate (rcm certify --sequential)


def certificate(root: str | Path, dataset: str, method: str, sigma: float | str,
                shard: int, num_shards: int, sequential: bool = False) -> Path:
    """Certificate TSV of one shard of one method at one sigma (or sigma='cascade').

    A sequential certificate (early stopping, docs/methods.md) of the same grid point lies beside
    the fixed-n one, in ``sigma_{s}_sequential``, so both modes can be kept and reported together."""
    folder = f"sigma_{fmt_sigma(sigma)}" + (f"_{SEQUENTIAL}" if sequential else "")
    return Path(root) / dataset / "certify" / method / folder / f"shard_{shard}-of-{num_shards}.tsv"


def report_dir(root: str | Path, dataset: str) -> Path:
    return Path(root) / dataset / "report"


def parse_baseline(item: str) -> tuple[str | None, Path]:
    """A published certification log named in the report's baselines: 'NAME=FILE' -> (NAME, FILE);
    a bare 'FILE' -> (None, FILE). A name holds no '/'."""
    name, sep, path = item.partition("=")
    if sep and name and path and "/" not in name:
        return name, Path(path)
    return None, Path(item)
