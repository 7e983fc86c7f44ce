"""Losses as functions and `nn.Module`s, with their statistics summed across ranks.

    loss_fn = build_loss(cfg.loss, task="classification", num_classes=10)
    loss = loss_fn(logits, targets)

Why a module of our own: Dice-type losses are ratios of sums over the batch. Computed per rank
and averaged by DDP they are the mean of per-rank Dice values, not the Dice of the global batch
(PITFALLS, "Dice computed per rank"). Here every sum-type statistic (intersections,
cardinalities, element counts, loss sums) is summed over ranks *with autograd*
(`distributed.all_reduce_sum_with_grad`) before the ratio is taken, so at world size N the loss
value equals the world-size-1 value on the same global batch, and after DDP's 1/N averaging so
does the parameter gradient. Mean-type losses (cross-entropy, BCE, focal) are reduced the same
way, as (sum, count), never as a mean of means, so they stay exact with uneven per-rank batches
or `ignore_index`.

Conventions shared by every loss here:

* Inputs are **logits**; probabilities come from `sigmoid` (binary, multilabel) or `softmax`
  over channels (multiclass), and cross-entropies use the stable with-logits forms.
* Modes and shapes (`*S` = any spatial dims, e.g. `H, W`; none for classification):
  - `binary`: logits `(N,)`, `(N, 1)` or `(N, 1, *S)`; float targets in [0, 1] of the same
    shape or without the channel dim.
  - `multilabel`: logits `(N, C, *S)`, a sigmoid per channel; float targets of the same shape.
  - `multiclass`: logits `(N, C, *S)`, C >= 2, softmax over C; integer targets `(N, *S)`.
* `ignore_index`: elements (binary, multilabel) or pixels (multiclass: all channels) whose
  target equals it are left out of every sum. An ignored class index that is also a real class
  still counts in the mean over classes; give it class weight 0 to drop it.
* `class_weights` (length C, or 1 for binary): a weighted mean over classes for Dice / IoU /
  Tversky; `F.cross_entropy`'s weights (normalised by the summed weights of the targets) for
  cross-entropy; per-channel weights normalised the same way for the BCE terms; the per-class
  alpha of multiclass focal loss.
* The statistics are computed in float32 (float64 stays float64) with autocast disabled, so
  fp16/bf16 logits give a float32 loss.
* With `sync=True` (the default) each call does one all-reduce when a process group is
  initialised: every rank must call the loss the same number of times. Without a process group
  it is a plain single-process loss. Bad target values on any rank raise `UserError` on every
  rank (the check rides along in the same all-reduce), so a bad label never hangs the others;
  reading that check back is the one device-to-host synchronization of a call.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_reduce_sum_with_grad
from .errors import UserError

LOSS_NAMES = ("cross_entropy", "dice", "dice_bce", "iou", "focal", "tversky")
MODES = ("binary", "multilabel", "multiclass")
TASK_MODES = {
    "classification": "multiclass",
    "binary": "binary",
    "multilabel": "multilabel",
    "segmentation": "multiclass",
}

_EXPECTED = {
    "binary": "logits (N,), (N, 1) or (N, 1, H, W) and float targets in [0, 1] of the same shape or without the channel dim",
    "multilabel": "logits (N, C) or (N, C, H, W) and float multi-hot targets in [0, 1] of the same shape",
    "multiclass": "logits (N, C) or (N, C, H, W) with C >= 2 and integer class-index targets (N,) or (N, H, W) in [0, C)",
}


# --------------------------------------------------------------------------- inputs


@dataclass
class _Batch:
    """Logits and targets checked and flattened to a common layout.

    x: float logits (N, C, L). t: binary/multilabel float (N, C, L); multiclass long (N, L).
    mask: 1 where the element counts, broadcastable to (N, C, L). bad: number of target values
    out of range (a 0-dim tensor, checked after the all-reduce so every rank sees it).
    """

    x: Tensor
    t: Tensor
    mask: Tensor
    bad: Tensor
    mode: str
    loss: str
    shapes: str

    @property
    def num_classes(self) -> int:
        return self.x.shape[1]

    def probs(self) -> Tensor:
        return torch.softmax(self.x, dim=1) if self.mode == "multiclass" else torch.sigmoid(self.x)

    def dense_targets(self) -> Tensor:
        """Targets as floats (N, C, L): one-hot for multiclass."""
        if self.mode == "multiclass":
            return F.one_hot(self.t, self.num_classes).permute(0, 2, 1).to(self.x.dtype)
        return self.t


def _fail(loss: str, mode: str, logits: Tensor, targets: Tensor, problem: str) -> UserError:
    return UserError(
        f"{loss} (mode={mode}): {problem} (logits {tuple(logits.shape)} {logits.dtype}, "
        f"targets {tuple(targets.shape)} {targets.dtype}); expected {_EXPECTED[mode]}"
    )


def _prepare(loss: str, logits: Tensor, targets: Tensor, mode: str, ignore_index: int | None) -> _Batch:
    if mode not in MODES:
        raise UserError(f"{loss}: mode={mode!r} is not one of {', '.join(MODES)}")
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise UserError(
            f"{loss}: logits and targets must be tensors, got {type(logits).__name__} and {type(targets).__name__}"
        )
    if not logits.is_floating_point():
        raise _fail(loss, mode, logits, targets, "logits must be a floating-point tensor")
    shape, tshape = tuple(logits.shape), tuple(targets.shape)
    if mode == "binary":
        if len(shape) == 1:
            shape = shape + (1,)
        if len(shape) < 2 or shape[1] != 1:
            raise _fail(
                loss,
                mode,
                logits,
                targets,
                "binary mode needs one logit channel (use multiclass for softmax over channels)",
            )
        if tshape not in (tuple(logits.shape), shape[:1] + shape[2:]):
            raise _fail(loss, mode, logits, targets, "target shape does not match the logits")
    elif len(shape) < 2:
        raise _fail(loss, mode, logits, targets, "logits need a channel dim")
    elif mode == "multilabel" and tshape != shape:
        raise _fail(loss, mode, logits, targets, "target shape does not match the logits")
    elif mode == "multiclass":
        if shape[1] < 2:
            raise _fail(loss, mode, logits, targets, "multiclass needs C >= 2 channels (use binary for one logit)")
        if tshape != shape[:1] + shape[2:]:
            raise _fail(loss, mode, logits, targets, "target shape does not match the logits without their channel dim")

    floating = targets.is_floating_point()
    if mode == "multiclass" and (floating or targets.dtype == torch.bool or targets.is_complex()):
        raise _fail(loss, mode, logits, targets, "targets must be integer class indices (use targets.long())")
    if mode != "multiclass" and not floating:
        raise _fail(loss, mode, logits, targets, "targets must be floating point (use targets.float())")

    # float32 statistics even for fp16/bf16 logits; float64 stays float64 (gradcheck)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    n, c = shape[0], shape[1]
    length = 1
    for d in shape[2:]:
        length *= d
    x = logits.to(dtype).reshape(n, c, length)
    ignored = targets == ignore_index if ignore_index is not None else torch.zeros_like(targets, dtype=torch.bool)
    if mode == "multiclass":
        t = targets.reshape(n, length)
        ignored = ignored.reshape(n, length)
        valid = (t >= 0) & (t < c)
        t = torch.where(valid & ~ignored, t, torch.zeros_like(t)).long()  # out-of-range values raise after the reduce
        mask = (~ignored).to(dtype).unsqueeze(1)
        expected_values = f"class indices in [0, {c})"
    else:
        t = targets.to(dtype).reshape(n, c, length)
        ignored = ignored.reshape(n, c, length)
        valid = (t >= 0) & (t <= 1)  # NaN is invalid too
        t = torch.where(valid & ~ignored, t, torch.zeros_like(t))
        mask = (~ignored).to(dtype)
        expected_values = "values in [0, 1]"
    bad = (~(valid | ignored)).sum()
    shapes = f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}; expected {expected_values}" + (
        f" or ignore_index={ignore_index}" if ignore_index is not None else ""
    )
    return _Batch(x, t, mask, bad, mode, loss, shapes)


def _sum_over_ranks(batch: _Batch, stats: Sequence[Tensor], sync: bool) -> list[Tensor]:
    """Sum the local statistics over ranks in one all-reduce, then check the targets.

    The count of bad target values travels in the same tensor, so a rank whose targets are fine
    still raises when another rank's are not, instead of hanging in the next collective.
    """
    flat = torch.cat([s.reshape(-1) for s in stats] + [batch.bad.to(batch.x.dtype).reshape(1)])
    if sync:
        flat = all_reduce_sum_with_grad(flat)
    if flat[-1].item() > 0:
        local = int(batch.bad.item())
        where = f"{local} target value{'s are' if local > 1 else ' is'}" if local else "targets on another rank are"
        raise UserError(f"{batch.loss} (mode={batch.mode}): {where} out of range ({batch.shapes})")
    sizes = [s.numel() for s in stats]
    return [part.reshape(s.shape) for part, s in zip(flat[:-1].split(sizes), stats)]


def _weights(loss: str, class_weights, num_classes: int, x: Tensor) -> Tensor | None:
    if class_weights is None:
        return None
    # checked as Python floats: no device round trip per call for weights kept on the GPU
    values = [
        float(v) for v in (class_weights.reshape(-1).tolist() if isinstance(class_weights, Tensor) else class_weights)
    ]
    if len(values) != num_classes:
        raise UserError(
            f"{loss}: class_weights has {len(values)} values but the logits have {num_classes} classes; give one weight per class"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise UserError(f"{loss}: class_weights={values} must be finite, >= 0 and not all 0")
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def _no_autocast(x: Tensor):
    """Autocast off inside the loss: statistics stay in float32 whatever the autocast dtype."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _check(loss: str, name: str, value, low: float, high: float | None = None, high_open: bool = False) -> None:
    bad = value < low or (high is not None and (value > high or (high_open and value == high)))
    if bad:
        limit = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise UserError(f"{loss}: {name}={value} must be {limit}")


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 / 0 = 0 (an empty class with smooth=0, or every element ignored)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


