"""Where the images come from and which classes they have, decided once per run.

    splits = load_splits(cfg.data, cfg.seed, cfg.task)     # Hugging Face datasets: train / val
    classes = decide_classes(cfg, splits)                    # names, model outputs, where from

Sources: `imagefolder` (class folders, indexed by `folder_index.py` as `datasets` would read them;
segmentation: images/ + masks/ folders), `disk` (a dataset
saved with `save_to_disk`), `hub` (a Hub name). Without a validation split, a seeded
`val_fraction` split, identical on every rank and every restart. `datasets.py` turns a split
into (tensor, target) samples; `loaders.py` batches them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddp_finetune.data import result_cache
from ddp_finetune.data.checks import IMAGE_SUFFIXES as _IMAGE_SUFFIXES
from ddp_finetune.data.checks import (
    check_labels,
    column_array,
    column_values,
    empty_class_folders,
    explain_missing_labels,
)
from ddp_finetune.data.images import mask_array
from ddp_finetune.errors import UserError, first_line

_VAL_NAMES = ("validation", "val", "valid", "test")
_SEG_LAYOUT = "path/[<split>/]images/<name>.<ext> with path/[<split>/]masks/<name>.png"


@dataclass
class Splits:
    """The training and validation splits as the data holds them."""

    train: object  # datasets.Dataset
    val: object
    class_names: list[str]  # from the labels (classification tasks); data.class_names (segmentation)
    val_source: str  # which split, or "val_fraction"
    label_kind: str = "index"  # index (ClassLabel), values (map through class_names), multi_hot, mask
    notes: list[str] = field(default_factory=list)  # warnings and what was skipped, for the start-up lines


@dataclass(frozen=True)
class Classes:
    """The classes of a run: decided once by `decide_classes`, then passed to the model and datasets."""

    names: tuple[str, ...]  # in index order (binary: the two label values)
    outputs: int  # channels of the model's head: 1 for binary, else the number of classes
    label_kind: str  # index, values (mapped through `names`), multi_hot, mask
    source: str = ""  # where the count came from, for the start-up line (segmentation)

    @property
    def label_to_index(self) -> dict[str, int] | None:
        """Raw label value (as str) -> class index, for `values` labels; None otherwise."""
        return {n: i for i, n in enumerate(self.names)} if self.label_kind == "values" else None


# --------------------------------------------------------------------------- loading


def _load_raw(data_cfg):
    import datasets

    datasets.disable_progress_bars()  # our own bar is the one that matters; ranks would repeat these

    source, path = data_cfg.source, data_cfg.path
    if source in ("imagefolder", "disk") and not Path(path).exists():
        raise UserError(f"data.path={path!r} does not exist; give the folder of your images (data.source={source})")
    try:
        if source == "imagefolder":
            if not Path(path).is_dir():
                raise UserError(
                    f"data.path={path!r} is not a folder; imagefolder wants class sub-folders (path/<class>/<image>)"
                )
            from ddp_finetune.data.folder_index import load_image_folder

            try:
                indexed = load_image_folder(path)  # a directory walk, cached; None: a layout only load_dataset reads
            except OSError as exc:  # a sub-folder that cannot be listed (permissions), an I/O error
                where = f" ({exc.filename})" if exc.filename else ""
                raise UserError(
                    f"data.path={path!r} cannot be read{where}: {exc.strerror or first_line(exc)}; "
                    "fix the folder's permissions or the file system, or move that folder out of data.path"
                ) from None
            if indexed is not None:
                return indexed
            try:
                return datasets.load_dataset("imagefolder", data_dir=str(path))
            except datasets.data_files.EmptyDatasetError:
                raise UserError(
                    f"data.path={path!r} holds no images ({', '.join(_IMAGE_SUFFIXES)}); "
                    "imagefolder wants one folder per class, path/<class>/<image>"
                ) from None
            except (ValueError, OSError) as exc:  # the layout `datasets`' own rules read, and they refuse it
                raise UserError(
                    f"data.path={path!r} cannot be read as an image folder ({first_line(exc)[:200]}): a folder or "
                    "file named like a split (train, validation, val, test, ...) anywhere below it makes a split, "
                    "and every split must hold images; move other data (a packed copy, notes) out of the folder, "
                    "or keep to path/[<split>/]<class>/<image>"
                ) from None
        if source == "disk":
            saved = any((Path(path) / name).is_file() for name in ("dataset_dict.json", "state.json"))
            try:
                return datasets.load_from_disk(str(path))
            except FileNotFoundError as exc:
                if saved:  # a saved dataset with a file gone: an interrupted copy or save
                    missing = exc.filename or first_line(exc)
                    raise UserError(
                        f"data.path={path!r} is a saved dataset with a file missing ({missing}); copy it again, "
                        "or save it (ddp-finetune pack) again from its source"
                    ) from None
                raise UserError(
                    f"data.path={path!r} is not a dataset saved with save_to_disk; use data.source=imagefolder for a folder of images"
                ) from None
            except (OSError, ValueError) as exc:  # a truncated or damaged Arrow file, a broken json
                raise UserError(
                    f"data.path={path!r}: the saved dataset cannot be read ({first_line(exc)[:200]}); a file of it is "
                    "damaged or cut short: copy it again, or save it (ddp-finetune pack) again from its source"
                ) from None
        return datasets.load_dataset(path)
    except UserError:
        raise
    except (ConnectionError, OSError, ValueError) as exc:
        if source == "hub":
            first = first_line(exc)
            raise UserError(
                f"could not load data.path={path!r} from the Hugging Face Hub ({first[:200]}); "
                "check the name and the network, or download it and use data.source=disk"
            ) from None
        raise


@dataclass
class _Files:
    paths: list[str]
    stamps: list[str]  # "path|size|mtime_ns" of each


def _segmentation_pairs(base: Path) -> tuple[_Files, _Files]:
    """The images of `base/images` (sorted by name, hidden files left out) and their masks
    `base/masks/<stem>.png`: one `os.scandir` of each folder and one stat per file (`load_splits` of 60,000
    pairs on the 2-core machine: 0.57 s, against 2.3 s with `pathlib`, two stats per file and `from_dict`)."""
    images, masks = _Files([], []), _Files([], [])
    mask_dir = str(base / "masks")
    try:
        with os.scandir(mask_dir) as it:
            mask_files = {e.name: e for e in it if e.name.endswith(".png") and e.is_file()}
    except OSError:  # no masks/ folder: the first image names the missing mask
        mask_files = {}
    with os.scandir(base / "images") as it:
        entries = sorted(
            (e for e in it if e.name[0] != "." and _suffix(e.name) in _IMAGE_SUFFIXES and e.is_file()),
            key=lambda e: e.name,
        )
    if not entries:
        raise UserError(
            f"{base / 'images'} holds no images ({', '.join(_IMAGE_SUFFIXES)}); the layout is {_SEG_LAYOUT}"
        )
    by_stem: dict[str, str] = {}
    for entry in entries:
        name = entry.name
        stem = name[: name.rfind(".")]
        if stem in by_stem:
            raise UserError(
                f"images {by_stem[stem]} and {entry.path} would share the mask masks/{stem}.png; rename one"
            )
        by_stem[stem] = entry.path
        mask = mask_files.get(stem + ".png")
        if mask is None:
            raise UserError(
                f"mask file {mask_dir}/{stem}.png is missing for image {entry.path}; every images/<name>.<ext> "
                "needs masks/<name>.png"
            )
        for files, e in ((images, entry), (masks, mask)):
            st = e.stat()
            files.paths.append(e.path)
            files.stamps.append(f"{e.path}|{st.st_size}|{st.st_mtime_ns}")
    return images, masks


def _suffix(name: str) -> str:
    """`Path(name).suffix.lower()` without the Path."""
    dot = name.rfind(".")
    return name[dot:].lower() if 0 < dot < len(name) - 1 else ""


def _load_segmentation_folder(data_cfg):
    """`path/[<split>/]images/<name>.<ext>` + `path/[<split>/]masks/<name>.png` as a DatasetDict
    with two Image columns (named `data.image_column`, `data.mask_column`), masks matched by stem."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    datasets.disable_progress_bars()
    root = Path(data_cfg.path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise UserError(
            f"data.path={data_cfg.path!r} {what}; task=segmentation with data.source=imagefolder reads {_SEG_LAYOUT}"
        )
    if (root / "images").is_dir():
        split_dirs = {data_cfg.train_split: root}
    else:
        split_dirs = {d.name: d for d in sorted(root.iterdir()) if (d / "images").is_dir()}
    if not split_dirs:
        raise UserError(
            f"data.path={data_cfg.path!r} has no images/ folder; task=segmentation with data.source=imagefolder reads {_SEG_LAYOUT}"
        )
    features = datasets.Features({data_cfg.image_column: datasets.Image(), data_cfg.mask_column: datasets.Image()})
    out = {}
    for split, base in split_dirs.items():
        images, masks = _segmentation_pairs(base)
        # the Arrow columns an Image feature stores ({bytes: null, path}), built whole (from_dict encodes
        # each path in Python: ~25 µs per row); the fingerprint follows every file's size and time, so that
        # the image check's cache (image_check.py) sees a file that changed
        table = pa.table(
            {
                column: pa.StructArray.from_arrays(
                    [pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())], ["bytes", "path"]
                )
                for column, paths in ((data_cfg.image_column, images.paths), (data_cfg.mask_column, masks.paths))
            }
        )
        digest = hashlib.sha256("\n".join(["segmentation", *images.stamps, *masks.stamps]).encode()).hexdigest()[:16]
        info = datasets.DatasetInfo(features=features)
        out[split] = datasets.Dataset(InMemoryTable(table), info=info, fingerprint=digest)
    return datasets.DatasetDict(out)


