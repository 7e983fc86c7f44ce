"""The one table of built-in losses: `loss.name` -> its class and its function.

Adding a loss (tests/test_losses.py::test_a_loss_added_as_documented_works_everywhere does it):
1. its kernel, a frozen dataclass of its own options with `statistics` (the sums it needs) and
   `value` (the loss from the summed sums), see statistics.Kernel; `region = True` for a ratio of
   sums over the batch (Dice-like), whose exact accumulation needs a statistics pass;
2. its class, `class MyLoss(Loss)` with `name` and `kernel_type`, and an `__init__` taking the
   mode, its options as typed keyword-only parameters named like `config.LossConfig` fields (a new
   option is a new LossConfig field), then the common ones, passed to `Loss.__init__`;
3. optionally its function, `my_loss(logits, targets, mode, **options)`: `MyLoss(...)(logits, targets)`;
4. one row below.
Synchronization across ranks, exact accumulation, the deferred target check and the config's
checks (`build.check_loss_config`: which options a loss reads) come from `Loss` and this table.
"""

from __future__ import annotations

from ddp_finetune.losses.cross_entropy import CrossEntropyLoss, cross_entropy_loss
from ddp_finetune.losses.focal import FocalLoss, focal_loss
from ddp_finetune.losses.module import Loss
from ddp_finetune.losses.region import (
    DiceBCELoss,
    DiceLoss,
    IoULoss,
    TverskyLoss,
    dice_bce_loss,
    dice_loss,
    iou_loss,
    tversky_loss,
)

LOSSES: dict[str, type[Loss]] = {
    "cross_entropy": CrossEntropyLoss,
    "dice": DiceLoss,
    "dice_bce": DiceBCELoss,
    "iou": IoULoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
}
"""Each built-in loss by its `loss.name`, as its `nn.Module` class."""

LOSS_FUNCTIONS = {
    "cross_entropy": cross_entropy_loss,
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
    "iou": iou_loss,
    "focal": focal_loss,
    "tversky": tversky_loss,
}
"""The same losses as functions (each builds its class and calls it once)."""

LOSS_MODULES = LOSSES  # the name this table had when it held only the classes

LOSS_NAMES = tuple(LOSSES)

TASK_MODES = {
    "classification": "multiclass",
    "binary": "binary",
    "multilabel": "multilabel",
    "segmentation": "multiclass",
}
"""The mode a task's labels need: class indices -> multiclass, one float -> binary, multi-hot -> multilabel."""
