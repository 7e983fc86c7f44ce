"""Small image datasets the tests make themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# the segmentation shapes live in the package: `ddp-finetune demo --task segmentation` writes them too
from ddp_finetune.commands.shapes import make_mask_folder, shapes_sample

__all__ = ["make_image_folder", "make_mask_disk", "make_mask_folder", "shapes_sample"]


def photo_like(rng, height, width):
    """Photo-like RGB pixels (height, width, 3) uint8: smooth colour fields plus a little grain, which JPEG
    compresses as it does photographs (pure noise would make every decoder difference an edge)."""
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)


def make_jpeg_folder(root, classes=("a", "b"), per_class=8, height=40, width=48, seed=0, png_every=0):
    """Write `root/<class>/<i>.jpg` photo-like images (quality 90); with `png_every` N, every Nth one is a PNG
    instead (a data set with a stray non-JPEG file). Returns the root path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            png = png_every and i % png_every == png_every - 1
            Image.fromarray(photo_like(rng, height, width)).save(
                root / name / f"{i}.{'png' if png else 'jpg'}", quality=90
            )
    return root


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=8, size=16, seed=0, mode="RGB", splits=None):
    """Write `root/<class>/<i>.png` (or `root/<split>/<class>/<i>.png` for each split in `splits`).

    Each class has its own mean colour plus noise, so a model can learn it in a few steps.
    Returns the root path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits or [None]:
        base = root / split if split else root
        for c, name in enumerate(classes):
            folder = base / name
            folder.mkdir(parents=True, exist_ok=True)
            centre = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256], dtype=np.float64)
            for i in range(per_class):
                pixels = np.clip(centre + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, "RGB")
                if mode != "RGB":
                    img = img.convert(mode)
                img.save(folder / f"{i}.png")
    return root


def make_mask_disk(root, n=16, size=32, seed=0, mask_column="mask", ignore_border=False):
    """The same shapes as a `save_to_disk` dataset with Image columns `image` and `mask_column`."""
    import datasets

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        pixels, mask = shapes_sample(rng, size, ignore_border)
        images.append(Image.fromarray(pixels, "RGB"))
        masks.append(Image.fromarray(mask, "L"))
    features = datasets.Features({"image": datasets.Image(), mask_column: datasets.Image()})
    datasets.Dataset.from_dict({"image": images, mask_column: masks}, features=features).save_to_disk(str(root))
    return Path(root)