def load_dataset_dict(data_cfg, task: str = "classification"):
    """Every split of the data as a `datasets.DatasetDict` (a single split is named `data.train_split`)."""
    import datasets

    if data_cfg.path is None:  # a model folder of a run whose data were given to fit from Python
        raise UserError(
            "data.path is not set: this run's data were given to fit() from Python; name them with --data DIR"
        )
    raw = (
        _load_segmentation_folder(data_cfg)
        if task == "segmentation" and data_cfg.source == "imagefolder"
        else _load_raw(data_cfg)
    )
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({data_cfg.train_split: raw})
    return raw


_FROM_CONFIG = object()


def check_columns(ds, data_cfg, task: str, split_names=(), folder=_FROM_CONFIG) -> None:
    """The image column and the label (mask) column are in split `ds`; an image folder without labels
    says why (`folder`: the image folder the split came from; by default the config's, if it names one)."""
    segmentation = task == "segmentation"
    if folder is _FROM_CONFIG:
        folder = Path(data_cfg.path) if data_cfg.source == "imagefolder" and not segmentation else None
    if folder is not None and data_cfg.label_column == "label" and "label" not in ds.column_names:
        explain_missing_labels(folder, {*split_names, *_VAL_NAMES})
    target = (
        ("data.mask_column", data_cfg.mask_column) if segmentation else ("data.label_column", data_cfg.label_column)
    )
    for key, column in (("data.image_column", data_cfg.image_column), target):
        if column not in ds.column_names:
            raise UserError(
                f"{key}={column!r} is not a column of the dataset (columns: {', '.join(ds.column_names)}); set {key}"
            )


