"""Torch datasets over a Hugging Face split: (uint8 image (3, S, S), target) pairs for every task.

Images leave the workers as uint8; `transforms.DeviceInput` normalizes them on the device. A
sample is addressed by its index, or by (epoch, index) as `loaders.EpochSampler` yields it: the
epoch travels with the index, so persistent workers (which keep their own copy of the dataset)
still crop each epoch differently. Segmentation (`task: segmentation`) pairs each image with a
mask of class indices that is cropped, flipped and resized (nearest) together with it.

`data.decode: gpu` (`on_device=True`): the workers read each JPEG file and draw its crop; the
device decodes and crops the batch (`transforms.EncodedBatch`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .data import Classes, Splits
from .errors import UserError
from .images import as_byte_tensor, decode_rgb, image_bytes, is_jpeg, jpeg_size, mask_array, read_row
from .transforms import EncodedImage, draw_crop, eval_view, sample_rng, train_view


def _undecoded(hf_ds, column: str):
    """The split with its Image column left encoded ({"bytes", "path"} cells): the workers decode with
    torchvision.io, or hand the file to the device, instead of receiving a PIL image."""
    import datasets

    feature = hf_ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return hf_ds.cast_column(column, datasets.Image(decode=False))
    return hf_ds


def _epoch_and_index(key, epoch: int) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (epoch, int(key))


class ImageDataset(Dataset):
    """A Hugging Face split as (uint8 image (3, size, size), target) pairs.

    Targets: class index (classification), float 0/1 of shape (1,) (binary), multi-hot float
    vector (multilabel). With `random`, each sample gets a random crop and flip drawn from its
    (seed, epoch, index), so they do not depend on which rank, worker or restart loads it.
    """

    def __init__(
        self,
        hf_ds,
        image_column: str,
        label_column: str,
        task: str,
        classes: Classes,
        size: int,
        seed: int = 0,
        random: bool = False,
        on_device: bool = False,
    ):
        self.ds = _undecoded(hf_ds, image_column)
        self.image_column, self.label_column = image_column, label_column
        self.task, self.classes, self.size = task, classes, size
        self.label_to_index = classes.label_to_index
        self.seed, self.random, self.on_device, self.epoch = seed, random, on_device, 0

    def __len__(self):
        return len(self.ds)

    def target(self, label):
        if self.task == "multilabel":
            if self.classes.label_kind == "multi_hot":
                return torch.tensor(label, dtype=torch.float32)
            t = torch.zeros(self.classes.outputs)
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
        limit = max(self.classes.outputs, 2)
        if not 0 <= index < limit:
            raise UserError(
                f"label {label!r} is outside the {limit} classes of the model; set model.num_classes or fix the labels"
            )
        return index

    def crop(self, epoch: int, index: int, height: int, width: int):
        """The sample's augmentation (None without `random`): the one draw both decoding paths use."""
        return draw_crop(sample_rng(self.seed, epoch, index), height, width) if self.random else None

    def __getitem__(self, key):
        epoch, index = _epoch_and_index(key, self.epoch)
        row = read_row(self.ds, index, f"row {index}")
        cell = row[self.image_column]
        if self.on_device:
            return self._encoded(cell, epoch, index), self.target(row[self.label_column])
        image = decode_rgb(cell, f"row {index}")
        crop = self.crop(epoch, index, *image.shape[-2:])
        x = train_view(image, crop, self.size) if crop else eval_view(image, self.size)
        return x, self.target(row[self.label_column])

    def _encoded(self, cell, epoch: int, index: int) -> EncodedImage:
        data = image_bytes(cell)
        if data is not None and is_jpeg(data):
            size = jpeg_size(data)
            if size is not None:  # the header says nvJPEG can decode it
                return EncodedImage(as_byte_tensor(data), self.crop(epoch, index, *size), self.size)
        image = decode_rgb(
            cell, f"row {index}"
        )  # not a JPEG nvJPEG takes: decoded here, cropped on the device all the same
        return EncodedImage(image, self.crop(epoch, index, *image.shape[-2:]), self.size)