# --------------------------------------------------------------------------- building blocks


def _region_stats(batch: _Batch, per_image: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Σp·t, Σp, Σt per class (C,), or per image and class (N, C) with per_image."""
    p = batch.probs() * batch.mask
    t = batch.dense_targets() * batch.mask
    dims = (2,) if per_image else (0, 2)
    return (p * t).sum(dims), p.sum(dims), t.sum(dims)


def _region_loss(
    batch: _Batch, score: Callable, per_image: bool, weights: Tensor | None, sync: bool, extra=()
) -> tuple[Tensor, list]:
    """1 - score per class, averaged over classes; `extra` statistics ride in the same all-reduce.

    Global (default): the three sums are reduced, then scored. per_image: each image is scored
    locally, and (Σ over images of the score, number of images) is reduced, then divided.
    """
    tp, sp, st = _region_stats(batch, per_image)
    if per_image:
        local = [score(tp, sp, st).sum(0), tp.new_tensor([float(tp.shape[0])])]
    else:
        local = [torch.stack([tp, sp, st])]
    summed = _sum_over_ranks(batch, local + list(extra), sync)
    if per_image:
        per_class = _divide(summed[0], summed[1])
    else:
        per_class = score(*summed[0])
    loss_c = 1 - per_class
    loss = (loss_c * weights).sum() / weights.sum() if weights is not None else loss_c.mean()
    return loss, summed[len(local) :]


def _overlap_loss(
    loss: str,
    score: Callable,
    logits: Tensor,
    targets: Tensor,
    mode: str,
    per_image: bool,
    ignore_index: int | None,
    class_weights,
    sync: bool,
) -> Tensor:
    """Dice / IoU / Tversky: 1 - score of the rank-summed overlap statistics."""
    with _no_autocast(logits):
        batch = _prepare(loss, logits, targets, mode, ignore_index)
        weights = _weights(loss, class_weights, batch.num_classes, batch.x)
        value, _ = _region_loss(batch, score, per_image, weights, sync)
        return value


def _dice_score(smooth: float):
    return lambda tp, sp, st: _divide(2 * tp + smooth, sp + st + smooth)


def _iou_score(smooth: float):
    return lambda tp, sp, st: _divide(tp + smooth, sp + st - tp + smooth)


def _tversky_score(alpha: float, beta: float, smooth: float):
    # Σp(1-t) = Σp - Σpt and Σ(1-p)t = Σt - Σpt: three sums serve Dice, IoU and Tversky alike
    return lambda tp, sp, st: _divide(tp + smooth, tp + alpha * (sp - tp) + beta * (st - tp) + smooth)


def _ce_stats(batch: _Batch, weights: Tensor | None, label_smoothing: float) -> list[Tensor]:
    """(loss sum, weight sum) of cross-entropy: F.cross_entropy's mean is their ratio.

    multiclass: Σ m·[(1-ε)·w_y·(-log p_y) + ε/C·Σ_c w_c·(-log p_c)] and Σ m·w_y, torch's own
    definition with weights and label smoothing. binary/multilabel: BCE-with-logits against
    t·(1-ε) + ε/2, summed with per-channel weights, over the summed weights.
    """
    x, m = batch.x, batch.mask
    if batch.mode == "multiclass":
        c = batch.num_classes
        logp = F.log_softmax(x, dim=1)
        nll = -logp.gather(1, batch.t.unsqueeze(1)).squeeze(1)  # (N, L)
        m = m.squeeze(1)
        w_y = weights[batch.t] if weights is not None else torch.ones_like(nll)
        per = (1 - label_smoothing) * w_y * nll
        if label_smoothing:
            w_c = weights.view(1, c, 1) if weights is not None else 1.0
            per = per + label_smoothing / c * -(logp * w_c).sum(1)
        return [(per * m).sum(), (w_y * m).sum()]
    t = batch.t * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else batch.t
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    w = m * weights.view(1, -1, 1) if weights is not None else m
    return [(bce * w).sum(), w.sum()]


# --------------------------------------------------------------------------- losses


def dice_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """Soft Dice loss of the global batch.

    binary: Dice = 1 − (2·Σp·t + s) / (Σp + Σt + s), p = sigmoid(logits), the sums running over
    every (non-ignored) element of the global batch, i.e. of all ranks together.
    multilabel (p = sigmoid per channel) and multiclass (p = softmax over channels, t one-hot):
    the same per class, the sums over images and pixels, then the mean over classes (weighted by
    `class_weights` if given). `per_image=True`: the Dice of each image (and class), averaged
    over the images of the global batch, then over classes. s = `smooth`.
    """
    _check("dice_loss", "smooth", smooth, 0.0)
    return _overlap_loss(
        "dice_loss", _dice_score(smooth), logits, targets, mode, per_image, ignore_index, class_weights, sync
    )


def iou_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """Soft IoU (Jaccard) loss: 1 − (Σp·t + s) / (Σp + Σt − Σp·t + s).

    Sums, modes, classes, `per_image` and weights exactly as in `dice_loss`.
    """
    _check("iou_loss", "smooth", smooth, 0.0)
    return _overlap_loss(
        "iou_loss", _iou_score(smooth), logits, targets, mode, per_image, ignore_index, class_weights, sync
    )


def tversky_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "binary",
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """Tversky loss: 1 − (Σpt + s) / (Σpt + α·Σp(1−t) + β·Σ(1−p)t + s).

    α weighs false positives, β false negatives; with s = 0, α = β = 0.5 is Dice and α = β = 1
    is IoU.
    Sums, modes, classes, `per_image` and weights exactly as in `dice_loss`.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("smooth", smooth)):
        _check("tversky_loss", name, value, 0.0)
    return _overlap_loss(
        "tversky_loss",
        _tversky_score(alpha, beta, smooth),
        logits,
        targets,
        mode,
        per_image,
        ignore_index,
        class_weights,
        sync,
    )


