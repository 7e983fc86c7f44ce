"""`Loss`: the base class of every built-in loss, with what a training loop needs beyond `forward`.

    loss_fn = DiceLoss("multiclass", ignore_index=255, defer_target_check=True)   # a subclass of Loss
    loss = loss_fn(logits, targets)          # no host sync
    ...
    loss_fn.check_targets()                  # on log / checkpoint steps: raises on every rank

Exact gradient accumulation of a region loss (`needs_statistics_pass`), for the k micro-batches
(x_i, y_i) of one optimizer step on each of N ranks:

    stats = sum(loss_fn.statistics(model(x_i), y_i) for i in range(k))   # no autograd
    stats = loss_fn.reduce_statistics(stats)                             # one all-reduce
    for i in range(k):
        loss_i = loss_fn.surrogate(model(x_i), y_i, stats, micro_batches=k)
        accelerator.backward(loss_i / k)

Both passes must see the same outputs (same dropout masks, BatchNorm statistics). The gradient
that DDP averages is then the gradient of the loss of the whole global batch, and every
`loss_i` equals that loss (so Σ loss_i / k does too).
"""

from __future__ import annotations

import inspect
import typing
from typing import ClassVar

import torch
from torch import Tensor, nn

from ddp_finetune.distributed import sum_across_ranks, world_size
from ddp_finetune.errors import UserError
from ddp_finetune.losses.batch import (
    Batch,
    Mode,
    bad_targets_here,
    bad_targets_since,
    check_weight_count,
    no_autocast,
    prepare,
)
from ddp_finetune.losses.kinds import Accumulation as LossAccumulation
from ddp_finetune.losses.options import check_options, weight_list
from ddp_finetune.losses.statistics import compute, local_statistics, surrogate

ACCUMULATIONS = typing.get_args(LossAccumulation)


