"""What `ddp-finetune predict` writes (predict.py runs the model): CSV rows of a classifier's top-k or of
every class's sigmoid probability, palette PNG masks and overlays of a segmenter, all put in place at
the end by the main process's `Writer`.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp_finetune.files import owner_is_gone, temporary_path, unique_tag
from ddp_finetune.models.folder import ModelCard

CSV_NAME = "predictions.csv"  # the file written when --out is a folder
STAGING = ".partial-predict"  # masks are written in STAGING-<files.unique_tag()>, then moved into place


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours, class 0 black: the PASCAL VOC colour map (bits of the index spread over r, g, b)."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


def mask_png(mask: torch.Tensor, colours) -> bytes:
    """A (H, W) class-index mask as PNG bytes: a palette image (pixel value = class), 16-bit above 256 classes."""
    from PIL import Image

    array = mask.numpy()
    if len(colours) <= 256:
        image = Image.fromarray(array.astype("uint8"), "P")
        image.putpalette([v for rgb in colours for v in rgb])
    else:
        image = Image.fromarray(array.astype("uint16"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_jpeg(image, mask: torch.Tensor, colours) -> bytes:
    """The image with each class but 0 (the background) tinted in its colour, as JPEG bytes."""
    import numpy as np
    from PIL import Image

    index = mask.numpy().astype(np.int64)
    tint = np.asarray(colours, dtype=np.uint8)[np.minimum(index, len(colours) - 1)]
    pixels = np.asarray(image, dtype=np.float32)
    blended = np.where((index > 0)[..., None], 0.5 * pixels + 0.5 * tint, pixels)
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def class_names(card: ModelCard, n: int) -> list[str]:
    names = list(card.class_names[:n])
    return names + [str(i) for i in range(len(names), n)]


@dataclass
class Options:
    """predict's options (its command-line flags)."""

    top_k: int = 5  # classification: classes per image
    threshold: float | None = None  # binary / multilabel; None: the model card's (0.5)
    overlay: bool = False  # segmentation: also the masks over the images
    strict: bool = False  # an unreadable image stops the run


def csv_header(card: ModelCard, opts: Options) -> list[str]:
    if card.task == "classification":
        k = min(opts.top_k, card.outputs)
        return ["path", *[f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "prob")]]
    names = class_names(card, max(card.outputs, 2 if card.task == "binary" else card.outputs))
    return ["path", "predicted", *[f"prob_{n}" for n in names], "threshold"]


def csv_rows(card: ModelCard, opts: Options, logits: torch.Tensor) -> list[list]:
    """The CSV cells after `path` for each image of a batch of logits."""
    if card.task == "classification":
        names = class_names(card, card.outputs)
        probs, top = logits.softmax(1).topk(min(opts.top_k, card.outputs), dim=1)
        return [
            [cell for i, p in zip(t.tolist(), q.tolist()) for cell in (names[i], f"{p:.6f}")]
            for t, q in zip(top, probs)
        ]
    if card.task == "binary":
        names = class_names(card, 2)
        p = logits.reshape(-1).sigmoid().tolist()
        return [[names[int(q > opts.threshold)], f"{1 - q:.6f}", f"{q:.6f}", opts.threshold] for q in p]
    names = class_names(card, card.outputs)
    rows = []
    for q in logits.sigmoid().tolist():
        positive = ";".join(n for n, v in zip(names, q) if v > opts.threshold)
        rows.append([positive, *(f"{v:.6f}" for v in q), opts.threshold])
    return rows


def _remove_dead_staging(out: Path) -> None:
    """Staging folders left by killed predict runs on this host (their pid is gone); another live run's, or
    another host's, stays."""
    if not out.is_dir():
        return
    for folder in out.glob(f"{STAGING}-*"):
        if owner_is_gone(folder.name[len(STAGING) + 1 :]):
            shutil.rmtree(folder, ignore_errors=True)


class Writer:
    """The main process's output: a CSV, or a folder of masks; written under temporary names and put in
    place by `finish` (nothing half-written after an error or --strict)."""

    def __init__(self, out: Path, card: ModelCard, opts: Options, items: list):
        """`out`: the checked output (predict.check_out): the mask folder, or the CSV file."""
        self.card, self.opts, self.items = card, opts, items
        self.segmentation = card.task == "segmentation"
        self.written = 0
        if self.segmentation:
            self.out = out
            # unique to this process: two predict runs into one --out never share (or delete) a staging folder
            _remove_dead_staging(out)
            self.staging = out / f"{STAGING}-{unique_tag()}"
            self.staging.mkdir(parents=True)
            self.colours = palette(card.outputs)
        else:
            self.out = out
            self.partial = temporary_path(self.out)  # unique to this process, renamed onto out at the end
            self.file = self.partial.open("w", newline="")
            self.csv = csv.writer(self.file)
            self.csv.writerow(csv_header(card, opts))

    def add(self, results: list) -> None:
        """Results of one block, in input order: (index, CSV cells) or (index, mask PNG, overlay JPEG or None)."""
        for index, *payload in results:
            item = self.items[index]
            if self.segmentation:
                self._put(f"{item.out_name}.png", payload[0])
                if payload[1] is not None:
                    self._put(f"overlays/{item.out_name}.jpg", payload[1])
            else:
                self.csv.writerow([item.name, *payload[0]])
            self.written += 1

    def _put(self, name: str, data: bytes) -> None:
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def finish(self) -> Path:
        if not self.segmentation:
            self.file.close()
            os.replace(self.partial, self.out)
            return self.out
        legend = "index,name,red,green,blue\n" + "".join(
            f"{i},{n},{r},{g},{b}\n"
            for i, (n, (r, g, b)) in enumerate(zip(class_names(self.card, self.card.outputs), self.colours))
        )
        (self.staging / "classes.csv").write_text(legend)
        for f in sorted(p for p in self.staging.rglob("*") if p.is_file()):
            target = self.out / f.relative_to(self.staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
        shutil.rmtree(self.staging, ignore_errors=True)
        return self.out

    def abandon(self) -> None:
        if self.segmentation:
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            self.file.close()
            self.partial.unlink(missing_ok=True)
