"""Opening images and masks as the model needs them: RGB images, (H, W) int64 class-index masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError


def open_rgb(image):
    """A PIL image (or a path to one) in RGB: grayscale scans, RGBA screenshots, palette PNGs converted."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def mask_array(value, where: str) -> np.ndarray:
    """A mask (PIL image of mode L / P / I / 1, a path to one, or an integer array) as (H, W) int64."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        value = Image.open(value)
    if isinstance(value, Image.Image):
        if value.mode not in ("1", "L", "P") and not value.mode.startswith("I"):
            raise UserError(
                f"mask of {where} is a mode {value.mode} image; masks hold one class index per pixel "
                "(mode L or P, e.g. Image.fromarray(classes.astype(np.uint8)))"
            )
        array = np.array(value)  # mode P: the palette indices, which are the classes
    else:
        array = np.asarray(value)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise UserError(
            f"mask of {where} is a {array.dtype} array of shape {array.shape}; give (H, W) integer class indices"
        )
    return array.astype(np.int64)
