"""Every built-in loss is a function of sums: local sums of a batch, summed over ranks, then a value.

A `Kernel` says which sums a loss needs (`statistics`) and how its value follows from them
(`value`). The sums of one batch travel as one flat tensor, with the batch's count of
out-of-range targets as its last entry, so a call does a single all-reduce and the target check
rides along. That split also gives exact gradient accumulation (`surrogate`): the value of the
whole step's batch needs only the sums of its micro-batches.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from ddp_finetune.distributed import all_reduce_sum_with_grad
from ddp_finetune.losses.batch import Batch


class Kernel(Protocol):
    """The maths of one loss with its options bound (see region.py, cross_entropy.py, focal.py)."""

    def statistics(self, batch: Batch, weights: Tensor | None) -> list[Tensor]:
        """Sums over the batch's elements (with autograd); their layout must not depend on N."""

    def value(self, parts: list[Tensor], weights: Tensor | None) -> Tensor:
        """The loss from the statistics summed over everything it covers (ranks, micro-batches)."""

    def needs_statistics_pass(self, mode: str, ignore_index: int | None, weighted: bool) -> bool:
        """Whether the mean of equal micro-batches' losses differs from the loss of their union."""


def local_statistics(kernel: Kernel, batch: Batch, weights: Tensor | None) -> tuple[Tensor, list[torch.Size]]:
    """The batch's statistics as one flat tensor (the bad-target count last) and their shapes."""
    parts = kernel.statistics(batch, weights)
    flat = torch.cat([p.reshape(-1) for p in parts] + [batch.bad.to(batch.x.dtype).reshape(1)])
    return flat, [p.shape for p in parts]


def value_of(kernel: Kernel, flat: Tensor, shapes: list[torch.Size], weights: Tensor | None) -> Tensor:
    """The loss from flat summed statistics (the bad-target count, last, is not part of it)."""
    sizes = [math.prod(s) for s in shapes]
    parts = [part.reshape(s) for part, s in zip(flat[:-1].split(sizes), shapes)]
    return kernel.value(parts, weights)


def compute(kernel: Kernel, batch: Batch, weights: Tensor | None, sync: bool) -> tuple[Tensor, Tensor]:
    """(loss, bad-target count summed over ranks): the statistics summed over ranks *with
    autograd* in one all-reduce when `sync`, then the value. Nothing here waits for the device."""
    flat, shapes = local_statistics(kernel, batch, weights)
    if sync:
        flat = all_reduce_sum_with_grad(flat)
    return value_of(kernel, flat, shapes, weights), flat[-1].detach()


def surrogate(kernel: Kernel, batch: Batch, weights: Tensor | None, global_stats: Tensor, scale: int) -> Tensor:
    """F(S) + scale·<∂F/∂S at S, s − s.detach()>: the value F(S) of the global statistics S, and
    the gradient of F(S) that flows through this micro-batch's local statistics s, times `scale`.

    With S = Σ over ranks r and micro-batches i of s_ri, the chain rule gives
    ∇θ F(S) = Σ_ri <∂F/∂S, ∇θ s_ri>: the global gradient is a sum of per-micro-batch terms,
    each needing S (held constant) and that micro-batch's own forward. The loop divides each
    micro-batch's loss by k and DDP averages over N ranks, so `scale` = k·N undoes both.
    """
    local, shapes = local_statistics(kernel, batch, weights)
    if global_stats.shape != local.shape:
        raise ValueError(
            f"global statistics of shape {tuple(global_stats.shape)} do not fit this loss and batch, whose "
            f"statistics have shape {tuple(local.shape)}: pass the reduced sum of `statistics()` of the same loss"
        )
    total = global_stats.detach().to(local.dtype)
    with torch.enable_grad():
        total = total.clone().requires_grad_(True)
        value = value_of(kernel, total, shapes, weights)
        (slope,) = torch.autograd.grad(value, total)
    # local - local.detach() is exactly 0: the value is F(S), the gradient slope·∇s·scale
    return value.detach() + scale * (slope * (local - local.detach())).sum()
