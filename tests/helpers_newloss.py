"""A loss added with only the steps losses/table.py documents, as a user or contributor would:
a kernel, a `Loss` subclass, a function, a row in the table. Used by tests/test_losses.py and
tests/scripts/losses_2proc.py (on 2 ranks) to prove that sync, exact accumulation and the config's
checks come with it.

V-Net's Dice (Milletari et al. 2016): 1 - (2 Σp·t + s) / (Σp² + Σt + s) per class, the squared
probabilities in the denominator (t is 0/1, so Σt² = Σt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ddp_finetune.losses import table
from ddp_finetune.losses.batch import Batch, Mode, divide
from ddp_finetune.losses.kinds import Accumulation
from ddp_finetune.losses.module import Loss

NAME = "vnet_dice"


@dataclass(frozen=True)
class VNetDiceKernel:  # step 1: the sums it needs and its value from them
    smooth: float = 1.0
    region: ClassVar[bool] = True  # a ratio of sums over the batch

    def statistics(self, batch: Batch, weights: Tensor | None) -> list[Tensor]:
        p, t = batch.probs() * batch.mask, batch.dense_targets() * batch.mask
        return [(p * t).sum((0, 2)), (p * p).sum((0, 2)), t.sum((0, 2))]

    def value(self, parts: list[Tensor], weights: Tensor | None) -> Tensor:
        tp, pp, st = parts
        per_class = 1 - divide(2 * tp + self.smooth, pp + st + self.smooth)
        return (per_class * weights).sum() / weights.sum() if weights is not None else per_class.mean()

    def needs_statistics_pass(self, mode: str, ignore_index: int | None, weighted: bool) -> bool:
        return True


class VNetDiceLoss(Loss):  # step 2: the class
    name = NAME
    kernel_type = VNetDiceKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        smooth: float = 1.0,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(smooth=smooth),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def vnet_dice_loss(  # step 3: the function
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    smooth: float = 1.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    return VNetDiceLoss(mode, smooth=smooth, ignore_index=ignore_index, class_weights=class_weights, sync=sync)(
        logits, targets
    )


def register(losses: dict | None = None, functions: dict | None = None) -> None:
    """Step 4: its row in the table (in the tests, at run time instead of in table.py)."""
    (table.LOSSES if losses is None else losses)[NAME] = VNetDiceLoss
    (table.LOSS_FUNCTIONS if functions is None else functions)[NAME] = vnet_dice_loss
