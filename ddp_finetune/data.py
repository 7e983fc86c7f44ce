"""Datasets (Hugging Face `datasets`), transforms (torchvision v2), sampler and loaders.

Two choices make a run independent of the world size:
- `EpochSampler` draws one seeded permutation per epoch, the same on every rank; Accelerate's
  `split_batches=True` then gives each rank its slice of every global batch.
- Augmentation is seeded per (seed, epoch, sample index), so a sample is cropped and flipped
  the same way whichever rank loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VAL_NAMES = ("validation", "val", "valid", "test")


@dataclass
class Splits:
    train: object  # datasets.Dataset
    val: object
    class_names: list[str]
    val_source: str  # which split, or "val_fraction"
    label_kind: str = "index"  # index (ClassLabel), values (map through class_names), multi_hot


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
                raise UserError(f"data.path={path!r} is not a folder; imagefolder wants class sub-folders (path/<class>/<image>)")
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


def load_splits(data_cfg, seed: int) -> Splits:
    import datasets

    raw = _load_raw(data_cfg)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({data_cfg.train_split: raw})
    if data_cfg.train_split not in raw:
        raise UserError(f"data.train_split={data_cfg.train_split!r} is not in the dataset (splits: {', '.join(raw)}); set data.train_split")
    train = raw[data_cfg.train_split]
    for key, column in (("data.image_column", data_cfg.image_column), ("data.label_column", data_cfg.label_column)):
        if column not in train.column_names:
            raise UserError(f"{key}={column!r} is not a column of the dataset (columns: {', '.join(train.column_names)}); set {key}")

    if data_cfg.val_split is not None:
        if data_cfg.val_split not in raw:
            raise UserError(f"data.val_split={data_cfg.val_split!r} is not in the dataset (splits: {', '.join(raw)}); set data.val_split or null")
        val, val_source = raw[data_cfg.val_split], data_cfg.val_split
    else:
        found = next((n for n in _VAL_NAMES if n in raw and n != data_cfg.train_split), None)
        if found:
            val, val_source = raw[found], found
        else:
            # a seeded split, identical on every rank and every restart
            stratify = data_cfg.label_column if isinstance(train.features[data_cfg.label_column], datasets.ClassLabel) else None
            try:
                parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=seed, stratify_by_column=stratify)
            except ValueError:
                parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=seed)
            train, val, val_source = parts["train"], parts["test"], "val_fraction"
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
    eval_tf = v2.Compose([v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size), *to_tensor])
    if not augment:
        return eval_tf, eval_tf
    train_tf = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
    return train_tf, eval_tf


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

    def __init__(self, hf_ds, transform, image_column, label_column, task, num_classes, label_to_index, seed=0, random=False):
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
            raise UserError(f"label {label!r} is outside the {self.num_classes} classes of the model; set model.num_classes or fix the labels")
        return index

    def __getitem__(self, index):
        row = self.ds[int(index)]
        image = _to_rgb(row[self.image_column])
        if self.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + int(index)) % (2**63))
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, self.target(row[self.label_column])


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


def build_datasets(cfg, splits: Splits, norm=(IMAGENET_MEAN, IMAGENET_STD)):
    d = cfg.data
    num_classes = cfg.model.num_classes or (1 if cfg.task == "binary" else len(splits.class_names))
    if cfg.task == "binary" and len(splits.class_names) > 2:
        raise UserError(
            f"task=binary but {d.label_column!r} has {len(splits.class_names)} classes ({', '.join(splits.class_names[:5])}...); "
            "use task=classification"
        )
    mapping = {n: i for i, n in enumerate(splits.class_names)} if splits.label_kind == "values" else None
    train_tf, eval_tf = build_transforms(d.image_size, d.augment, *norm)
    common = dict(image_column=d.image_column, label_column=d.label_column, task=cfg.task, num_classes=num_classes, label_to_index=mapping)
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
    val_dl = DataLoader(val_ds, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False, num_workers=workers)
    return train_dl, val_dl, sampler
