"""Datasets (Hugging Face `datasets`), transforms (torchvision v2), sampler and loaders.

Two choices make a run independent of the world size:
- `EpochSampler` draws one seeded permutation per epoch, the same on every rank; Accelerate's
  `split_batches=True` then gives each rank its slice of every global batch.
- Augmentation is seeded per (seed, epoch, sample index), so a sample is cropped and flipped
  the same way whichever rank loads it.

Segmentation (`task: segmentation`) pairs each image with a mask of class indices; the same v2
transforms crop, flip and resize both together (`tv_tensors.Mask` is resized with NEAREST).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VAL_NAMES = ("validation", "val", "valid", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SEG_LAYOUT = "path/[<split>/]images/<name>.<ext> with path/[<split>/]masks/<name>.png"


@dataclass
class Splits:
    train: object  # datasets.Dataset
    val: object
    class_names: list[str]
    val_source: str  # which split, or "val_fraction"
    label_kind: str = "index"  # index (ClassLabel), values (map through class_names), multi_hot, mask
    scanned_classes: int | None = None  # segmentation: the training masks' largest value + 1, once scanned


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
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        if source == "disk":
            try:
                return datasets.load_from_disk(str(path))
            except FileNotFoundError:
                raise UserError(
                    f"data.path={path!r} is not a dataset saved with save_to_disk; use data.source=imagefolder for a folder of images"
                ) from None
        return datasets.load_dataset(path)
    except UserError:
        raise
    except (ConnectionError, OSError, ValueError) as exc:
        if source == "hub":
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"could not load data.path={path!r} from the Hugging Face Hub ({first[:200]}); "
                "check the name and the network, or download it and use data.source=disk"
            ) from None
        raise


def _load_segmentation_folder(data_cfg):
    """`path/[<split>/]images/<name>.<ext>` + `path/[<split>/]masks/<name>.png` as a DatasetDict
    with two Image columns (named `data.image_column`, `data.mask_column`), masks matched by stem."""
    import datasets

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
        images = sorted(
            f
            for f in (base / "images").iterdir()
            if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        if not images:
            raise UserError(
                f"{base / 'images'} holds no images ({', '.join(_IMAGE_SUFFIXES)}); the layout is {_SEG_LAYOUT}"
            )
        by_stem: dict[str, Path] = {}
        for image in images:
            if image.stem in by_stem:
                raise UserError(
                    f"images {by_stem[image.stem]} and {image} would share the mask masks/{image.stem}.png; rename one"
                )
            by_stem[image.stem] = image
            mask = base / "masks" / f"{image.stem}.png"
            if not mask.is_file():
                raise UserError(
                    f"mask file {mask} is missing for image {image}; every images/<name>.<ext> needs masks/<name>.png"
                )
        columns = {
            data_cfg.image_column: [str(f) for f in images],
            data_cfg.mask_column: [str(base / "masks" / f"{f.stem}.png") for f in images],
        }
        out[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(out)


def load_splits(data_cfg, seed: int, task: str = "classification") -> Splits:
    import datasets

    segmentation = task == "segmentation"
    raw = (
        _load_segmentation_folder(data_cfg)
        if segmentation and data_cfg.source == "imagefolder"
        else _load_raw(data_cfg)
    )
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({data_cfg.train_split: raw})
    if data_cfg.train_split not in raw:
        raise UserError(
            f"data.train_split={data_cfg.train_split!r} is not in the dataset (splits: {', '.join(raw)}); set data.train_split"
        )
    train = raw[data_cfg.train_split]
    target = (
        ("data.mask_column", data_cfg.mask_column) if segmentation else ("data.label_column", data_cfg.label_column)
    )
    for key, column in (("data.image_column", data_cfg.image_column), target):
        if column not in train.column_names:
            raise UserError(
                f"{key}={column!r} is not a column of the dataset (columns: {', '.join(train.column_names)}); set {key}"
            )

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
            try:
                parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=seed, stratify_by_column=stratify)
            except ValueError:
                parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=seed)
            train, val, val_source = parts["train"], parts["test"], "val_fraction"
    if segmentation:  # classes come from data.class_names, model.num_classes or a scan (infer_num_classes)
        return Splits(
            train=train, val=val, class_names=list(data_cfg.class_names or []), val_source=val_source, label_kind="mask"
        )
    names, kind = class_names(train, data_cfg.label_column)
    return Splits(train=train, val=val, class_names=names, val_source=val_source, label_kind=kind)


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
    values = ds[label_column]
    if values and isinstance(values[0], (list, tuple)):
        if all(v in (0, 1) for row in values for v in row) and len({len(r) for r in values}) == 1:
            return [str(i) for i in range(len(values[0]))], "multi_hot"
        return [str(v) for v in sorted({v for row in values for v in row})], "values"
    return [str(v) for v in sorted(set(values))], "values"


# --------------------------------------------------------------------------- transforms


def build_transforms(image_size: int, augment: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(train transform, eval transform), torchvision transforms v2 on PIL images."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    eval_tf = v2.Compose(
        [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size), *to_tensor]
    )
    if not augment:
        return eval_tf, eval_tf
    train_tf = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
    return train_tf, eval_tf


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample's random transform, a hash of (seed, epoch, index).

    numpy's SeedSequence mixes the triple, so distinct triples give unrelated streams: no two
    samples of any epoch or run seed share a crop (a linear formula such as
    seed*a + epoch*b + index makes (epoch e, index i+b) collide with (epoch e+1, index i)).
    """
    low, high = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


