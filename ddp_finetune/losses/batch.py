"""Logits and targets checked and flattened to one layout, and the small helpers every loss uses."""

from __future__ import annotations

import contextlib
import math
import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from ddp_finetune.errors import UserError
from ddp_finetune.losses.kinds import Mode as LossMode

Mode = LossMode
MODES: tuple[str, ...] = typing.get_args(LossMode)

_EXPECTED = {
    "binary": "logits (N,), (N, 1) or (N, 1, H, W) and float targets in [0, 1] of the same shape or without the channel dim",
    "multilabel": "logits (N, C) or (N, C, H, W) and float multi-hot targets in [0, 1] of the same shape",
    "multiclass": "logits (N, C) or (N, C, H, W) with C >= 2 and integer class-index targets (N,) or (N, H, W) in [0, C), "
    "or class probabilities of the logits' shape",
}


@dataclass
class Batch:
    """Logits and targets checked and flattened to a common layout.

    x: float logits (N, C, L). t: binary/multilabel float (N, C, L); multiclass long (N, L).
    mask: 1 where the element counts, broadcastable to (N, C, L). bad: number of target values
    out of range (a 0-dim tensor, checked after the all-reduce so every rank sees it).
    shapes: the shapes and the expected values, for the error of this call. expected: the
    expected values alone (the same on every rank, for an error raised later).
    """

    x: Tensor
    t: Tensor
    mask: Tensor
    bad: Tensor
    mode: str
    loss: str
    shapes: str
    expected: str
    soft: bool = False  # multiclass with class probabilities (N, C, L) as targets (Mixup / CutMix, label smoothing)

    @property
    def num_classes(self) -> int:
        return self.x.shape[1]

    def probs(self) -> Tensor:
        return torch.softmax(self.x, dim=1) if self.mode == "multiclass" else torch.sigmoid(self.x)

    def dense_targets(self) -> Tensor:
        """Targets as floats (N, C, L): one-hot for multiclass.

        A comparison with the class indices rather than `F.one_hot`, which reads the targets'
        minimum and maximum back to the host on CPU (a sync per call)."""
        if self.mode == "multiclass" and not self.soft:
            classes = torch.arange(self.num_classes, device=self.t.device).view(1, -1, 1)
            return (self.t.unsqueeze(1) == classes).to(self.x.dtype)
        return self.t


def _fail(loss: str, mode: str, logits: Tensor, targets: Tensor, problem: str) -> UserError:
    return UserError(
        f"{loss} (mode={mode}): {problem} (logits {tuple(logits.shape)} {logits.dtype}, "
        f"targets {tuple(targets.shape)} {targets.dtype}); expected {_EXPECTED[mode]}"
    )


def _check_shapes(loss: str, logits: Tensor, targets: Tensor, mode: str, soft_ok: bool = False) -> None:
    shape, tshape = tuple(logits.shape), tuple(targets.shape)
    problem = None
    if mode == "binary":
        full = shape + (1,) if len(shape) == 1 else shape
        if len(full) < 2 or full[1] != 1:
            problem = "binary mode needs one logit channel (use multiclass for softmax over channels)"
        elif tshape not in (shape, full[:1] + full[2:]):
            problem = "target shape does not match the logits"
    elif len(shape) < 2:
        problem = "logits need a channel dim"
    elif mode == "multilabel" and tshape != shape:
        problem = "target shape does not match the logits"
    elif mode == "multiclass" and shape[1] < 2:
        problem = "multiclass needs C >= 2 channels (use binary for one logit)"
    elif mode == "multiclass" and tshape != shape[:1] + shape[2:] and not (soft_ok and _soft(logits, targets, mode)):
        problem = "target shape does not match the logits without their channel dim"
    if problem:
        raise _fail(loss, mode, logits, targets, problem)
    floating = targets.is_floating_point()
    if soft_ok and _soft(logits, targets, mode):
        return
    if mode == "multiclass" and (floating or targets.dtype == torch.bool or targets.is_complex()):
        raise _fail(loss, mode, logits, targets, "targets must be integer class indices (use targets.long())")
    if mode != "multiclass" and not floating:
        raise _fail(loss, mode, logits, targets, "targets must be floating point (use targets.float())")


def _soft(logits: Tensor, targets: Tensor, mode: str) -> bool:
    """Multiclass targets given as class probabilities: floats of the logits' own shape (N, C, *S)."""
    return mode == "multiclass" and targets.is_floating_point() and targets.shape == logits.shape


