"""`ddp-finetune pack FOLDER OUT`: an image folder as an Arrow dataset with the image bytes inside,
which `data.source: disk` trains from exactly as from the folder.

    pack_folder("images/", "images.packed", task="classification")   # -> PackReport

The folder is read as training reads it (`data.load_dataset_dict`: the folder index, the same
splits, rows, order and labels; segmentation: images/ + masks/), each image file's bytes are
copied into the table as they are (no re-encoding: the same pixels decode), and the result is
written with `save_to_disk` in shards of `--max-shard-size`. Loading it memory-maps the shards:
no walk of a million files, no pattern resolution. The same seeded `val_fraction` split, the same
per-sample crops (drawn from (seed, epoch, index)) and the same resume follow, at every world
size. The path of each file, relative to FOLDER, stays in the table to name a bad image.

The output is written to a temporary folder next to OUT and renamed into place: an interrupted
pack leaves no half dataset at OUT; OUT is never overwritten. A killed pack's temporary folder is
removed by the next pack into the same OUT (when its process, on this host, is gone).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.files import owner_is_gone, unique_tag
from ddp_finetune.out_paths import folder_out

TASKS = ("classification", "segmentation")  # binary / multilabel image folders are classification folders


@dataclass(frozen=True)
class PackReport:
    out: Path
    rows: dict[str, int]  # split -> rows
    bytes: int  # size of the images copied in
    seconds: float


def _embed(batch, columns, root):
    """The image files' bytes into their cells; the path kept relative to the folder (for messages)."""
    out = {}
    for column in columns:
        cells = []
        for cell in batch[column]:
            path = cell["path"]
            with open(path, "rb") as f:
                data = f.read()
            cells.append({"bytes": data, "path": os.path.relpath(path, root)})
        out[column] = cells
    return out


def _remove_dead_partials(out: Path) -> None:
    """The temporary folders of packs into OUT that were killed (kill -9, a node lost): their owner ran on
    this host and is gone. Another host's, or a live pack's, are left alone."""
    prefix = f".{out.name}.partial-"
    for leftover in out.parent.glob(prefix + "*"):
        if owner_is_gone(leftover.name[len(prefix) :]):
            shutil.rmtree(leftover, ignore_errors=True)


def _shard_size(size):
    """`--max-shard-size` as `save_to_disk` takes it (an integer of bytes, or e.g. "500MB"), checked before
    any image is read."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        if convert_file_size_to_int(size) > 0:
            return size
    except (ValueError, TypeError):
        pass
    raise UserError(f"--max-shard-size {size!r} is not a size; give a positive size such as 500MB or 2GB")


def pack_folder(folder, out, task: str = "classification", max_shard_size: str = "500MB", num_proc: int | None = None):
    import datasets

    from ddp_finetune.config import DataConfig
    from ddp_finetune.data.sources import load_dataset_dict
    from ddp_finetune.distributed import usable_cpus

    if task not in TASKS:
        raise UserError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise UserError(f"{out} exists; pack never overwrites: give a new OUT folder, or delete it first")
    if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise UserError(
            f"OUT {out} is inside FOLDER {folder}: the packed files would become part of the image folder; "
            "give an OUT outside it, e.g. next to it"
        )
    max_shard_size = _shard_size(max_shard_size)
    # OUT's folder: created and proved writable before any image is read (a file in the way is one line)
    folder_out(out.parent, flag=f"OUT {str(out)!r}: its folder", what="the packed dataset")
    start = time.perf_counter()
    data_cfg = DataConfig(source="imagefolder", path=str(folder))
    raw = load_dataset_dict(data_cfg, task)
    columns = [data_cfg.image_column] + ([data_cfg.mask_column] if task == "segmentation" else [])
    root = str(folder.expanduser().resolve())
    rows = sum(len(ds) for ds in raw.values())
    procs = num_proc or (min(usable_cpus()[0], 16) if rows >= 10_000 else None)
    _remove_dead_partials(out)
    work = out.parent / f".{out.name}.partial-{unique_tag()}"
    work.mkdir()
    try:
        packed = {}
        datasets.enable_progress_bars()  # a long pack shows its progress (training turns them off)
        for split, ds in raw.items():
            undecoded = ds.cast_column(columns[0], datasets.Image(decode=False))
            for column in columns[1:]:
                undecoded = undecoded.cast_column(column, datasets.Image(decode=False))
            embedded = undecoded.map(
                _embed,
                batched=True,
                batch_size=64,
                writer_batch_size=64,
                fn_kwargs={"columns": columns, "root": root},
                num_proc=procs,
                cache_file_name=str(work / f"embed-{split}.arrow"),
                features=undecoded.features,
                desc=f"pack: reading the {split} images",
            )
            for column in columns:  # decode=True again, as a saved dataset normally has it (same storage: no copy)
                embedded = embedded.cast_column(column, datasets.Image())
            packed[split] = embedded
        datasets.DatasetDict(packed).save_to_disk(str(work / "dataset"), max_shard_size=max_shard_size, num_proc=procs)
        size = sum(f.stat().st_size for f in (work / "dataset").rglob("*.arrow"))
        try:
            os.replace(work / "dataset", out)
        except OSError:
            if out.exists():  # a second pack into the same OUT finished first: its dataset is kept
                raise UserError(f"{out} was written by another pack while this one ran; it was kept as it is") from None
            raise
    finally:
        datasets.disable_progress_bars()
        shutil.rmtree(work, ignore_errors=True)
    return PackReport(out, {s: len(d) for s, d in packed.items()}, size, time.perf_counter() - start)
