"""Losses as functions and `nn.Module`s, with their statistics summed across ranks.

    loss_fn = build_loss(cfg.loss, task="classification", num_classes=10)
    loss = loss_fn(logits, targets)

Why a package of our own: Dice-type losses are ratios of sums over the batch. Computed per rank
and averaged by DDP they are the mean of per-rank Dice values, not the Dice of the global batch
(docs/pitfalls.md, "Dice computed per rank"). Here every sum-type statistic (intersections,
cardinalities, element counts, loss sums) is summed over ranks *with autograd*
(`distributed.all_reduce_sum_with_grad`) before the ratio is taken, so at world size N the loss
value equals the world-size-1 value on the same global batch, and after DDP's 1/N averaging so
does the parameter gradient. Mean-type losses (cross-entropy, BCE, focal) are reduced the same
way, as (sum, count), never as a mean of means, so they stay exact with uneven per-rank batches
or `ignore_index`.

Where things are:

* `table.py`: the one table, `loss.name` -> class (and function); how to add a loss.
* `region.py` (`DiceLoss`, `IoULoss`, `TverskyLoss`, `DiceBCELoss`), `cross_entropy.py`
  (`CrossEntropyLoss`), `focal.py` (`FocalLoss`): the maths, as kernels (which sums a loss
  needs, its value from them), the classes and the functions (thin wrappers of the classes).
* `batch.py`: input checks and layout; `options.py`: the option checks, for code and config;
  `statistics.py`: sums -> all-reduce -> value, and the accumulation surrogate.
* `module.py`: `Loss`, the base class of every built-in loss, with the deferred target check
  and exact gradient accumulation for training loops.
* `build.py`: `build_loss` and `check_loss_config`, the one validation of `loss:`.

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
  rank (the check rides along in the same all-reduce), so a bad label never hangs the others.
  The functions (`dice_loss`, ...) and the modules by default raise in the call that sees the
  bad value; reading that count back is the one device-to-host synchronization of a call. A
  module built with `defer_target_check=True` (the training loop's) only counts on the device
  and raises in `check_targets()`: no host sync per call.
"""

import importlib

_NAMES = {
    "MODES": "batch",
    "Mode": "batch",
    "build_loss": "build",
    "check_loss_config": "build",
    "check_targets": "build",
    "needs_statistics_pass": "build",
    "cross_entropy_loss": "cross_entropy",
    "focal_loss": "focal",
    "LOSS_MODULES": "table",
    "LOSS_FUNCTIONS": "table",
    "Loss": "module",
    "CrossEntropyLoss": "cross_entropy",
    "DiceLoss": "region",
    "DiceBCELoss": "region",
    "IoULoss": "region",
    "FocalLoss": "focal",
    "TverskyLoss": "region",
    "dice_bce_loss": "region",
    "dice_loss": "region",
    "iou_loss": "region",
    "tversky_loss": "region",
    "LOSS_NAMES": "table",
    "LOSSES": "table",
    "TASK_MODES": "table",
}


def __getattr__(name: str):
    """Each public name imported on first use: `ddp_finetune.losses.kinds` (the config's types) stays
    free of torch, and the config can import it without importing every loss."""
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "LOSSES",
    "LOSS_FUNCTIONS",
    "LOSS_MODULES",
    "LOSS_NAMES",
    "MODES",
    "TASK_MODES",
    "CrossEntropyLoss",
    "DiceBCELoss",
    "DiceLoss",
    "FocalLoss",
    "IoULoss",
    "Loss",
    "Mode",
    "TverskyLoss",
    "build_loss",
    "check_loss_config",
    "check_targets",
    "cross_entropy_loss",
    "dice_bce_loss",
    "dice_loss",
    "focal_loss",
    "iou_loss",
    "needs_statistics_pass",
    "tversky_loss",
]