def load_splits(data_cfg, seed: int, task: str = "classification", raw=None) -> Splits:
    """The train / val splits of the data the config names, or of `raw` (a `datasets.DatasetDict`
    a Python caller handed to `fit`: its splits named as `data.train_split` / `data.val_split`)."""
    import datasets

    segmentation = task == "segmentation"
    given = raw is not None
    raw = load_dataset_dict(data_cfg, task) if raw is None else raw
    if data_cfg.train_split not in raw:
        raise UserError(
            f"data.train_split={data_cfg.train_split!r} is not in the dataset (splits: {', '.join(raw)}); set data.train_split"
        )
    train = raw[data_cfg.train_split]
    folder = Path(data_cfg.path) if data_cfg.source == "imagefolder" and not segmentation and not given else None
    split_names = {data_cfg.train_split, *_VAL_NAMES, *raw}
    check_columns(train, data_cfg, task, split_names, folder)

    if data_cfg.val_split is not None:
        if data_cfg.val_split not in raw:
            raise UserError(
                f"data.val_split={data_cfg.val_split!r} is not in the dataset (splits: {', '.join(raw)}); set data.val_split or null"
            )
        val, val_source = raw[data_cfg.val_split], data_cfg.val_split
    else:
        found = next((n for n in _VAL_NAMES if n in raw and n != data_cfg.train_split), None)
        if found:
            val, val_source = raw[found], found
        else:
            # a seeded split, identical on every rank and every restart
            label_feature = None if segmentation else train.features[data_cfg.label_column]
            stratify = data_cfg.label_column if isinstance(label_feature, datasets.ClassLabel) else None
            parts = _stratified_split(train, stratify, data_cfg.val_fraction, seed) if stratify else None
            if parts is None:
                try:
                    parts = train.train_test_split(
                        test_size=data_cfg.val_fraction, seed=seed, stratify_by_column=stratify
                    )
                except ValueError:
                    parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=seed)
            train, val, val_source = parts["train"], parts["test"], "val_fraction"
    if segmentation:  # classes come from data.class_names, model.num_classes or a scan (infer_num_classes)
        return Splits(
            train=train, val=val, class_names=list(data_cfg.class_names or []), val_source=val_source, label_kind="mask"
        )
    names, kind = class_names(train, data_cfg.label_column)
    notes = []
    empty = empty_class_folders(folder, split_names) if folder is not None else []
    if empty:
        notes.append(
            f"data: warning: the folders {', '.join(map(repr, empty))} of data.path hold no images, so they are "
            f"not classes (classes: {', '.join(names)}); add images or remove the folders"
        )
    return Splits(train=train, val=val, class_names=names, val_source=val_source, label_kind=kind, notes=notes)


