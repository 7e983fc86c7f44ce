"""Region losses — Dice, IoU, Tversky, Dice + BCE — from three sums per class: Σp·t, Σp, Σt.

They are ratios of sums over the batch, so the loss of a batch is not the mean of its parts'
losses: the sums are reduced across ranks before the ratio is taken, and gradient accumulation
needs the sums of the whole step (`Loss.surrogate`) to give the loss of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ddp_finetune.losses.batch import Batch, Mode, divide
from ddp_finetune.losses.cross_entropy import cross_entropy_sums
from ddp_finetune.losses.kinds import Accumulation
from ddp_finetune.losses.module import Loss


def region_sums(batch: Batch, per_image: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Σp·t, Σp, Σt per class (C,), or per image and class (N, C) with per_image."""
    p = batch.probs() * batch.mask
    t = batch.dense_targets() * batch.mask
    dims = (2,) if per_image else (0, 2)
    return (p * t).sum(dims), p.sum(dims), t.sum(dims)


@dataclass(frozen=True)
class RegionKernel:
    """1 − score per class, averaged over classes (weighted by the class weights).

    Global (default): the three sums are reduced, then scored. per_image: each image is scored
    locally, and (Σ over images of the score, number of images) is reduced, then divided.
    """

    smooth: float = 1.0
    per_image: bool = False
    with_cross_entropy: ClassVar[bool] = False  # dice_bce: plus the mean (B)CE, in the same sums
    region: ClassVar[bool] = True  # `loss.accumulation` applies (Loss.is_region)

    def score(self, tp: Tensor, sp: Tensor, st: Tensor) -> Tensor:
        raise NotImplementedError

    def statistics(self, batch: Batch, weights: Tensor | None) -> list[Tensor]:
        tp, sp, st = region_sums(batch, self.per_image)
        if self.per_image:
            images = torch.full((1,), float(tp.shape[0]), dtype=tp.dtype, device=tp.device)
            parts = [self.score(tp, sp, st).sum(0), images]
        else:
            parts = [torch.stack([tp, sp, st])]
        if self.with_cross_entropy:
            parts += cross_entropy_sums(batch, weights, 0.0)
        return parts

    def value(self, parts: list[Tensor], weights: Tensor | None) -> Tensor:
        per_class = divide(parts[0], parts[1]) if self.per_image else self.score(*parts[0])
        loss_c = 1 - per_class
        loss = (loss_c * weights).sum() / weights.sum() if weights is not None else loss_c.mean()
        if self.with_cross_entropy:
            loss = divide(parts[-2], parts[-1]) + loss
        return loss

    def needs_statistics_pass(self, mode: str, ignore_index: int | None, weighted: bool) -> bool:
        if not self.per_image:
            return True
        # per image: a mean over images, exact from equal micro-batches; not dice_bce's BCE mean
        # when its count of elements depends on the targets (ignored ones, multiclass weights)
        return self.with_cross_entropy and (ignore_index is not None or (weighted and mode == "multiclass"))


@dataclass(frozen=True)
class DiceKernel(RegionKernel):
    def score(self, tp: Tensor, sp: Tensor, st: Tensor) -> Tensor:
        return divide(2 * tp + self.smooth, sp + st + self.smooth)


@dataclass(frozen=True)
class IoUKernel(RegionKernel):
    def score(self, tp: Tensor, sp: Tensor, st: Tensor) -> Tensor:
        return divide(tp + self.smooth, sp + st - tp + self.smooth)


@dataclass(frozen=True)
class TverskyKernel(RegionKernel):
    alpha: float = 0.5
    beta: float = 0.5

    def score(self, tp: Tensor, sp: Tensor, st: Tensor) -> Tensor:
        # Σp(1-t) = Σp - Σpt and Σ(1-p)t = Σt - Σpt: three sums serve Dice, IoU and Tversky alike
        fp, fn = sp - tp, st - tp
        return divide(tp + self.smooth, tp + self.alpha * fp + self.beta * fn + self.smooth)


@dataclass(frozen=True)
class DiceBCEKernel(DiceKernel):
    with_cross_entropy: ClassVar[bool] = True


class DiceLoss(Loss):
    """Soft Dice loss of the global batch.

    binary: Dice = 1 − (2·Σp·t + s) / (Σp + Σt + s), p = sigmoid(logits), the sums running over
    every (non-ignored) element of the global batch, i.e. of all ranks together.
    multilabel (p = sigmoid per channel) and multiclass (p = softmax over channels, t one-hot):
    the same per class, the sums over images and pixels, then the mean over classes (weighted by
    `class_weights` if given). `per_image=True`: the Dice of each image (and class), averaged
    over the images of the global batch, then over classes. s = `smooth`.
    """

    name = "dice"
    kernel_type = DiceKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(smooth=smooth, per_image=per_image),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def dice_loss(
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """`DiceLoss` of one batch (a bad target value raises here, on every rank)."""
    return DiceLoss(
        mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
    )(logits, targets)


class IoULoss(Loss):
    """Soft IoU (Jaccard) loss: 1 − (Σp·t + s) / (Σp + Σt − Σp·t + s).

    Sums, modes, classes, `per_image` and weights exactly as in `DiceLoss`.
    """

    name = "iou"
    kernel_type = IoUKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(smooth=smooth, per_image=per_image),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def iou_loss(
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """`IoULoss` of one batch."""
    return IoULoss(
        mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
    )(logits, targets)


class TverskyLoss(Loss):
    """Tversky loss: 1 − (Σpt + s) / (Σpt + α·Σp(1−t) + β·Σ(1−p)t + s).

    α weighs false positives, β false negatives; with s = 0, α = β = 0.5 is Dice and α = β = 1
    is IoU. Sums, modes, classes, `per_image` and weights exactly as in `DiceLoss`.
    """

    name = "tversky"
    kernel_type = TverskyKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        alpha: float = 0.5,
        beta: float = 0.5,
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(alpha=alpha, beta=beta, smooth=smooth, per_image=per_image),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def tversky_loss(
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """`TverskyLoss` of one batch."""
    return TverskyLoss(
        mode,
        alpha=alpha,
        beta=beta,
        smooth=smooth,
        per_image=per_image,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sync=sync,
    )(logits, targets)


class DiceBCELoss(Loss):
    """Dice + BCE: the mean BCE-with-logits over the (non-ignored) elements plus the Dice loss.

    In multiclass mode the BCE term is the softmax cross-entropy (`CrossEntropyLoss` without
    label smoothing), the usual Dice + CE. The mean is Σ BCE / count over the global batch (with
    class weights: Σ w·BCE / Σ w); both terms share one all-reduce.
    """

    name = "dice_bce"
    kernel_type = DiceBCEKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(smooth=smooth, per_image=per_image),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def dice_bce_loss(
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """`DiceBCELoss` of one batch."""
    return DiceBCELoss(
        mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
    )(logits, targets)
