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

from ddp_finetune.errors import UserError

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
    """One grayscale image of `digit`, made the way scikit-learn's digits were: the glyph scaled to
    fill a 32x32 box (with a random rotation, aspect and offset), reduced to 8x8 by averaging 4x4
    blocks (the scans counted the ink in each block), then upsampled to `size` like the source
    images. What differs from the source is the type face, not the resolution."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), 48)
    img = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(img).text((24, 12), str(digit), fill=255, font=font)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    box = img.getbbox() or (0, 0, 96, 96)
    glyph = img.crop(box)
    height = int(rng.integers(26, 33))
    width = max(4, min(32, round(glyph.width * height / glyph.height * rng.uniform(0.8, 1.25))))
    glyph = glyph.resize((width, height), Image.BILINEAR)
    canvas = Image.new("L", (32, 32), 0)
    canvas.paste(glyph, ((32 - width) // 2 + int(rng.integers(-2, 3)), (32 - height) // 2 + int(rng.integers(-1, 2))))
    blocks = np.asarray(canvas, dtype=np.float32).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    blocks = np.clip(blocks * rng.uniform(0.9, 1.3) + rng.normal(0, 8, (8, 8)), 0, 255)
    return Image.fromarray(blocks.astype(np.uint8), "L").resize((size, size), Image.BILINEAR)


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
