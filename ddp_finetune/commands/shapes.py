"""Synthetic segmentation data: the data of `ddp-finetune demo --task segmentation` and of the tests.

Dark noisy background (class 0), a yellow square (class 1) and a blue disc (class 2), each at a
random place and size: a segmenter learns them from scratch in a few dozen CPU steps, and no
download is needed.

    make_mask_folder("runs/shapes", n=48, size=64, splits=["train", "validation"])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", "square", "disc")


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


def make_mask_folder(root, n=16, size=32, seed=0, splits=None, image_suffix=".jpg") -> Path:
    """Write `root/[<split>/]images/<i>.<suffix>` + `root/[<split>/]masks/<i>.png` (mode L, classes 0-2).

    `n` images per split. Images default to JPEG, so a loader must match masks by stem, not by
    full name. Returns root.
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
