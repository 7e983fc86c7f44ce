"""`ddp-finetune predict RUN_OR_MODEL INPUT... --out FILE_OR_DIR`: a saved model on new images.

    predict("runs/x", ["photos/", "one.jpg", "saved_dataset/"], "predictions.csv")

INPUT: image files, folders (searched recursively, in sorted order) or datasets saved with
`save_to_disk` (the column `data.image_column`, or the dataset's only image column).
Outputs, in input order:
- classification: a CSV of path, then the top-k class names and probabilities (softmax);
- binary / multilabel: a CSV of path, the predicted class(es), each class's probability
  (sigmoid) and the threshold used (a probability above it is a positive, as in evaluation);
- segmentation: a folder of PNG masks (palette images whose pixel values are the class indices,
  at the original image size), `classes.csv` (index, name, colour) and, with `--overlay`, the
  masks laid over the images in `overlays/`.
Models see what evaluation shows them: classifiers the evaluation crop; segmenters the whole image
resized to image_size x image_size, and their logits are resized back to the image's size (bilinear)
before the argmax. Mixed precision comes from `train.mixed_precision`.

Under `accelerate launch` the inputs are cut in blocks of one batch, block b for rank b % N; after
each round of N blocks the ranks gather their results (distributed.gather_objects) and the main
process writes them in input order. An unreadable image is reported by path and skipped, or with
`strict` stops every rank with one line, before anything is written: the CSV and the masks are
written under temporary names and moved into place at the end.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ddp_finetune import distributed as dist_utils
from ddp_finetune.data.checks import IMAGE_SUFFIXES
from ddp_finetune.data.images import try_decode_rgb
from ddp_finetune.data.transforms import eval_view, whole_view
from ddp_finetune.errors import UserError
from ddp_finetune.inference.predict_outputs import CSV_NAME, Options, Writer, csv_rows, mask_png, overlay_jpeg, palette
from ddp_finetune.inference.setup import is_saved_dataset, start_inference
from ddp_finetune.models import split_outputs
from ddp_finetune.models.folder import THRESHOLD, ModelCard
from ddp_finetune.out_paths import file_out, folder_out, writing

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One input image: a file, or a row of a saved dataset (`table` indexes `Inputs.tables`)."""

    name: str  # how the CSV and the messages call it: the file's path, or DATASET#[SPLIT/]ROW
    out_name: str  # the mask's path inside --out, without suffix
    path: str | None = None
    table: int | None = None
    row: int | None = None


@dataclass
class Inputs:
    items: list[Item] = field(default_factory=list)
    tables: list[tuple[object, str]] = field(default_factory=list)  # (datasets.Dataset, image column)


def _image_column(ds, wanted: str, where: str) -> str:
    import datasets

    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if wanted in ds.column_names:
        return wanted
    if len(images) == 1:
        return images[0]
    raise UserError(
        f"dataset {where} has no column data.image_column={wanted!r} (columns: {', '.join(ds.column_names)}); "
        "set data.image_column"
    )


