"""The one table of built-in losses: `loss.name` -> its function, its maths and its module's name.

Adding a loss: write its kernel (the sums it needs and its value from them, see statistics.py)
and its public function (options as keyword-only parameters named like `LossConfig` fields, a
docstring with the formula), then add one row here. The module class, the config checks (which
options it reads) and `build_loss` follow from the row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor

from .cross_entropy import CrossEntropyKernel, cross_entropy_loss
from .focal import FocalKernel, focal_loss
from .region import (
    DiceBCEKernel,
    DiceKernel,
    IoUKernel,
    RegionKernel,
    TverskyKernel,
    dice_bce_loss,
    dice_loss,
    iou_loss,
    tversky_loss,
)

COMMON_OPTIONS = ("ignore_index", "class_weights", "sync")
"""Options every built-in loss reads; the others are its kernel's fields."""


@dataclass(frozen=True)
class LossSpec:
    function: Callable[..., Tensor]
    """fn(logits, targets, mode, *, options...) -> scalar loss; the options are keyword-only."""
    kernel: type
    """A frozen dataclass whose fields are the loss's own options (all but COMMON_OPTIONS)."""
    module: str
    """The name of its nn.Module class in `ddp_finetune.losses`."""

    @property
    def options(self) -> tuple[str, ...]:
        """The options it reads: its function's keyword-only parameters, named like LossConfig fields."""
        params = inspect.signature(self.function).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def defaults(self) -> dict:
        params = inspect.signature(self.function).parameters
        return {name: params[name].default for name in self.options}

    @property
    def default_mode(self) -> str:
        return inspect.signature(self.function).parameters["mode"].default

    @property
    def kernel_options(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.kernel))

    @property
    def region(self) -> bool:
        """A ratio of sums over the batch (Dice-like): `loss.accumulation` applies to it."""
        return issubclass(self.kernel, RegionKernel)


LOSSES = {
    "cross_entropy": LossSpec(cross_entropy_loss, CrossEntropyKernel, "CrossEntropyLoss"),
    "dice": LossSpec(dice_loss, DiceKernel, "DiceLoss"),
    "dice_bce": LossSpec(dice_bce_loss, DiceBCEKernel, "DiceBCELoss"),
    "iou": LossSpec(iou_loss, IoUKernel, "IoULoss"),
    "focal": LossSpec(focal_loss, FocalKernel, "FocalLoss"),
    "tversky": LossSpec(tversky_loss, TverskyKernel, "TverskyLoss"),
}

LOSS_NAMES = tuple(LOSSES)

TASK_MODES = {
    "classification": "multiclass",
    "binary": "binary",
    "multilabel": "multilabel",
    "segmentation": "multiclass",
}
"""The mode a task's labels need: class indices -> multiclass, one float -> binary, multi-hot -> multilabel."""
