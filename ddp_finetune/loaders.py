"""The sampler and the DataLoaders.

`EpochSampler` draws one seeded permutation per epoch, the same on every rank; Accelerate's
`split_batches=True` then gives each rank its slice of every global batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from .errors import UserError


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
    # Each loader has a generator of its own: making an iterator draws the workers' base seed from
    # it, and from torch's global RNG otherwise, which would shift the dropout masks of a resumed
    # run (it makes one iterator more than an uninterrupted run) away from the uninterrupted one.
    train_dl = DataLoader(
        train_ds,
        batch_size=micro,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_dl = DataLoader(
        val_ds,
        batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return train_dl, val_dl, sampler
