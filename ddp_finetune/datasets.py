"""Torch datasets over a Hugging Face split: (image tensor, target) pairs for every task.

Segmentation (`task: segmentation`) pairs each image with a mask of class indices; the same v2
transforms crop, flip and resize both together (`tv_tensors.Mask` is resized with NEAREST).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .data import Classes, Splits
from .errors import UserError
from .images import mask_array, open_rgb, read_row
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, sample_rng


class ImageDataset(Dataset):
    """A Hugging Face split as (image tensor, target) pairs.

    Targets: class index (classification), float 0/1 of shape (1,) (binary), multi-hot float
    vector (multilabel). Random transforms are seeded per (seed, epoch, index), so they do not
    depend on which rank, worker or restart loads the sample.
    """

    def __init__(
        self,
        hf_ds,
        transform,
        image_column: str,
        label_column: str,
        task: str,
        classes: Classes,
        seed: int = 0,
        random: bool = False,
    ):
        self.ds, self.transform = hf_ds, transform
        self.image_column, self.label_column = image_column, label_column
        self.task, self.classes = task, classes
        self.label_to_index = classes.label_to_index
        self.seed, self.random, self.epoch = seed, random, 0

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

    def __getitem__(self, index):
        row = read_row(self.ds, int(index), f"row {int(index)}")
        image = open_rgb(row[self.image_column])
        if self.random:
            with sample_rng(self.seed, self.epoch, index):
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, self.target(row[self.label_column])


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

        where = f"{self.split} row {int(index)}"
        row = read_row(self.ds, int(index), where)
        image = open_rgb(row[self.image_column])
        mask = mask_array(row[self.mask_column], where)
        if mask.shape != (image.height, image.width):
            raise UserError(
                f"mask of {where} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}; they must match"
            )
        mask = tv_tensors.Mask(torch.from_numpy(mask))
        if self.random:
            with sample_rng(self.seed, self.epoch, index):
                x, y = self.transform(image, mask)
        else:
            x, y = self.transform(image, mask)
        return x, y.as_subclass(torch.Tensor)


def build_datasets(cfg, splits: Splits, classes: Classes, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(train, val) torch datasets of the splits, normalized with the model's `mean` / `std`."""
    d = cfg.data
    train_tf, eval_tf = build_transforms(d.image_size, d.augment, mean, std)  # v2: the same calls move image and Mask
    if cfg.task == "segmentation":
        common = dict(image_column=d.image_column, mask_column=d.mask_column, seed=cfg.seed)
        train = SegmentationDataset(splits.train, train_tf, random=d.augment, split=d.train_split, **common)
        val_name = "validation (val_fraction)" if splits.val_source == "val_fraction" else splits.val_source
        val = SegmentationDataset(splits.val, eval_tf, random=False, split=val_name, **common)
        return train, val
    common = dict(image_column=d.image_column, label_column=d.label_column, task=cfg.task, classes=classes)
    train = ImageDataset(splits.train, train_tf, seed=cfg.seed, random=d.augment, **common)
    val = ImageDataset(splits.val, eval_tf, seed=cfg.seed, random=False, **common)
    return train, val
