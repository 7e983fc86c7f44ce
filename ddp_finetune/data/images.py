"""Opening images and masks as the model needs them: RGB images, (H, W) int64 class-index masks.

    x = decode_rgb(row["image"])             # the file's bytes -> RGB uint8 (3, H, W), torchvision.io or PIL
    image = open_rgb(row["image"])          # any PIL mode -> RGB, 16-bit scaled to 8-bit
    problem = image_problem(value)           # None, or why an image file cannot be used (the start-up check)
    row = read_row(hf_split, index, where)   # a row, or a UserError naming the file that cannot be read

16-bit images (`I;16*`, and `I`, which older Pillow gives 16-bit PNGs) are scaled to 8 bits
(x * 255 / 65535, rounded), not clipped: `Image.convert` would turn every value above 255 into
white. Floating-point images (mode `F`) have no white level and are refused.

The data workers decode with `torchvision.io` (libjpeg-turbo / libpng: the same pixels as PIL's
`convert("RGB")` for 8-bit JPEG, PNG, WebP and GIF, and ~1.4x faster per JPEG on one core), and
fall back to PIL (`open_rgb`) for everything else: BMP, TIFF, 16-bit and 32-bit images, animated
GIFs, files inside remote archives, and files that do not decode (PIL names the problem).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ddp_finetune.errors import UserError, first_line

JPEG_MAGIC = b"\xff\xd8\xff"

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_problem(image) -> str | None:
    """Why a (loaded) PIL image cannot become RGB, or None."""
    if image.mode == "F":
        return "mode F (floating point) has no white level; save it as an 8- or 16-bit image"
    if image.mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            return f"mode I (32-bit) with values {low}..{high} outside 16-bit range; save it as an 8- or 16-bit image"
    return None


def to_rgb(image, where: str = "an image"):
    """A PIL image in RGB: 16-bit scaled to 8 bits; grayscale, palette, CMYK, alpha modes converted."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    problem = rgb_problem(image)
    if problem:
        raise UserError(f"{where}: {problem}")
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L
    try:
        return image.convert("RGB")
    except ValueError as exc:  # e.g. premultiplied "La"
        raise UserError(
            f"{where}: mode {image.mode} cannot be converted to RGB ({first_line(exc)}); save it as RGB"
        ) from None


def open_rgb(image, where: str | None = None):
    """A PIL image (or a path to one, or a {"bytes", "path"} cell of an undecoded Image column) in RGB
    (see `to_rgb`)."""
    if isinstance(image, (str, Path, dict)):
        name = value_name(image, where or "an image") if isinstance(image, dict) else str(image)
        try:
            loaded = _open(image)
            loaded.load()
        except Exception as exc:
            raise unreadable(name, _reason(exc)) from None
        where, image = where or name, loaded
    return to_rgb(image, where or getattr(image, "filename", "") or "an image")


def try_open_rgb(value):
    """(RGB PIL image, None), or (None, why it cannot be used) for a path or a stored {"bytes", "path"}
    value. Never raises: for commands that report an unreadable image and go on (`predict`)."""
    try:
        image = _open(value)
        image.load()
    except Exception as exc:  # truncated data (OSError), broken chunks (SyntaxError), bombs, ...
        return None, _reason(exc)
    problem = rgb_problem(image)
    if problem:
        return None, problem
    try:
        return to_rgb(image), None
    except UserError as exc:  # a mode that cannot become RGB
        return None, str(exc).partition(": ")[2] or str(exc)


