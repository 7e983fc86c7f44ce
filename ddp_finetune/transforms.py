"""Transforms (torchvision v2) and the per-sample seeds that make augmentation rank-independent.

Augmentation is seeded per (seed, epoch, sample index), so a sample is cropped and flipped the
same way whichever rank, worker or restart loads it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .models.parts import IMAGENET_MEAN, IMAGENET_STD  # what a model without its own statistics expects


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
def sample_rng(seed: int, epoch: int, index: int):
    """Torch's global RNG seeded for one sample's transform, restored afterwards: the draw depends
    on (seed, epoch, index) only, not on which rank, worker or restart loads the sample."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, index))
        yield
