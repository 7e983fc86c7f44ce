"""Small image datasets the tests make themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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


def shapes_sample(rng, size=32, ignore_border=False):
    """One synthetic segmentation sample: (RGB pixels (size, size, 3) uint8, mask (size, size) uint8).

    Background 0 (dark, noisy), a yellow square of class 1 and a blue disc of class 2, each at a
    random place and size; the disc is drawn last, so it covers the square where they meet.
    `ignore_border`: the pixels on either side of a class boundary become 255 (the VOC convention).
    """
    pixels = np.clip(rng.normal(40, 20, size=(size, size, 3)), 0, 255)
    mask = np.zeros((size, size), dtype=np.uint8)
    side = int(rng.integers(size // 4, size // 2))
    top, left = rng.integers(0, size - side, size=2)
    mask[top : top + side, left : left + side] = 1
    radius = int(rng.integers(size // 8, size // 4))
    cy, cx = rng.integers(radius, size - radius, size=2)
    yy, xx = np.mgrid[:size, :size]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 2
    colours = {1: (230, 220, 60), 2: (60, 120, 230)}
    for c, colour in colours.items():
        pixels[mask == c] = np.clip(np.array(colour) + rng.normal(0, 15, size=(int((mask == c).sum()), 3)), 0, 255)
    if ignore_border:
        edge = np.zeros(mask.shape, dtype=bool)
        for axis in (0, 1):
            step = np.diff(mask.astype(np.int16), axis=axis) != 0
            lead = [slice(None)] * 2
            lead[axis] = slice(None, -1)
            trail = [slice(None)] * 2
            trail[axis] = slice(1, None)
            edge[tuple(lead)] |= step
            edge[tuple(trail)] |= step
        mask[edge] = 255
    return pixels.astype(np.uint8), mask


def make_mask_folder(root, n=16, size=32, seed=0, splits=None, image_suffix=".jpg"):
    """Write `root/[<split>/]images/<i>.<suffix>` + `root/[<split>/]masks/<i>.png` (mode L, classes 0-2).

    Images default to JPEG so the loader must match masks by stem, not by full name. Returns root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits or [None]:
        base = root / split if split else root
        (base / "images").mkdir(parents=True, exist_ok=True)
        (base / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels, mask = shapes_sample(rng, size)
            Image.fromarray(pixels, "RGB").save(base / "images" / f"{i:03d}{image_suffix}", quality=95)
            Image.fromarray(mask, "L").save(base / "masks" / f"{i:03d}.png")
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


if __name__ == "__main__":
    # python tests/datagen.py segmentation runs/shapes: the data of configs/segmentation_example.yaml
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "segmentation":
        sys.exit("usage: python tests/datagen.py segmentation OUT_FOLDER")
    out = make_mask_folder(sys.argv[2], n=48, size=64, splits=["train", "validation"])
    print(f"wrote {out}/train and {out}/validation (images/ + masks/, classes 0 background, 1 square, 2 disc)")