def list_inputs(paths, image_column: str) -> Inputs:
    """Every input image, in the order given (folders sorted); a path that does not exist is an error."""
    import datasets

    found = Inputs()
    for text in paths:
        p = Path(text)
        if not p.exists():
            raise UserError(
                f"input {text!r} does not exist; give image files, folders of images or datasets saved with save_to_disk"
            )
        if is_saved_dataset(p):
            loaded = datasets.load_from_disk(str(p))
            parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
            for split, ds in parts:
                column = _image_column(ds, image_column, str(p))
                if isinstance(ds.features[column], datasets.Image):
                    ds = ds.cast_column(column, datasets.Image(decode=False))  # undecoded: a bad row is reported
                found.tables.append((ds, column))
                prefix = f"{split}/" if split else ""
                for row in range(len(ds)):
                    name, out = f"{p}#{prefix}{row}", f"{p.name}/{prefix}{row:06d}"
                    found.items.append(Item(name, out, table=len(found.tables) - 1, row=row))
        elif p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not files:
                raise UserError(f"input folder {text!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found.items += [Item(str(f), str(f.relative_to(p).with_suffix("")), path=str(f)) for f in files]
        else:
            found.items.append(Item(str(p), p.stem, path=str(p)))
    return found


def check_unique_outputs(items: list[Item]) -> None:
    """Two inputs must not write the same mask file."""
    seen: dict[str, str] = {}
    for item in items:
        if item.out_name in seen:
            raise UserError(
                f"inputs {seen[item.out_name]} and {item.name} would both write the mask {item.out_name}.png; "
                "rename one, or predict them in separate runs"
            )
        seen[item.out_name] = item.name


# --------------------------------------------------------------------------- images -> model input


def input_transform(card: ModelCard):
    """RGB uint8 image (3, H, W), or a PIL image -> uint8 (3, S, S), what the model sees once normalized on
    the device (`device_input`): evaluation's crop (classifiers) or the whole image resized (segmenters)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    def transform(image):
        x = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
        if card.task == "segmentation":
            return whole_view(x, card.image_size)
        # the model's own evaluation crop (timm's crop_pct and interpolation), as training evaluated it
        return eval_view(x, card.image_size, False, card.crop_pct, card.interpolation)

    return transform


class PredictImages(Dataset):
    """(index, input tensor or None, (height, width), why unreadable or None) per input image."""

    def __init__(self, inputs: Inputs, transform):
        self.inputs, self.transform = inputs, transform

    def __len__(self):
        return len(self.inputs.items)

    def value(self, index: int):
        """The file path, or the stored {"bytes", "path"} of a dataset row."""
        item = self.inputs.items[index]
        if item.path is not None:
            return item.path
        ds, column = self.inputs.tables[item.table]
        return ds[item.row][column]

    def __getitem__(self, index):
        image, problem = try_decode_rgb(self.value(index))  # training's check and decoding (images.py)
        if image is None:
            return index, None, None, problem
        return index, self.transform(image), tuple(image.shape[-2:]), None


@dataclass
class Batch:
    indices: list[int]
    x: torch.Tensor | None
    sizes: list[tuple[int, int]]
    failed: list[tuple[int, str]]  # (index, why it cannot be read)


def collate(samples) -> Batch:
    ok = [s for s in samples if s[1] is not None]
    return Batch(
        indices=[s[0] for s in ok],
        x=torch.stack([s[1] for s in ok]) if ok else None,
        sizes=[s[2] for s in ok],
        failed=[(s[0], s[3]) for s in samples if s[1] is None],
    )


# --------------------------------------------------------------------------- the loop


def _results(batch: Batch | None, model, prepare, card: ModelCard, opts: Options, dataset: PredictImages) -> dict:
    """One block's outputs, picklable for the gather: {"rows": [...], "failed": [(index, reason)]}."""
    if batch is None:
        return {"rows": [], "failed": []}
    rows = []
    if batch.x is not None:
        with torch.no_grad():
            logits = split_outputs(model(prepare(batch.x)))[0].float()
        if card.task != "segmentation":
            rows = list(zip(batch.indices, csv_rows(card, opts, logits.cpu())))
        else:
            colours = palette(card.outputs)
            for j, (index, size) in enumerate(zip(batch.indices, batch.sizes)):
                full = F.interpolate(logits[j : j + 1], size=size, mode="bilinear", align_corners=False)
                mask = full.argmax(1)[0].cpu()
                overlay = None
                if opts.overlay:
                    image, _ = try_decode_rgb(dataset.value(index))
                    overlay = overlay_jpeg(image.permute(1, 2, 0).numpy(), mask, colours) if image is not None else None
                rows.append((index, mask_png(mask, colours), overlay))
    return {"rows": rows, "failed": batch.failed}


def shard(n: int, per_rank: int, rank: int, world: int) -> tuple[int, list[int]]:
    """(number of blocks of `per_rank` inputs, this rank's input indices): block b is rank b % world's, so
    round k holds blocks k*world ... k*world + world - 1, in input order and rank order at once."""
    blocks = math.ceil(n / per_rank)
    mine = [i for b in range(rank, blocks, world) for i in range(b * per_rank, min((b + 1) * per_rank, n))]
    return blocks, mine


def check_out(out, task: str) -> Path:
    """On every rank, before any work: the checked output (out_paths.py), a folder of masks for a segmenter,
    else the CSV file (a folder or `dir/` means dir/predictions.csv)."""
    if task == "segmentation":
        return folder_out(out, "--out", what="a folder of masks (segmentation)")
    return file_out(out, "--out", default_name=CSV_NAME)


def predict(model_path, inputs, out, opts: Options | None = None, overrides=()) -> dict:
    """Run a saved model on `inputs`; the main process writes `out`. Returns counts of what was done."""
    opts = opts or Options()
    if opts.top_k < 1:
        raise UserError(f"--top-k {opts.top_k}: give 1 or more classes per image")
    if opts.threshold is not None and not 0.0 < opts.threshold < 1.0:
        raise UserError(f"--threshold {opts.threshold}: give a probability between 0 and 1")
    # model folder -> accelerator -> DeviceInput (inference.py); predict cuts its own blocks: any batch size
    inf = start_inference(model_path, overrides, whole_batches=False)
    cfg, card, accelerator = inf.cfg, inf.card, inf.accelerator
    if opts.threshold is None:
        opts = dataclasses.replace(opts, threshold=card.threshold if card.threshold is not None else THRESHOLD)
    out = check_out(out, card.task)
    found = list_inputs(inputs, cfg.data.image_column)
    if card.task == "segmentation":
        check_unique_outputs(found.items)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = max(1, inf.batch_size // world)
    blocks, mine = shard(len(found.items), per_rank, rank, world)
    dataset = PredictImages(found, input_transform(card))
    loader = DataLoader(
        Subset(dataset, mine), batch_size=per_rank, num_workers=inf.loader_plan.workers, collate_fn=collate
    )
    model, prepare = inf.model, inf.prepare

    def infer(batch):
        return _results(batch, model, prepare, card, opts, dataset)

    writer = None
    if accelerator.is_main_process:
        with writing(out):
            writer = Writer(out, card, opts, found.items)
    try:
        skipped = _rounds(iter(loader), blocks, infer, writer, found.items, opts.strict, out)
        if writer is not None:
            with writing(out):
                written = writer.finish()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    summary = {"images": len(found.items) - skipped, "skipped": skipped, "processes": world}
    if writer is not None:
        skipped_text = f", skipped {skipped} unreadable (listed above)" if skipped else ""
        print(f"predict: {summary['images']} images on {world} processes{skipped_text}; wrote {written}", flush=True)
    accelerator.wait_for_everyone()
    return summary


def _rounds(batches, blocks: int, infer, writer, items: list[Item], strict: bool, out) -> int:
    """Every rank: one block per round, gathered; the main process writes each round in order. Returns
    the number of unreadable images (every rank raises the same error on one under `strict`)."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    skipped = 0
    for round_start in range(0, blocks, world):
        batch = next(batches) if round_start + rank < blocks else None
        gathered = dist_utils.gather_objects(infer(batch))  # rank order: the round's blocks in input order
        failed = sorted(f for part in gathered for f in part["failed"])
        if failed and strict:
            raise UserError(
                f"--strict: image {items[failed[0][0]].name} cannot be read ({failed[0][1]}); nothing was written "
                f"to {out}; replace or remove it, or leave out --strict to skip unreadable images"
            )
        skipped += len(failed)
        if writer is not None:
            for index, reason in failed:
                print(f"predict: skipped {items[index].name}: {reason}", file=sys.stderr, flush=True)
            for part in gathered:
                writer.add(part["rows"])
    return skipped