def prepare(
    loss: str, logits: Tensor, targets: Tensor, mode: str, ignore_index: int | None, soft_ok: bool = False
) -> Batch:
    """Check shapes and dtypes (a UserError naming both shapes), flatten, mask `ignore_index`.

    `soft_ok` (cross-entropy, focal): multiclass targets may also be class probabilities of the
    logits' shape (Mixup / CutMix), each row in [0, 1] and summing to 1.

    Out-of-range target values are not checked here: they are counted into `Batch.bad`, which
    travels with the statistics so that every rank learns about them (no host sync here)."""
    if mode not in MODES:
        raise UserError(f"{loss}: mode={mode!r} is not one of {', '.join(MODES)}")
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise UserError(
            f"{loss}: logits and targets must be tensors, got {type(logits).__name__} and {type(targets).__name__}"
        )
    if not logits.is_floating_point():
        raise _fail(loss, mode, logits, targets, "logits must be a floating-point tensor")
    _check_shapes(loss, logits, targets, mode, soft_ok)

    # float32 statistics even for fp16/bf16 logits; float64 stays float64 (gradcheck)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    n = logits.shape[0]
    c = 1 if logits.dim() == 1 else logits.shape[1]
    length = math.prod(logits.shape[2:])
    x = logits.to(dtype).reshape(n, c, length)
    ignored = targets == ignore_index if ignore_index is not None else torch.zeros_like(targets, dtype=torch.bool)
    soft = soft_ok and _soft(logits, targets, mode)
    if soft:
        # class probabilities: nothing to ignore (ignore_index names a class index); every value in
        # [0, 1] and every pixel's (sample's) values summing to 1, else they count as bad targets
        t = targets.to(dtype).reshape(n, c, length)
        sums_to_one = ((t.sum(1, keepdim=True) - 1).abs() <= 1e-3).expand_as(t)
        valid = (t >= 0) & (t <= 1) & sums_to_one
        ignored = torch.zeros_like(valid)
        t = torch.where(valid, t, torch.zeros_like(t))
        mask = torch.ones(n, 1, length, dtype=dtype, device=x.device)
        expected = "class probabilities in [0, 1] summing to 1"
    elif mode == "multiclass":
        t = targets.reshape(n, length)
        ignored = ignored.reshape(n, length)
        valid = (t >= 0) & (t < c)
        t = torch.where(valid & ~ignored, t, torch.zeros_like(t)).long()  # out-of-range values are counted in `bad`
        mask = (~ignored).to(dtype).unsqueeze(1)
        expected = f"class indices in [0, {c})"
    else:
        t = targets.to(dtype).reshape(n, c, length)
        ignored = ignored.reshape(n, c, length)
        valid = (t >= 0) & (t <= 1)  # NaN is invalid too
        t = torch.where(valid & ~ignored, t, torch.zeros_like(t))
        mask = (~ignored).to(dtype)
        expected = "values in [0, 1]"
    bad = (~(valid | ignored)).sum()
    if ignore_index is not None:
        expected += f" or ignore_index={ignore_index}"
    shapes = f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}; expected {expected}"
    return Batch(x, t, mask, bad, mode, loss, shapes, expected, soft)


def bad_targets_here(batch: Batch, total: Tensor) -> UserError | None:
    """The error for out-of-range targets, seen right away (one host sync: reads `total`).

    `total` is the count summed over ranks, so a rank whose targets are fine still raises when
    another rank's are not, instead of hanging in the next collective."""
    if total.item() <= 0:
        return None
    local = int(batch.bad.item())
    where = f"{local} target value{'s are' if local > 1 else ' is'}" if local else "targets on another rank are"
    return UserError(f"{batch.loss} (mode={batch.mode}): {where} out of range ({batch.shapes})")


def bad_targets_since(loss: str, mode: str, count: int, expected: str) -> UserError:
    """The error for out-of-range targets found by a deferred check: the same text on every rank."""
    return UserError(
        f"{loss} (mode={mode}): {count} target value{'s' if count > 1 else ''} out of range in the batches "
        f"since the last check, on this or another rank; expected {expected}"
    )


def weight_tensor(loss: str, weights: list[float] | None, batch: Batch) -> Tensor | None:
    """Class weights (already checked values) as a tensor, after checking there is one per class."""
    if weights is None:
        return None
    check_weight_count(loss, weights, batch.num_classes)
    return torch.tensor(weights, dtype=batch.x.dtype, device=batch.x.device)


def check_weight_count(loss: str, weights: list[float], num_classes: int, key: str = "class_weights") -> None:
    if len(weights) != num_classes:
        raise UserError(
            f"{loss}: {key} has {len(weights)} values but there are {num_classes} classes; give one weight per class"
        )


def no_autocast(x: Tensor):
    """Autocast off inside the loss: statistics stay in float32 whatever the autocast dtype."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 / 0 = 0 (an empty class with smooth=0, or every element ignored)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))