def image_bytes(value) -> bytes | None:
    """The encoded file behind an image cell ({"bytes", "path"} of an undecoded Image column, or a local
    path); None for anything else (a decoded PIL image, a file inside a remote archive, a missing file)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
        if value and ("://" in value or "::" in value):
            return None
    if isinstance(value, (str, Path)):
        try:
            return Path(value).read_bytes()
        except OSError:
            return None  # open_rgb names the problem
    return None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def as_byte_tensor(data: bytes) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor (what `torchvision.io` decoders read)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(value, where: str | None = None) -> torch.Tensor:
    """An image cell (see `image_bytes`) as an RGB uint8 tensor (3, H, W)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    data = image_bytes(value)
    if data:
        from torchvision.io import ImageReadMode, decode_image

        try:
            image = decode_image(as_byte_tensor(data), mode=ImageReadMode.RGB)
            if image.dtype == torch.uint8 and image.ndim == 3:  # not 16-bit, not animated
                return image
        except RuntimeError:  # a format torchvision.io does not read, or a broken file: PIL says which
            pass
    return pil_to_tensor(open_rgb(value, where))


def try_decode_rgb(value) -> tuple[torch.Tensor | None, str | None]:
    """(RGB uint8 tensor (3, H, W), None), or (None, why it cannot be used), for a path or a stored
    {"bytes", "path"} value: training's check (`image_problem`) then training's decoding (`decode_rgb`), so a
    command that reports an unreadable image and goes on (`predict`) sees what training and evaluation see."""
    problem = image_problem(value)
    if problem:
        return None, problem
    try:
        return decode_rgb(value), None
    except UserError as exc:
        return None, str(exc)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG file whose colours nvJPEG turns into RGB (RGB or grayscale), read from
    its header without decoding it; None for any other file (CMYK JPEGs, other formats)."""
    from PIL import Image

    try:
        header = Image.open(io.BytesIO(data))
    except Exception:  # not an image PIL knows: the worker's decode_rgb reports it
        return None
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return None
    width, height = header.size
    return height, width


def unreadable(name: str, problem: str) -> UserError:
    """The error for an image that stopped decoding after the start-up check."""
    return UserError(
        f"image {name} cannot be read ({problem}); replace or delete it "
        "(a restart checks every image again; data.bad_images=skip trains without unreadable ones)"
    )


def _open(value):
    """A PIL image from what a `datasets` Image column stores ({"bytes", "path"}) or a path."""
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path") and ("://" in value["path"] or "::" in value["path"]):
            import datasets  # a file inside a remote archive: only `datasets` knows how to fetch it

            return datasets.Image().decode_example(value)
        value = value.get("path")
    if isinstance(value, (str, Path)):
        if Path(value).is_file() and Path(value).stat().st_size == 0:
            raise OSError("empty file (0 bytes)")
        return Image.open(value)
    raise OSError(f"not an image value ({type(value).__name__})")


def image_problem(value, rgb: bool = True) -> str | None:
    """None when `value` (a path or a {"bytes", "path"} dict) decodes fully, else the reason.

    JPEGs decode at 1/8 scale (`draft`): every byte of the entropy-coded data is still read, so
    truncation and corruption are found at a fraction of the cost. `rgb`: also refuse modes that
    cannot become RGB (images; masks keep their own checks in `mask_array`).
    """
    try:
        with _open(value) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
            return rgb_problem(image) if rgb else None
    except Exception as exc:  # truncated data (OSError), broken chunks (SyntaxError), bombs, ...
        return _reason(exc)


def _reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its message names a BytesIO object for stored bytes
        return "not an image file (unknown format or corrupt header)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return first_line(exc)


def value_name(value, fallback: str) -> str:
    """The file behind an Image-column value, or `fallback` (images stored as bytes have none)."""
    path = value.get("path") if isinstance(value, dict) else value
    return str(path) if path else fallback


def read_row(ds, index: int, where: str) -> dict:
    """`ds[index]`; an image that no longer decodes (it went bad after the start-up check) becomes
    a UserError naming its file, also from inside a DataLoader worker."""
    try:
        return ds[index]
    except Exception:
        import datasets

        for column, feature in ds.features.items():
            if not isinstance(feature, datasets.Image):
                continue
            raw = ds.select_columns([column]).with_format("arrow")[index : index + 1][column].to_pylist()[0]
            problem = image_problem(raw, rgb=False)
            if problem:
                raise unreadable(value_name(raw, f"{where}, column {column!r}"), problem) from None
        raise


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
