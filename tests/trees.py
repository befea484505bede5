"""ImageNet's on-disk layout in miniature: class-per-folder trees of JPEGs that tests write."""

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")


def write_tree(root, per_class, val_per_class=3, classes=CLASSES, size=(40, 44), seed=0):
    """A class-per-folder tree of smooth RGB JPEGs (small on disk, like photos), and one grey image."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR)
                image.save(root / split / c / f"{c}_{i:05d}.JPEG", format="JPEG", quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8)).save(
        root / "train" / classes[0] / "grey.JPEG", format="JPEG")
    return root