def dice_bce_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "binary",
    *,
    smooth: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """Dice + BCE: the mean BCE-with-logits over the (non-ignored) elements plus `dice_loss`.

    In multiclass mode the BCE term is the softmax cross-entropy (`cross_entropy_loss` without
    label smoothing), the usual Dice + CE. The mean is Σ BCE / count over the global batch (with
    class weights: Σ w·BCE / Σ w); both terms share one all-reduce.
    """
    _check("dice_bce_loss", "smooth", smooth, 0.0)
    with _no_autocast(logits):
        batch = _prepare("dice_bce_loss", logits, targets, mode, ignore_index)
        weights = _weights("dice_bce_loss", class_weights, batch.num_classes, batch.x)
        ce = _ce_stats(batch, weights, 0.0)
        dice, (ce_sum, ce_count) = _region_loss(batch, _dice_score(smooth), per_image, weights, sync, extra=ce)
        return _divide(ce_sum, ce_count) + dice


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


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "binary",
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
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
    _check("focal_loss", "gamma", gamma, 0.0)
    if alpha is not None:
        _check("focal_loss", "alpha", alpha, 0.0, 1.0)
    with _no_autocast(logits):
        batch = _prepare("focal_loss", logits, targets, mode, ignore_index)
        x, t = batch.x, batch.t
        if mode == "multiclass":
            weights = _weights("focal_loss", class_weights, batch.num_classes, x)
            logp_y = F.log_softmax(x, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)  # (N, L)
            one_minus_p = -torch.expm1(logp_y)  # 1 − p_y without cancellation near p_y = 1
            per = -_focal_factor(one_minus_p, gamma) * logp_y
            if weights is not None:
                per = per * weights[t]
            mask = batch.mask.squeeze(1)
        else:
            if class_weights is not None:
                raise UserError(
                    f"focal_loss (mode={mode}): class_weights are for multiclass mode; "
                    "binary/multilabel focal loss balances classes with alpha"
                )
            bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            one_minus_pt = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
            per = _focal_factor(one_minus_pt, gamma) * bce
            if alpha is not None:
                per = per * (alpha * t + (1 - alpha) * (1 - t))
            mask = batch.mask
        total, count = _sum_over_ranks(batch, [(per * mask).sum(), mask.sum()], sync)
        return _divide(total, count)


