"""Printed digits for the demo's target task: 0-9 drawn with the fonts matplotlib ships.

    counts = make_printed_digits(root, train_per_class=3, val_per_class=40, train_seed=0)

The source task is handwritten digits (scikit-learn's 8x8 scans, upsampled); the target task
is the same ten classes in another domain: type faces (DejaVu Sans / Mono / Serif, STIX,
Computer Modern, each in its weights and slants) at random sizes, offsets and rotations, blurred
and noisy, bright ink on black as in the scans. A few labelled images per class is what transfer
learning is for. The validation images are the same for every seed (`VAL_SEED`); the labelled
training images are drawn per seed, so a sweep over seeds also varies which examples one gets.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

VAL_SEED = 10_000  # the validation images do not depend on the seed: every seed is scored on the same set
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)


def font_paths() -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "the demo draws its printed digits with matplotlib's fonts; install it with: pip install 'ddp-finetune[demo]'"
        ) from None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = [folder / name for name in FONT_FILES if (folder / name).is_file()]
    if not found:
        raise UserError(f"no font of {FONT_FILES[0]}, ... in {folder}; reinstall matplotlib")
    return found


def render_digit(digit: int, font_path: Path, rng, size: int = 32):
    """One grayscale image of `digit`: centred with a random offset, size, rotation, blur and noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    canvas = 48  # drawn larger than the crop, so rotation never cuts the corners of the digit
    font = ImageFont.truetype(str(font_path), int(rng.integers(28, 42)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-4, 4)
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-4, 4)
    draw.text((x, y), str(digit), fill=int(rng.integers(160, 256)), font=font)
    img = img.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    margin = (canvas - 32) // 2
    img = img.crop((margin, margin, margin + 32, margin + 32)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    pixels = np.asarray(img).astype(np.float32) + rng.normal(0, 12, (32, 32))
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    return out if size == 32 else out.resize((size, size), Image.BILINEAR)


def make_printed_digits(root, train_per_class: int, val_per_class: int, train_seed: int, size: int = 32) -> dict:
    """`root/train/<d>/*.png` (drawn with `train_seed`) and `root/validation/<d>/*.png` (with `VAL_SEED`)."""
    import numpy as np

    fonts = font_paths()
    counts = {}
    for split, per_class, seed in (("train", train_per_class, train_seed), ("validation", val_per_class, VAL_SEED)):
        rng = np.random.default_rng(seed)
        for digit in range(10):
            folder = Path(root) / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                font = fonts[int(rng.integers(len(fonts)))]
                render_digit(digit, font, rng, size).save(folder / f"{i}.png")
        counts[split] = 10 * per_class
    return counts
