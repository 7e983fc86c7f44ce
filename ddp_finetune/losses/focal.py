"""Focal loss (Lin et al. 2017), per element, its mean taken over the global batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ddp_finetune.losses.batch import Batch, Mode, divide
from ddp_finetune.losses.kinds import Accumulation
from ddp_finetune.losses.module import Loss


def _focal_factor(one_minus_p: Tensor, gamma: float) -> Tensor:
    """(1 − p)^γ with a finite gradient everywhere.

    d/du u^γ = γ·u^(γ−1) is infinite at u = 0 for γ < 1 (and 0·inf = NaN for γ = 0), and u = 0
    happens as soon as a probability rounds to 1 (a float32 logit margin of ~17). The factor is 0
    there and its gradient is taken as 0: the power is evaluated at a safe 1 where u = 0, and
    the result masked, so no NaN reaches the backward pass.
    """
    if gamma == 0:
        return torch.ones_like(one_minus_p)
    positive = one_minus_p > 0
    safe = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe**gamma, torch.zeros_like(safe))


@dataclass(frozen=True)
class FocalKernel:
    soft_targets: ClassVar[bool] = True  # multiclass targets may be class probabilities (Mixup / CutMix)
    alpha: float | None = 0.25
    gamma: float = 2.0

    def statistics(self, batch: Batch, weights: Tensor | None) -> list[Tensor]:
        """(Σ focal terms, count) over the non-ignored elements (multiclass: pixels)."""
        x, t = batch.x, batch.t
        if batch.soft:
            # class probabilities t (Mixup / CutMix): Σ_c t_c·α_c·(1 − p_c)^γ·(−log p_c), the one-hot case's generalization
            logp = F.log_softmax(x, dim=1)
            per = -_focal_factor(-torch.expm1(logp), self.gamma) * logp * t
            if weights is not None:
                per = per * weights.view(1, -1, 1)
            mask = batch.mask.squeeze(1)
            return [(per.sum(1) * mask).sum(), mask.sum()]
        if batch.mode == "multiclass":
            logp_y = F.log_softmax(x, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)  # (N, L)
            one_minus_p = -torch.expm1(logp_y)  # 1 − p_y without cancellation near p_y = 1
            per = -_focal_factor(one_minus_p, self.gamma) * logp_y
            if weights is not None:
                per = per * weights[t]
            mask = batch.mask.squeeze(1)
        else:
            bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            one_minus_pt = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
            per = _focal_factor(one_minus_pt, self.gamma) * bce
            if self.alpha is not None:
                per = per * (self.alpha * t + (1 - self.alpha) * (1 - t))
            mask = batch.mask
        return [(per * mask).sum(), mask.sum()]

    def value(self, parts: list[Tensor], weights: Tensor | None) -> Tensor:
        return divide(parts[0], parts[1])

    def needs_statistics_pass(self, mode: str, ignore_index: int | None, weighted: bool) -> bool:
        # a mean over the non-ignored elements (class weights scale the numerator only): exact from
        # equal micro-batches unless ignore_index makes their counts differ
        return ignore_index is not None


class FocalLoss(Loss):
    """Focal loss (Lin et al. 2017): the mean over elements of α_t·(1 − p_t)^γ·BCE.

    binary/multilabel: p = sigmoid(logits), p_t = p·t + (1−p)·(1−t), α_t = α·t + (1−α)·(1−t)
    (`alpha=None`: no α_t), BCE the with-logits binary cross-entropy; the mean runs over every
    non-ignored element of the global batch (Σ / count across ranks). This equals
    `torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean")`
    (whose "no alpha" is alpha=-1). 1 − p_t is computed as p·(1−t) + (1−p)·t, which does not
    cancel for confident logits.
    multiclass: −α_y·(1 − p_y)^γ·log p_y with p = softmax over channels, averaged over the
    non-ignored pixels; α_y = class_weights[y] if given, else 1 (the scalar `alpha` is not used).

    Note: the FocalLoss found in many tutorials computes the *mean* BCE of the batch first and
    then applies (1 − exp(−BCE))^γ to that one scalar. That rescales the whole batch's loss by a
    single factor and does not down-weight the easy examples, so it is not focal loss.
    """

    name = "focal"
    kernel_type = FocalKernel

    def __init__(
        self,
        mode: Mode = "binary",
        *,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        sync: bool = True,
        accumulation: Accumulation = "exact",
        defer_target_check: bool = False,
    ):
        super().__init__(
            mode,
            dict(alpha=alpha, gamma=gamma),
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
            accumulation=accumulation,
            defer_target_check=defer_target_check,
        )


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    mode: Mode = "binary",
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """`FocalLoss` of one batch (a bad target value raises here, on every rank)."""
    return FocalLoss(mode, alpha=alpha, gamma=gamma, ignore_index=ignore_index, class_weights=class_weights, sync=sync)(
        logits, targets
    )