class SegmentationDataset(Dataset):
    """A Hugging Face split as (uint8 image (3, S, S), int64 class-index mask (S, S)) pairs.

    One crop and flip (drawn per (seed, epoch, index), as in `ImageDataset`) moves both; masks are
    resized with NEAREST. Masks stay int64 on the way to the device: a uint8 mask would wrap a
    class index above 255 into a valid-looking one instead of letting the loss report it.
    """

    def __init__(self, hf_ds, image_column, mask_column, size, seed=0, random=False, split="train"):
        self.ds = _undecoded(hf_ds, image_column)
        self.image_column, self.mask_column, self.size = image_column, mask_column, size
        self.seed, self.random, self.epoch, self.split = seed, random, 0, split

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index = _epoch_and_index(key, self.epoch)
        where = f"{self.split} row {index}"
        row = read_row(self.ds, index, where)
        image = decode_rgb(row[self.image_column], where)
        mask = torch.from_numpy(mask_array(row[self.mask_column], where))
        height, width = image.shape[-2:]
        if mask.shape != (height, width):
            raise UserError(
                f"mask of {where} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}; they must match"
            )
        if not self.random:
            return eval_view(image, self.size), eval_view(mask, self.size, mask=True)
        crop = draw_crop(sample_rng(self.seed, epoch, index), height, width)
        return train_view(image, crop, self.size), train_view(mask, crop, self.size, mask=True)


def decide_decode(cfg, splits: Splits, cuda: bool) -> tuple[bool, str]:
    """(decode on the device?, why) for `data.decode`: said once in the start-up lines."""
    wanted = cfg.data.decode
    if wanted == "cpu":
        return False, "decoded by the CPU workers"
    fallback = f"data.decode={wanted}, but "
    if cfg.task == "segmentation":
        return False, fallback + "segmentation decodes on the CPU workers (image and mask are cropped together there)"
    if not cuda:
        return False, fallback + "there is no CUDA device: decoded by the CPU workers"
    first = image_bytes(_undecoded(splits.train, cfg.data.image_column)[0][cfg.data.image_column])
    if first is None or not is_jpeg(first):
        return False, fallback + "the first training image is not a JPEG file: decoded by the CPU workers"
    return True, "JPEG files decoded on the GPU (nvJPEG), the workers only read them and draw the crops"


def build_datasets(cfg, splits: Splits, classes: Classes, on_device: bool = False):
    """(train, val) torch datasets of the splits; `on_device`: the JPEGs are decoded by the device."""
    d = cfg.data
    if cfg.task == "segmentation":
        common = dict(image_column=d.image_column, mask_column=d.mask_column, size=d.image_size, seed=cfg.seed)
        train = SegmentationDataset(splits.train, random=d.augment, split=d.train_split, **common)
        return train, eval_dataset(cfg, splits.val, classes, splits.val_source, on_device)
    train = ImageDataset(splits.train, random=d.augment, **_image_options(cfg, classes, on_device))
    return train, eval_dataset(cfg, splits.val, classes, splits.val_source, on_device)


def _image_options(cfg, classes: Classes, on_device: bool) -> dict:
    d = cfg.data
    return dict(
        image_column=d.image_column,
        label_column=d.label_column,
        task=cfg.task,
        classes=classes,
        size=d.image_size,
        seed=cfg.seed,
        on_device=on_device,
    )


def eval_dataset(cfg, ds, classes: Classes, split_name: str, on_device: bool = False):
    """The evaluation view of one split (no augmentation): training's validation set, and what the `evaluate`
    command scores."""
    d = cfg.data
    if cfg.task == "segmentation":
        name = "validation (val_fraction)" if split_name == "val_fraction" else split_name
        common = dict(image_column=d.image_column, mask_column=d.mask_column, size=d.image_size, seed=cfg.seed)
        return SegmentationDataset(ds, random=False, split=name, **common)
    return ImageDataset(ds, random=False, **_image_options(cfg, classes, on_device))