@contextlib.contextmanager
def _sample_rng(seed: int, epoch: int, index: int):
    """Torch's global RNG seeded for one sample's transform, restored afterwards: the draw depends
    on (seed, epoch, index) only, not on which rank, worker or restart loads the sample."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, index))
        yield


def _to_rgb(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if image.mode != "RGB":  # grayscale scans, RGBA screenshots, palette PNGs
        image = image.convert("RGB")
    return image


class ImageDataset(Dataset):
    """A Hugging Face split as (image tensor, target) pairs.

    Targets: class index (classification), float 0/1 of shape (1,) (binary), multi-hot float vector (multilabel).
    Random transforms are seeded per (seed, epoch, index), so they do not depend on which rank,
    worker or restart loads the sample.
    """

    def __init__(
        self, hf_ds, transform, image_column, label_column, task, num_classes, label_to_index, seed=0, random=False
    ):
        self.ds, self.transform = hf_ds, transform
        self.image_column, self.label_column = image_column, label_column
        self.task, self.num_classes, self.label_to_index = task, num_classes, label_to_index
        self.seed, self.random, self.epoch = seed, random, 0
        self.multi_hot = False

    def __len__(self):
        return len(self.ds)

    def target(self, label):
        if self.task == "multilabel":
            t = torch.zeros(self.num_classes)
            if self.multi_hot:
                return torch.tensor(label, dtype=torch.float32)
            for v in label:
                t[self._index(v)] = 1.0
            return t
        index = self._index(label)
        if self.task == "binary":
            # shape (1,): a batch of targets (N, 1) matches the model's one logit (N, 1), so a
            # user loss such as F.binary_cross_entropy_with_logits(logits, targets) just works
            return torch.tensor([float(index)])
        return index

    def _index(self, label):
        # ClassLabel columns hold indices already; raw values (strings, sparse ints) go through the map
        index = self.label_to_index[str(label)] if self.label_to_index is not None else int(label)
        if not 0 <= index < max(self.num_classes, 2):
            raise UserError(
                f"label {label!r} is outside the {self.num_classes} classes of the model; set model.num_classes or fix the labels"
            )
        return index

    def __getitem__(self, index):
        row = self.ds[int(index)]
        image = _to_rgb(row[self.image_column])
        if self.random:
            with _sample_rng(self.seed, self.epoch, index):
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, self.target(row[self.label_column])


# --------------------------------------------------------------------------- segmentation


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


def scan_mask_classes(ds, mask_column: str, ignore_index: int | None) -> int:
    """The masks' largest class index + 1 (at least 2), `ignore_index` left out. Reads every mask."""
    top = -1
    for i, row in enumerate(ds.select_columns([mask_column])):
        values = mask_array(row[mask_column], f"training row {i}")
        if ignore_index is not None:
            values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
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


class SegmentationDataset(Dataset):
    """A Hugging Face split as (image tensor (3, S, S), int64 class-index mask (S, S)) pairs.

    The transforms see the image and its `tv_tensors.Mask` together, so one random crop and flip
    (seeded per (seed, epoch, index), as `ImageDataset`) moves both; masks are resized with NEAREST.
    """

    def __init__(self, hf_ds, transform, image_column, mask_column, seed=0, random=False, split="train"):
        self.ds, self.transform = hf_ds, transform
        self.image_column, self.mask_column = image_column, mask_column
        self.seed, self.random, self.epoch, self.split = seed, random, 0, split

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        from torchvision import tv_tensors

        row = self.ds[int(index)]
        image = _to_rgb(row[self.image_column])
        where = f"{self.split} row {int(index)}"
        mask = mask_array(row[self.mask_column], where)
        if mask.shape != (image.height, image.width):
            raise UserError(
                f"mask of {where} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}; they must match"
            )
        mask = tv_tensors.Mask(torch.from_numpy(mask))
        if self.random:
            with _sample_rng(self.seed, self.epoch, index):
                x, y = self.transform(image, mask)
        else:
            x, y = self.transform(image, mask)
        return x, y.as_subclass(torch.Tensor)