def _stratified_split(ds, column: str, fraction: float, seed: int) -> dict | None:
    """`ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column=column)`'s rows, with the
    labels read as one Arrow array: `datasets` reads them row by row through its numpy formatter
    (~0.3 ms per row on the 2-core machine: 5 s at 20k images on every start of an image folder,
    5 minutes at 1M). Same function, generator and sizes, so the same split. None where that split
    would raise (a class of one image, a tiny set) or labels are missing: the caller asks `datasets`."""
    import math

    import numpy as np
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    n_test = math.ceil(fraction * len(ds))
    n_train = len(ds) - n_test
    labels = column_array(ds, column)
    if n_train <= 0 or n_test <= 0 or labels.null_count:
        return None
    try:
        train_rows, test_rows = next(
            stratified_shuffle_split_generate_indices(
                labels.to_numpy(), n_train, n_test, rng=np.random.default_rng(seed)
            )
        )
    except ValueError:
        return None

    def part(rows, name):
        key = hashlib.sha256(f"{ds._fingerprint}|{name}|{fraction}|{seed}|{column}".encode()).hexdigest()[:16]
        return ds.select(rows, keep_in_memory=True, new_fingerprint=key)

    return {"train": part(train_rows, "train"), "test": part(test_rows, "test")}


def class_names(ds, label_column: str) -> tuple[list[str], str]:
    """(class names, label kind): `index` for ClassLabel columns, `values` for raw values to map,
    `multi_hot` for fixed-length 0/1 vectors."""
    import datasets

    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), "index"
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel): multilabel
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names), "index"
    values = column_values(ds, label_column)
    if values and isinstance(values[0], (list, tuple)):
        if all(v in (0, 1) for row in values for v in row) and len({len(r) for r in values}) == 1:
            return [str(i) for i in range(len(values[0]))], "multi_hot"
        return [str(v) for v in sorted({v for row in values for v in row})], "values"
    return [str(v) for v in sorted(set(values))], "values"


