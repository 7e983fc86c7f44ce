"""The sampler, the number of data workers, and the DataLoaders.

`EpochSampler` draws one seeded permutation per epoch, the same on every rank, and yields
(epoch, index) keys; Accelerate's `split_batches=True` then gives each rank its slice of every
global batch. `plan_loaders` decides the workers (`data.num_workers: auto`), pinning and prefetch
depth once, and says why in the start-up lines.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from ddp_finetune import distributed as dist_utils
from ddp_finetune.data.mixing import Mixing
from ddp_finetune.data.transforms import EncodedBatch
from ddp_finetune.errors import UserError

BATCHES_IN_FLIGHT = 4  # at least this many batches prepared ahead of the step, whatever the worker count


class EpochSampler(Sampler):
    """A seeded permutation per epoch, the same on every rank, cut to whole global batches.

    Keeping only `len // batch_size * batch_size` indices makes every optimizer step see exactly
    one global batch, at any world size and accumulation. It yields (epoch, index): the dataset
    seeds the sample's augmentation from both, also in workers that outlive the epoch.

    `class_weights` (`data.sampler: balanced`: one weight per sample, 1 / its class's count): the
    epoch's indices are seeded draws with replacement instead, each class equally likely. With
    them or with `mixing` (Mixup / CutMix) it yields (epoch, index, repeat, partner, partner_repeat):
    `repeat` counts the earlier draws of `index` in the epoch (a repeated sample is augmented anew),
    `partner` is the index of the sample of the same global batch mixed into it (-1: none).
    Every key is a function of (seed, epoch, position), so `skip_first_batches` resumes mid-epoch exactly.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        class_weights: list[float] | None = None,
        mixing: Mixing | None = None,
    ):
        self.length, self.batch_size, self.seed, self.shuffle = length, batch_size, seed, shuffle
        self.class_weights, self.mixing = class_weights, mixing
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length // self.batch_size * self.batch_size

    def order(self) -> list[int]:
        """This epoch's sample indices, in order."""
        if not self.shuffle:
            return list(range(len(self)))
        g = torch.Generator()
        g.manual_seed(self.seed * 7919 + self.epoch)
        if self.class_weights is not None:
            weights = torch.tensor(self.class_weights, dtype=torch.float64)
            return torch.multinomial(weights, len(self), replacement=True, generator=g).tolist()
        return torch.randperm(self.length, generator=g).tolist()[: len(self)]

    def keys(self) -> list[tuple]:
        """This epoch's keys, as the dataset receives them."""
        epoch, order = self.epoch, self.order()
        if self.class_weights is None and self.mixing is None:
            return [(epoch, index) for index in order]
        seen: dict[int, int] = {}
        repeats = []
        for index in order:
            repeats.append(seen.get(index, 0))
            seen[index] = repeats[-1] + 1
        keys = []
        for start in range(0, len(order), self.batch_size):
            batch, reps = order[start : start + self.batch_size], repeats[start : start + self.batch_size]
            partners = self.mixing.partners(self.seed, epoch, batch, reps) if self.mixing else [-1] * len(batch)
            for index, repeat, p in zip(batch, reps, partners):
                keys.append((epoch, index, repeat, batch[p] if p >= 0 else -1, reps[p] if p >= 0 else 0))
        return keys

    def __iter__(self):
        return iter(self.keys())


def balanced_weights(labels: list[int]) -> list[float]:
    """Each sample's draw weight for `data.sampler: balanced`: 1 / the count of its class."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


@dataclass(frozen=True)
class LoaderPlan:
    """How each rank loads data: worker processes, pinned memory, batches each worker prepares ahead."""

    workers: int
    why: str
    pin_memory: bool
    prefetch: int | None  # DataLoader's prefetch_factor (None without workers)

    def describe(self) -> str:
        if not self.workers:
            return f"data loading: in the training process ({self.why})"
        pinned = "pinned memory" if self.pin_memory else "no pinned memory (CPU)"
        return (
            f"data loading: {self.workers} worker{'s' if self.workers > 1 else ''} per rank ({self.why}), "
            f"persistent, {self.prefetch} batches ahead each, {pinned}"
        )


def plan_loaders(num_workers, cuda: bool) -> LoaderPlan:
    """Workers per rank for `data.num_workers` (a number, or `auto`), and the settings that go with them."""
    if num_workers == "auto":
        cpus, source = dist_utils.usable_cpus()
        local = dist_utils.local_world_size()
        # the training process keeps what it computes with: on a GPU one CPU (it runs the loop and
        # launches the GPU's work); on a CPU run its torch threads (an OpenMP thread that shares a
        # core with a worker stalls the others at every barrier: measured 13 against 75 images/s)
        keep = 1 if cuda else max(1, torch.get_num_threads())
        workers = max(0, cpus // local - keep)
        per = f" / {local} processes on this node" if local > 1 else ""
        kept = "1 for the training loop" if cuda else f"{keep} for the training process's torch threads"
        why = f"auto: {cpus} CPUs ({source}){per}, minus {kept}"
    else:
        workers, why = num_workers, f"data.num_workers={num_workers}"
    prefetch = max(2, math.ceil(BATCHES_IN_FLIGHT / workers)) if workers else None
    return LoaderPlan(workers=workers, why=why, pin_memory=cuda, prefetch=prefetch)


def collate_encoded(samples):
    """A batch of (EncodedImage, target) samples (`data.decode: gpu`) as (EncodedBatch, targets)."""
    images, targets = zip(*samples)
    return [EncodedBatch.collate(list(images)), default_collate(list(targets))]


def _loader(dataset, plan: LoaderPlan, seed: int, **kwargs) -> DataLoader:
    # Each loader has a generator of its own: making an iterator draws the workers' base seed from
    # it, and from torch's global RNG otherwise, which would shift the dropout masks of a resumed
    # run (it makes one iterator more than an uninterrupted run) away from the uninterrupted one.
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        num_workers=plan.workers,
        pin_memory=plan.pin_memory,
        persistent_workers=plan.workers > 0,
        prefetch_factor=plan.prefetch,
        generator=generator,
        collate_fn=collate_encoded if getattr(dataset, "on_device", False) else None,
        **kwargs,
    )


def build_loaders(cfg, train_ds, val_ds, plan: LoaderPlan):
    """Loaders whose batch is the *global* micro-batch: Accelerate's split_batches divides it by ranks."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if len(train_ds) < cfg.train.batch_size:
        raise UserError(
            f"the training split has {len(train_ds)} images, fewer than train.batch_size={cfg.train.batch_size}; "
            "lower train.batch_size or add data"
        )
    weights = balanced_weights(train_ds.class_indices()) if cfg.data.sampler == "balanced" else None
    mixing = Mixing.from_config(cfg.data)
    sampler = EpochSampler(len(train_ds), cfg.train.batch_size, cfg.seed, class_weights=weights, mixing=mixing)
    train_dl = _loader(train_ds, plan, cfg.seed, batch_size=micro, sampler=sampler, drop_last=True)
    val_dl = _loader(val_ds, plan, cfg.seed, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size)
    return train_dl, val_dl, sampler


def eval_batch_size(cfg, processes: int) -> int:
    """The global evaluation batch (`train.eval_batch_size`, else `train.batch_size`), which Accelerate cuts
    into equal shares: one line when it does not divide by the processes (training and `evaluate`)."""
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    if batch % processes:
        raise UserError(
            f"train.eval_batch_size={batch} does not divide by {processes} processes; use a multiple of {processes}"
        )
    return batch