class EpochSampler(Sampler):
    """A seeded permutation per epoch, the same on every rank, cut to whole global batches.

    Keeping only `len // batch_size * batch_size` indices makes every optimizer step see exactly
    one global batch, at any world size and accumulation.
    """

    def __init__(self, length: int, batch_size: int, seed: int, shuffle: bool = True):
        self.length, self.batch_size, self.seed, self.shuffle = length, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length // self.batch_size * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        return iter(order[: len(self)])


def normalization(report: dict | None):
    stats = (report or {}).get("normalization")
    if stats:
        return tuple(stats["mean"]), tuple(stats["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def infer_num_classes(cfg, splits: Splits) -> tuple[int, str]:
    """(classes of the model, where that number came from: "" unless the task is segmentation).

    Segmentation: `model.num_classes`, else `data.class_names`, else the training masks' largest
    value + 1 with `loss.ignore_index` left out (scanned once, kept on `splits`).
    """
    if cfg.task != "segmentation":
        return cfg.model.num_classes or (1 if cfg.task == "binary" else len(splits.class_names)), ""
    if cfg.model.num_classes:
        return cfg.model.num_classes, "model.num_classes"
    if cfg.data.class_names:
        return len(cfg.data.class_names), "data.class_names"
    if splits.scanned_classes is None:
        splits.scanned_classes = scan_mask_classes(splits.train, cfg.data.mask_column, cfg.loss.ignore_index)
    ignoring = f", ignoring loss.ignore_index={cfg.loss.ignore_index}" if cfg.loss.ignore_index is not None else ""
    return splits.scanned_classes, f"the training masks' largest value + 1{ignoring}"


def build_datasets(cfg, splits: Splits, norm=(IMAGENET_MEAN, IMAGENET_STD), num_classes: int | None = None):
    """(train, val, num_classes); `num_classes` defaults to `infer_num_classes`."""
    d = cfg.data
    if num_classes is None:
        num_classes, _ = infer_num_classes(cfg, splits)
    if cfg.task == "segmentation":
        train_tf, eval_tf = build_transforms(d.image_size, d.augment, *norm)  # v2: the same calls move image and Mask
        common = dict(image_column=d.image_column, mask_column=d.mask_column, seed=cfg.seed)
        train = SegmentationDataset(splits.train, train_tf, random=d.augment, split=d.train_split, **common)
        val_name = "validation (val_fraction)" if splits.val_source == "val_fraction" else splits.val_source
        val = SegmentationDataset(splits.val, eval_tf, random=False, split=val_name, **common)
        return train, val, num_classes
    if cfg.task == "binary" and len(splits.class_names) > 2:
        raise UserError(
            f"task=binary but {d.label_column!r} has {len(splits.class_names)} classes ({', '.join(splits.class_names[:5])}...); "
            "use task=classification"
        )
    mapping = {n: i for i, n in enumerate(splits.class_names)} if splits.label_kind == "values" else None
    train_tf, eval_tf = build_transforms(d.image_size, d.augment, *norm)
    common = dict(
        image_column=d.image_column,
        label_column=d.label_column,
        task=cfg.task,
        num_classes=num_classes,
        label_to_index=mapping,
    )
    train = ImageDataset(splits.train, train_tf, seed=cfg.seed, random=d.augment, **common)
    val = ImageDataset(splits.val, eval_tf, seed=cfg.seed, random=False, **common)
    train.multi_hot = val.multi_hot = splits.label_kind == "multi_hot"
    return train, val, num_classes


def build_loaders(cfg, train_ds, val_ds):
    """Loaders whose batch is the *global* micro-batch: Accelerate's split_batches divides it by ranks."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if len(train_ds) < cfg.train.batch_size:
        raise UserError(
            f"the training split has {len(train_ds)} images, fewer than train.batch_size={cfg.train.batch_size}; "
            "lower train.batch_size or add data"
        )
    sampler = EpochSampler(len(train_ds), cfg.train.batch_size, cfg.seed)
    workers = cfg.data.num_workers
    train_dl = DataLoader(train_ds, batch_size=micro, sampler=sampler, drop_last=True, num_workers=workers)
    val_dl = DataLoader(
        val_ds, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False, num_workers=workers
    )
    return train_dl, val_dl, sampler