def scan_mask_classes(ds, mask_column: str, ignore_index: int | None) -> int:
    """The masks' largest class index + 1 (at least 2), `ignore_index` left out.

    Reads every training mask on the first start on the data, each rank its contiguous share; the
    ranks gather their largest values and the first bad mask any of them met, so all of them end the
    same way. The largest value is then cached under the `datasets` cache, keyed by the split's
    fingerprint (which follows the files of a folder), so a restart or requeue reads none. The main
    process reads the cache and tells the others, so every rank takes the same path."""
    from ddp_finetune import distributed as dist_utils

    cache = result_cache.cache_path("mask_classes", ds, _MASK_CACHE_VERSION, mask_column, ignore_index)
    top = dist_utils.broadcast_object(result_cache.read(cache) if dist_utils.is_main_process() else None)
    if top is None:
        rank, world = dist_utils.rank(), dist_utils.world_size()
        lo, hi = len(ds) * rank // world, len(ds) * (rank + 1) // world
        shares = dist_utils.gather_objects(_largest_mask_value(ds, mask_column, ignore_index, lo, hi))
        errors = [error for _, error in shares if error]
        if errors:
            raise UserError(errors[0])
        top = max(value for value, _ in shares)
        if dist_utils.is_main_process():
            result_cache.write(cache, top)
    if top < 0:
        raise UserError(
            f"the training masks hold no pixel other than loss.ignore_index={ignore_index}; check data.mask_column and the masks"
        )
    if top == 255 and ignore_index is None:
        raise UserError(
            "the training masks hold the value 255, which VOC-style masks use for borders and unlabelled pixels; "
            "set loss.ignore_index=255, or model.num_classes / data.class_names if 255 is a class"
        )
    return max(top + 1, 2)


def _largest_mask_value(ds, mask_column: str, ignore_index: int | None, lo: int, hi: int) -> tuple[int, str | None]:
    """(the largest value of masks [lo, hi), -1 if none; the error of the first bad one, or None)."""
    top = -1
    masks = ds.select_columns([mask_column])
    for i in range(lo, hi):
        try:
            values = mask_array(masks[i][mask_column], f"training row {i}")
        except UserError as exc:
            return top, str(exc)
        if ignore_index is not None:
            values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    return top, None


_MASK_CACHE_VERSION = 1  # bump when mask_array changes what it reads


def decide_classes(cfg, splits: Splits) -> Classes:
    """The run's classes from the labels, `model.num_classes` and (segmentation) `data.class_names`.

    Segmentation: `model.num_classes`, else `data.class_names`, else the training masks' largest
    value + 1 with `loss.ignore_index` left out (every training mask is read once).
    """
    if cfg.task == "segmentation":
        return _segmentation_classes(cfg, splits)
    names, kind = tuple(splits.class_names), splits.label_kind
    if cfg.task == "binary":
        if len(names) > 2:
            raise UserError(
                f"task=binary but {cfg.data.label_column!r} has {len(names)} classes ({', '.join(names[:5])}...); "
                "use task=classification"
            )
        classes = Classes(names=names, outputs=1, label_kind=kind)
        check_labels(cfg.task, splits, classes, cfg.data.label_column)
        return classes
    wanted = cfg.model.num_classes
    if wanted is not None and wanted < len(names):
        raise UserError(
            f"model.num_classes={wanted} but the labels have {len(names)} classes ({', '.join(names[:5])}...); "
            "set model.num_classes=null (inferred from the labels) or at least the number of classes"
        )
    if (wanted or len(names)) < 2:
        raise UserError(
            f"the labels in {cfg.data.label_column!r} have {len(names)} class ({', '.join(names)}); "
            "a classifier needs at least 2 classes: add images of another class"
        )
    classes = Classes(names=names, outputs=wanted or len(names), label_kind=kind)
    check_labels(cfg.task, splits, classes, cfg.data.label_column)
    return classes


def _segmentation_classes(cfg, splits: Splits) -> Classes:
    if cfg.model.num_classes:
        count, source = cfg.model.num_classes, "model.num_classes"
    elif cfg.data.class_names:
        count, source = len(cfg.data.class_names), "data.class_names"
    else:
        count = scan_mask_classes(splits.train, cfg.data.mask_column, cfg.loss.ignore_index)
        ignoring = f", ignoring loss.ignore_index={cfg.loss.ignore_index}" if cfg.loss.ignore_index is not None else ""
        source = f"the training masks' largest value + 1{ignoring}"
    names = tuple(cfg.data.class_names or [str(i) for i in range(count)])
    return Classes(names=names, outputs=count, label_kind="mask", source=source)
