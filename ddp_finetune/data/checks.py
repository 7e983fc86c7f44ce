"""Checks of the data's shape before training: class folders and labels (`data.py` calls these).

    empty = empty_class_folders(root, split_names)      # folders `datasets` drops without a word
    explain_missing_labels(root, split_names)            # raises: why an image folder has no labels
    check_labels(task, splits, classes, label_column)   # raises: a label the model cannot take

Each failure is one line naming the folder or label and the fix; the rest of the run never
meets a label outside the model's classes (which would otherwise surface as a traceback from a
DataLoader worker, mid-epoch).
"""

from __future__ import annotations

import os
from pathlib import Path

from ddp_finetune.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _has_image(folder: Path) -> bool:
    """True at the first image file found (depth first): cheap on a folder that has images."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) for e in entries):
        return True
    return any(_has_image(Path(e.path)) for e in entries if e.is_dir() and not e.name.startswith("."))


def class_folders(root, split_names) -> dict[str, bool]:
    """Class folder name -> whether it holds an image, under `root` or under its split folders."""
    root = Path(root)
    dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    splits = [d for d in dirs if d.name in split_names]
    parents = splits or [root]
    found: dict[str, bool] = {}
    for parent in parents:
        for d in sorted(parent.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                found[d.name] = found.get(d.name, False) or _has_image(d)
    return found


def empty_class_folders(root, split_names) -> list[str]:
    return [name for name, has in class_folders(root, split_names).items() if not has]


def explain_missing_labels(root, split_names) -> None:
    """An image folder loaded without a label column: `datasets` labels by class folder only when
    there are at least two. Raise the error that says which case this is."""
    folders = class_folders(root, split_names)
    full = [n for n, has in folders.items() if has]
    empty = [n for n, has in folders.items() if not has]
    note = f" (the folders {', '.join(map(repr, empty))} hold no images)" if empty else ""
    layout = "put each class's images in its own folder, path/<class>/<image>, at least 2 classes"
    if not full:
        raise UserError(f"data.path={str(root)!r} holds images but no class folders{note}; {layout}")
    raise UserError(
        f"data.path={str(root)!r} has a single class folder {full[0]!r}{note}; a classifier needs at least "
        f"2 classes: {layout}"
    )


# --------------------------------------------------------------------------- labels


def column_array(ds, column: str):
    """One column of a `datasets.Dataset` as one Arrow array, in the dataset's row order.

    `ds[column]` is read row by row in `datasets` 5 (~0.45 ms per row measured on the 2-core machine:
    9 s at 20k images, every start), and even its Arrow route turns an indices mapping (the rows a
    `select` or split keeps) into a Python list first (0.6 s at 270k). Here: the table's column
    gathered through the mapping in one Arrow `take` (3 ms at 270k); tests/test_folder_index.py
    checks it equals `datasets`' own read.
    """
    indices = getattr(ds, "_indices", None)
    if not hasattr(ds, "data") or (indices is not None and not hasattr(indices, "column")):
        return ds.select_columns([column]).with_format("arrow")[:][column]  # a `datasets` that changed shape
    values = ds.data.column(column)
    return values if indices is None else values.take(indices.column(0))


def column_values(ds, column: str) -> list:
    """Every value of a column as Python objects (`column_array`'s)."""
    return column_array(ds, column).to_pylist()


def check_labels(task: str, splits, classes, label_column: str) -> None:
    """Every label of both splits maps into the model's classes (raises the first that does not)."""
    limit = max(classes.outputs, 2)  # binary: one logit, labels 0 and 1
    for split, ds in (("training", splits.train), (f"validation ({splits.val_source})", splits.val)):
        if classes.label_kind == "index" and task != "multilabel" and _indices_in_range(ds, label_column, limit):
            continue  # the common case, in Arrow: no Python object per row
        values = column_values(ds, label_column)
        if classes.label_kind == "multi_hot":
            _check_multi_hot(values, classes.outputs, split, label_column)
            continue
        if task == "multilabel":
            values = [v for row in values for v in (row or [])]
        if classes.label_kind == "values":
            names = set(classes.names)
            missing = sorted({str(v) for v in values} - names)
            if missing:
                raise UserError(
                    f"the {split} split has labels {', '.join(map(repr, missing[:5]))} in {label_column!r} that the "
                    f"training split does not have (classes: {', '.join(classes.names[:10])}); fix the labels or "
                    "the splits"
                )
            continue
        bad = [v for v in values if not 0 <= int(v) < limit]
        if bad:
            hint = " (-1 marks an unlabelled row in Hugging Face datasets)" if min(bad) == -1 else ""
            raise UserError(
                f"{len(bad)} labels of the {split} split are outside the model's {limit} classes 0..{limit - 1}, "
                f"e.g. {bad[0]}{hint}; fix the labels, or set model.num_classes to at least {max(bad) + 1}"
            )


def _indices_in_range(ds, column: str, limit: int) -> bool:
    """Whether every class index of an integer column is in 0..limit-1 (False: look row by row for
    the message; also for a column that is not integers)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = column_array(ds, column)
    if not pa.types.is_integer(values.type):
        return False
    if len(values) == 0:
        return True
    low, high = pc.min_max(values).values()
    return values.null_count == 0 and low.as_py() >= 0 and high.as_py() < limit


def _check_multi_hot(values, outputs: int, split: str, label_column: str) -> None:
    lengths = sorted({len(v) for v in values})
    if lengths and lengths != [outputs]:
        raise UserError(
            f"multi-hot labels in {label_column!r} of the {split} split have lengths {lengths}, the model has "
            f"{outputs} classes; give every row a vector of {outputs} zeros and ones"
        )
