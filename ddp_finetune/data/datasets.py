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

from ddp_finetune.data.checks import column_values
from ddp_finetune.data.images import as_byte_tensor, decode_rgb, image_bytes, is_jpeg, jpeg_size, mask_array, read_row
from ddp_finetune.data.mixing import Mixing, mix_rng
from ddp_finetune.data.sources import Classes, Splits
from ddp_finetune.data.transforms import (
    EVAL_CROP_FRACTION,
    PHOTOMETRIC_STREAM,
    Augmentation,
    EncodedImage,
    eval_view,
    sample_rng,
    sample_seed,
    train_view,
)
from ddp_finetune.errors import UserError


def _undecoded(hf_ds, column: str):
    """The split with its Image column left encoded ({"bytes", "path"} cells): the workers decode with
    torchvision.io, or hand the file to the device, instead of receiving a PIL image."""
    import datasets

    feature = hf_ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return hf_ds.cast_column(column, datasets.Image(decode=False))
    return hf_ds


def _parse_key(key, epoch: int) -> tuple[int, int, int, int, int]:
    """(epoch, index, repeat, partner, partner_repeat) of a sampler key (`loaders.EpochSampler`) or a bare index."""
    if not isinstance(key, tuple):
        return epoch, int(key), 0, -1, 0
    if len(key) == 2:
        return int(key[0]), int(key[1]), 0, -1, 0
    return tuple(int(k) for k in key)  # type: ignore[return-value]


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
        augmentation: Augmentation | None = None,
        mixing: Mixing | None = None,
        eval_crop: tuple[float, str] = (EVAL_CROP_FRACTION, "bilinear"),
    ):
        self.ds = _undecoded(hf_ds, image_column)
        self.image_column, self.label_column = image_column, label_column
        self.task, self.classes, self.size = task, classes, size
        self.label_to_index = classes.label_to_index
        self.seed, self.random, self.on_device, self.epoch = seed, random, on_device, 0
        self.augmentation = augmentation or Augmentation()
        self.mixing, self.eval_crop = mixing, eval_crop

    def __len__(self):
        return len(self.ds)

    def class_indices(self) -> list[int]:
        """Every sample's class index, in order (`data.sampler: balanced`)."""
        return [self._index(label) for label in column_values(self.ds, self.label_column)]

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

    def crop(self, epoch: int, index: int, height: int, width: int, repeat: int = 0):
        """The sample's augmentation (None without `random`): the one draw both decoding paths use."""
        if not self.random:
            return None
        return self.augmentation.draw_crop(sample_rng(self.seed, epoch, index, repeat=repeat), height, width)

    def __getitem__(self, key):
        epoch, index, repeat, partner, partner_repeat = _parse_key(key, self.epoch)
        if self.on_device:
            row = read_row(self.ds, index, f"row {index}")
            return self._encoded(row[self.image_column], epoch, index, repeat), self.target(row[self.label_column])
        x, t = self.view(epoch, index, repeat)
        if self.mixing is None:
            return x, t
        t = self._soft(t)
        if partner < 0:
            return x, t
        x_b, t_b = self.view(epoch, partner, partner_repeat)
        return self.mixing.mix(x, x_b, t, self._soft(t_b), mix_rng(self.seed, epoch, index, repeat))

    def view(self, epoch: int, index: int, repeat: int = 0):
        """(uint8 image, target) of one sample as the model sees it before mixing: cropped, flipped and
        photometrically augmented when `random`, else the evaluation view."""
        row = read_row(self.ds, index, f"row {index}")
        image = decode_rgb(row[self.image_column], f"row {index}")
        crop = self.crop(epoch, index, *image.shape[-2:], repeat=repeat)
        if crop is None:
            return eval_view(image, self.size, False, *self.eval_crop), self.target(row[self.label_column])
        x = train_view(image, crop, self.size)
        x = self.augmentation.photometric(x, sample_seed(self.seed, epoch, index, PHOTOMETRIC_STREAM, repeat))
        return x, self.target(row[self.label_column])

    def _soft(self, target):
        """A float target vector to mix: one-hot for a class index (classification)."""
        if self.task == "classification":
            return torch.nn.functional.one_hot(torch.tensor(target), self.classes.outputs).float()
        return target

    def _encoded(self, cell, epoch: int, index: int, repeat: int = 0) -> EncodedImage:
        data = image_bytes(cell)
        if data is not None and is_jpeg(data):
            size = jpeg_size(data)
            if size is not None:  # the header says nvJPEG can decode it
                path = cell.get("path") if isinstance(cell, dict) else None
                name = path or f"row {index}"  # named if nvJPEG rejects it after all
                return EncodedImage(as_byte_tensor(data), self.crop(epoch, index, *size, repeat), self.size, name)
        image = decode_rgb(
            cell, f"row {index}"
        )  # not a JPEG nvJPEG takes: decoded here, cropped on the device all the same
        return EncodedImage(image, self.crop(epoch, index, *image.shape[-2:], repeat), self.size)