class Loss(nn.Module):
    """The base of every built-in loss (`DiceLoss`, `FocalLoss`, ... in region.py, focal.py,
    cross_entropy.py): a kernel (the maths: which sums, the value from them) with its options
    bound, plus what a training loop needs beyond `forward(logits, targets)`.

    A subclass sets `name` (its `loss.name`) and `kernel_type`, and its `__init__` takes the mode,
    its own options as typed keyword-only parameters named like `config.LossConfig` fields (that
    is how `build_loss` passes the config: by name), then the common ones, and hands them here.
    The common options:
    - `ignore_index`, `class_weights`, `sync`: see the package docstring;
    - `accumulation`: `exact` (default) makes `needs_statistics_pass` true for region losses
      (see the module docstring); `micro_batch` leaves each micro-batch its own loss;
    - `defer_target_check`: False (default) raises on a bad target value in the call that sees
      it, which reads a count back from the device (a host sync per call). True only counts
      them on the device; `check_targets()` raises later, on every rank.
    """

    name: ClassVar[str]
    """The loss's `loss.name` (its row in table.LOSSES)."""
    kernel_type: ClassVar[type]
    """A frozen dataclass whose fields are the loss's own options: the maths (statistics.Kernel)."""

    COMMON: ClassVar[tuple[str, ...]] = ("ignore_index", "class_weights", "sync")
    TRAINING: ClassVar[tuple[str, ...]] = ("accumulation", "defer_target_check")

    def __init__(
        self,
        mode: Mode,
        own_options: dict,
        *,
        ignore_index: int | None = None,
        class_weights=None,
        sync: bool = True,
        accumulation: LossAccumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__()
        self.mode = mode
        self.options = {**own_options, "ignore_index": ignore_index, "class_weights": class_weights, "sync": sync}
        check_options(self.name, self.mode, self.options, owner=self.label)
        if accumulation not in ACCUMULATIONS:
            raise UserError(f"{self.label}: accumulation={accumulation!r} is not one of {', '.join(ACCUMULATIONS)}")
        self.accumulation = accumulation
        self.defer_target_check = defer_target_check
        self.kernel = self.kernel_type(**own_options)
        self._weights = weight_list(class_weights)
        self._weight_tensors: dict[tuple, Tensor] = {}  # per (device, dtype): no copy to the device per call
        self._bad_targets: Tensor | None = None  # deferred count, on the device
        self._expected = ""

    # ---------------------------------------------------------------- what the class takes

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options it takes (its own, then the common ones): `LossConfig` field names."""
        params = inspect.signature(cls.__init__).parameters.values()
        kw = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        return tuple(n for n in kw if n not in cls.TRAINING)

    @classmethod
    def defaults(cls) -> dict:
        params = inspect.signature(cls.__init__).parameters
        return {n: params[n].default for n in cls.option_names()}

    @classmethod
    def default_mode(cls) -> str:
        return inspect.signature(cls.__init__).parameters["mode"].default

    @classmethod
    def is_region(cls) -> bool:
        """A ratio of sums over the batch (Dice-like): `loss.accumulation` applies to it."""
        return getattr(cls.kernel_type, "region", False)

    @property
    def label(self) -> str:
        return f"{self.name}_loss"

    @property
    def sync(self) -> bool:
        return self.options["sync"]

    def extra_repr(self) -> str:
        shown = {"mode": self.mode, **self.options, "accumulation": self.accumulation}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())

    # ---------------------------------------------------------------- the loss of one batch

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with no_autocast(logits):
            batch = self._prepare(logits, targets)
            value, bad = compute(self.kernel, batch, self._weight_tensor(batch), self.sync)
            self._record_bad(bad, batch)
            return value

    def check_targets(self) -> None:
        """Raise the UserError for bad target values counted since the last check (deferred mode).

        Reads one number from the device (a host sync): call it on log / checkpoint steps and
        before evaluation, on every rank at the same step. The count was summed over ranks by the
        loss's own all-reduce (with `sync=False`, by one here), so every rank raises the same
        one-line message."""
        if self._bad_targets is None:
            return
        count = self._bad_targets if self.sync else sum_across_ranks(self._bad_targets)
        self._bad_targets = None
        n = int(count.item())
        if n > 0:
            raise bad_targets_since(self.label, self.mode, n, self._expected)

    # ---------------------------------------------------------------- exact accumulation

    @property
    def needs_statistics_pass(self) -> bool:
        """True when the loss of a step's global batch needs the sums of all its micro-batches:
        `accumulation=exact` and a region loss, except `per_image` ones, whose mean over images
        equal micro-batches already give (unless dice_bce's BCE mean has a count of elements
        that depends on the targets: ignore_index, multiclass class weights). False: call the
        loss on each micro-batch as usual (cross-entropy, focal: see CrossEntropyKernel)."""
        weighted = self._weights is not None
        needs = self.kernel.needs_statistics_pass(self.mode, self.options["ignore_index"], weighted)
        return self.accumulation == "exact" and needs

    def statistics(self, logits: Tensor, targets: Tensor) -> Tensor:
        """This micro-batch's local sums: a detached 1-D tensor, float32 (float64 for float64
        logits). Add them over the step's micro-batches, then `reduce_statistics` once."""
        with torch.no_grad(), no_autocast(logits):
            batch = self._prepare(logits, targets)
            flat, _ = local_statistics(self.kernel, batch, self._weight_tensor(batch))
        self._expected = batch.expected
        return flat

    def reduce_statistics(self, stats: Tensor) -> Tensor:
        """The step's statistics summed over ranks (one all-reduce; none with `sync=False`).

        Its bad-target count goes to the check as in `forward` (deferred: no host sync)."""
        total = sum_across_ranks(stats) if self.sync else stats.detach().clone()
        self._record_bad(total[-1], None)
        return total

    def surrogate(self, logits: Tensor, targets: Tensor, global_stats: Tensor, micro_batches: int) -> Tensor:
        """A loss whose value is the global batch's loss F(S) (S = `global_stats`, from
        `reduce_statistics`) and whose gradient, once the loop has divided it by `micro_batches`
        (k) and DDP has averaged over the N ranks, sums with the other micro-batches' to the
        gradient of F(S). No collective, no host sync; its bad targets were counted in
        `statistics`."""
        with no_autocast(logits):
            batch = self._prepare(logits, targets)
            scale = micro_batches * (world_size() if self.sync else 1)
            return surrogate(self.kernel, batch, self._weight_tensor(batch), global_stats, scale)

    # ---------------------------------------------------------------- helpers

    def _prepare(self, logits: Tensor, targets: Tensor) -> Batch:
        soft_ok = getattr(self.kernel, "soft_targets", False)
        return prepare(self.label, logits, targets, self.mode, self.options["ignore_index"], soft_ok)

    def _weight_tensor(self, batch: Batch) -> Tensor | None:
        if self._weights is None:
            return None
        check_weight_count(self.label, self._weights, batch.num_classes)
        key = (batch.x.device, batch.x.dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self._weights, dtype=batch.x.dtype, device=batch.x.device)
        return self._weight_tensors[key]

    def _record_bad(self, count: Tensor, batch: Batch | None) -> None:
        """Raise now (one host sync) or add the rank-summed count to the deferred one (none)."""
        if self.defer_target_check:
            if batch is not None:
                self._expected = batch.expected
            self._bad_targets = count.clone() if self._bad_targets is None else self._bad_targets + count
            return
        if batch is not None:
            error = bad_targets_here(batch, count)
        elif count.item() > 0:
            error = bad_targets_since(self.label, self.mode, int(count.item()), self._expected)
        else:
            error = None
        if error is not None:
            raise error