def cross_entropy_loss(
    logits: Tensor,
    targets: Tensor,
    mode: str = "multiclass",
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    sync: bool = True,
) -> Tensor:
    """Cross-entropy with label smoothing, its mean taken over the global batch.

    multiclass: `F.cross_entropy(logits, targets, weight=class_weights, ignore_index=...,
    label_smoothing=ε)` of the global batch. Its mean is a ratio of sums, Σ loss / Σ w_y (plain
    count without weights), and both sums are reduced across ranks before dividing, so the loss
    is the global one even when ranks hold different numbers of samples or ignored pixels.
    binary/multilabel: BCE-with-logits against t·(1 − ε) + ε/2, averaged the same way (with
    class weights: Σ w·BCE / Σ w over the elements).
    """
    _check("cross_entropy_loss", "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    with _no_autocast(logits):
        batch = _prepare("cross_entropy_loss", logits, targets, mode, ignore_index)
        weights = _weights("cross_entropy_loss", class_weights, batch.num_classes, batch.x)
        total, count = _sum_over_ranks(batch, _ce_stats(batch, weights, label_smoothing), sync)
        return _divide(total, count)


# --------------------------------------------------------------------------- modules


class _Loss(nn.Module):
    """A loss function with its options bound; `forward(logits, targets)` calls it."""

    _fn: Callable = None

    def __init__(self, mode: str, **options):
        super().__init__()
        self.mode = mode
        self.options = options

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return type(self)._fn(logits, targets, self.mode, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {"mode": self.mode, **self.options}.items())


class DiceLoss(_Loss):
    """`dice_loss` as a module."""

    _fn = staticmethod(dice_loss)

    def __init__(self, mode="binary", *, smooth=1.0, per_image=False, ignore_index=None, class_weights=None, sync=True):
        super().__init__(
            mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
        )


class IoULoss(_Loss):
    """`iou_loss` as a module."""

    _fn = staticmethod(iou_loss)

    def __init__(self, mode="binary", *, smooth=1.0, per_image=False, ignore_index=None, class_weights=None, sync=True):
        super().__init__(
            mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
        )


class TverskyLoss(_Loss):
    """`tversky_loss` as a module."""

    _fn = staticmethod(tversky_loss)

    def __init__(
        self,
        mode="binary",
        *,
        alpha=0.5,
        beta=0.5,
        smooth=1.0,
        per_image=False,
        ignore_index=None,
        class_weights=None,
        sync=True,
    ):
        super().__init__(
            mode,
            alpha=alpha,
            beta=beta,
            smooth=smooth,
            per_image=per_image,
            ignore_index=ignore_index,
            class_weights=class_weights,
            sync=sync,
        )


class DiceBCELoss(_Loss):
    """`dice_bce_loss` as a module."""

    _fn = staticmethod(dice_bce_loss)

    def __init__(self, mode="binary", *, smooth=1.0, per_image=False, ignore_index=None, class_weights=None, sync=True):
        super().__init__(
            mode, smooth=smooth, per_image=per_image, ignore_index=ignore_index, class_weights=class_weights, sync=sync
        )


class FocalLoss(_Loss):
    """`focal_loss` as a module (the real per-element focal loss, see its docstring)."""

    _fn = staticmethod(focal_loss)

    def __init__(self, mode="binary", *, alpha=0.25, gamma=2.0, ignore_index=None, class_weights=None, sync=True):
        super().__init__(
            mode, alpha=alpha, gamma=gamma, ignore_index=ignore_index, class_weights=class_weights, sync=sync
        )


class CrossEntropyLoss(_Loss):
    """`cross_entropy_loss` as a module."""

    _fn = staticmethod(cross_entropy_loss)

    def __init__(self, mode="multiclass", *, label_smoothing=0.0, ignore_index=None, class_weights=None, sync=True):
        super().__init__(
            mode, label_smoothing=label_smoothing, ignore_index=ignore_index, class_weights=class_weights, sync=sync
        )


# --------------------------------------------------------------------------- factory

LOSS_FUNCTIONS = {
    "cross_entropy": cross_entropy_loss,
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
    "iou": iou_loss,
    "focal": focal_loss,
    "tversky": tversky_loss,
}
"""Each built-in loss by its `loss.name`, as a function."""

LOSS_MODULES = {
    "cross_entropy": CrossEntropyLoss,
    "dice": DiceLoss,
    "dice_bce": DiceBCELoss,
    "iou": IoULoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
}
"""Each built-in loss by its `loss.name`, as an `nn.Module` class."""


def build_loss(cfg_loss, task: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss named by `cfg.loss` (a `config.LossConfig`) as a callable(logits, targets) -> scalar.

    `task` picks the default mode: `classification` (integer labels) -> multiclass, `binary`
    (one logit, float targets) -> binary, `multilabel` (multi-hot float targets) -> multilabel.
    `loss.name: package.module:Name` imports your own loss: a function is called as
    fn(logits, targets, **loss.args), an nn.Module class is built with **loss.args and called.
    A user loss is not synchronized across ranks by us; use `all_reduce_sum_with_grad` in it.
    """
    name = cfg_loss.name
    if ":" in name:
        return _user_loss(name, cfg_loss.args)
    if name not in LOSS_NAMES:
        raise UserError(
            f"loss.name={name!r} is not one of {', '.join(LOSS_NAMES)}; or give your own loss as package.module:Name"
        )
    if cfg_loss.args:
        raise UserError(
            f"loss.args={cfg_loss.args!r} is only for a user loss (loss.name=package.module:Name); remove it for {name}"
        )
    if task not in TASK_MODES:
        raise UserError(f"task={task!r} is not one of {', '.join(TASK_MODES)}")
    mode = cfg_loss.mode or TASK_MODES[task]
    if mode != TASK_MODES[task]:
        raise UserError(
            f"loss.mode={mode} does not fit task={task}, whose labels need mode {TASK_MODES[task]}; "
            f"set loss.mode={TASK_MODES[task]} or null"
        )
    if cfg_loss.label_smoothing and name != "cross_entropy":
        raise UserError(
            f"loss.label_smoothing={cfg_loss.label_smoothing} is only used by cross_entropy, not {name}; set it to 0"
        )
    if cfg_loss.per_image and name in ("cross_entropy", "focal"):
        raise UserError(f"loss.per_image=true is for dice, dice_bce, iou and tversky, not {name}; set it to false")
    weights = cfg_loss.class_weights
    expected = 1 if mode == "binary" else num_classes
    if weights is not None and len(weights) != expected:
        raise UserError(
            f"loss.class_weights has {len(weights)} values but there are {expected} classes; give one weight per class"
        )
    common = dict(ignore_index=cfg_loss.ignore_index, class_weights=weights, sync=cfg_loss.sync)
    region = dict(smooth=cfg_loss.smooth, per_image=cfg_loss.per_image, **common)
    if name == "cross_entropy":
        return CrossEntropyLoss(mode, label_smoothing=cfg_loss.label_smoothing, **common)
    if name == "dice":
        return DiceLoss(mode, **region)
    if name == "dice_bce":
        return DiceBCELoss(mode, **region)
    if name == "iou":
        return IoULoss(mode, **region)
    if name == "tversky":
        if cfg_loss.alpha is None:
            raise UserError("loss.alpha=null but tversky needs the false-positive weight alpha, e.g. loss.alpha=0.3")
        return TverskyLoss(mode, alpha=cfg_loss.alpha, beta=cfg_loss.beta, **region)
    if mode != "multiclass" and weights is not None:
        raise UserError(
            f"loss.class_weights are not used by focal in {mode} mode (it balances with loss.alpha); remove them"
        )
    return FocalLoss(mode, alpha=cfg_loss.alpha, gamma=cfg_loss.gamma, **common)


def _user_loss(name: str, args: dict) -> Callable[[Tensor, Tensor], Tensor]:
    module_name, _, attr = name.partition(":")
    valid = f"use package.module:Name of an importable function or nn.Module class, or one of {', '.join(LOSS_NAMES)}"
    if not module_name or not attr:
        raise UserError(f"loss.name={name!r} is not of the form package.module:Name; {valid}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"loss.name={name!r}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH or {valid}"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"loss.name={name!r}: module {module_name!r} has no {attr!r}; {valid}")
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            raise UserError(f"loss.name={name!r} is a class but not an nn.Module; {valid}")
        try:
            return obj(**args)
        except TypeError as exc:
            raise UserError(
                f"loss.name={name!r}: cannot build it with loss.args={args!r} ({exc}); fix loss.args"
            ) from None
    if not callable(obj):
        raise UserError(f"loss.name={name!r} is not callable; {valid}")
    return partial(obj, **args) if args else obj