class SegmentationDataset(Dataset):
    """A Hugging Face split as (uint8 image (3, S, S), int64 class-index mask (S, S)) pairs.

    One crop and flip (drawn per (seed, epoch, index), as in `ImageDataset`) moves both; masks are
    resized with NEAREST. Masks stay int64 on the way to the device: a uint8 mask would wrap a
    class index above 255 into a valid-looking one instead of letting the loss report it.
    """

    def __init__(self, hf_ds, image_column, mask_column, size, seed=0, random=False, split="train", augmentation=None):
        self.ds = _undecoded(hf_ds, image_column)
        self.image_column, self.mask_column, self.size = image_column, mask_column, size
        self.seed, self.random, self.epoch, self.split = seed, random, 0, split
        self.augmentation = augmentation or Augmentation()

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index, repeat, _, _ = _parse_key(key, self.epoch)
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
        # geometric (crop, flip): image and mask together; photometric (colour, erasing): the image only
        crop = self.augmentation.draw_crop(sample_rng(self.seed, epoch, index, repeat=repeat), height, width)
        x = train_view(image, crop, self.size)
        x = self.augmentation.photometric(x, sample_seed(self.seed, epoch, index, PHOTOMETRIC_STREAM, repeat))
        return x, train_view(mask, crop, self.size, mask=True)


def decide_decode(cfg, splits: Splits, cuda: bool) -> tuple[bool, str]:
    """(decode on the device?, why) for `data.decode`: said once in the start-up lines."""
    wanted = cfg.data.decode
    if wanted == "cpu":
        return False, "decoded by the CPU workers"
    fallback = f"data.decode={wanted}, but "
    if cfg.task == "segmentation":
        return False, fallback + "segmentation decodes on the CPU workers (image and mask are cropped together there)"
    d = cfg.data
    if d.augment and Augmentation.from_config(d).has_photometric or Mixing.from_config(d) is not None:
        return False, fallback + "data.policy / color_jitter / random_erasing / Mixup / CutMix run on the CPU workers"
    if not cuda:
        return False, fallback + "there is no CUDA device: decoded by the CPU workers"
    first = image_bytes(_undecoded(splits.train, cfg.data.image_column)[0][cfg.data.image_column])
    if first is None or not is_jpeg(first):
        return False, fallback + "the first training image is not a JPEG file: decoded by the CPU workers"
    return True, "JPEG files decoded on the GPU (nvJPEG), the workers only read them and draw the crops"


def build_datasets(cfg, splits: Splits, classes: Classes, on_device: bool = False, eval_crop=None):
    """(train, val) torch datasets of the splits; `on_device`: the JPEGs are decoded by the device;
    `eval_crop`: (crop fraction, interpolation) of the evaluation view (the model's; None: torchvision's)."""
    d = cfg.data
    augmentation = Augmentation.from_config(d)
    val = eval_dataset(cfg, splits.val, classes, splits.val_source, on_device, eval_crop)
    if cfg.task == "segmentation":
        common = dict(image_column=d.image_column, mask_column=d.mask_column, size=d.image_size, seed=cfg.seed)
        train = SegmentationDataset(
            splits.train, random=d.augment, split=d.train_split, augmentation=augmentation, **common
        )
        return train, val
    common = _image_options(cfg, classes, on_device, eval_crop)
    train = ImageDataset(
        splits.train, random=d.augment, augmentation=augmentation, mixing=Mixing.from_config(d), **common
    )
    return train, val


def _image_options(cfg, classes: Classes, on_device: bool, eval_crop=None) -> dict:
    d = cfg.data
    return dict(
        image_column=d.image_column,
        label_column=d.label_column,
        task=cfg.task,
        classes=classes,
        size=d.image_size,
        seed=cfg.seed,
        on_device=on_device,
        eval_crop=eval_crop or (EVAL_CROP_FRACTION, "bilinear"),
    )


def eval_dataset(cfg, ds, classes: Classes, split_name: str, on_device: bool = False, eval_crop=None):
    """The evaluation view of one split (no augmentation): training's validation set, and what the `evaluate`
    command scores; `eval_crop` as in `build_datasets`."""
    d = cfg.data
    if cfg.task == "segmentation":
        name = "validation (val_fraction)" if split_name == "val_fraction" else split_name
        common = dict(image_column=d.image_column, mask_column=d.mask_column, size=d.image_size, seed=cfg.seed)
        return SegmentationDataset(ds, random=False, split=name, **common)
    return ImageDataset(ds, random=False, **_image_options(cfg, classes, on_device, eval_crop))
