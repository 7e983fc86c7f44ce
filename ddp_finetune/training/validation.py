"""Loss and metrics of a whole split, identical at every world size.

    metrics = evaluate(run)     # after each epoch: {"loss": ..., "top1": ..., "count": ...}

Classification gathers every logit with `gather_for_metrics` (which drops the samples a
distributed sampler repeats to even out the last batch), so the metrics are computed on exactly
the samples one process would see. Segmentation logits are too big to gather: each rank reduces
every image to a C x C confusion matrix and a pixel cross-entropy (sum, count), and those rows are
gathered instead (see metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddp_finetune.errors import UserError
from ddp_finetune.models import split_outputs
from ddp_finetune.training.metrics import classification_metrics, segmentation_metrics, segmentation_sample_stats


def evaluate(run, model=None) -> dict:
    """Loss and metrics of the run's validation split (`run` is a `run.Run`), with `model` (the EMA's)
    instead of the trained one when given."""
    model = run.model if model is None else model
    model.eval()
    a, cfg = run.accelerator, run.cfg
    if cfg.task == "segmentation":
        return evaluate_segmentation(
            a, model, run.val_loader, run.prepare_input, run.classes.outputs, cfg.loss.ignore_index
        )
    return evaluate_classification(a, model, run.val_loader, run.prepare_input, run.eval_loss_fn, cfg.task)


def gather_logits(accelerator, model, loader, prepare_input: Callable) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits, targets) of the whole split on every rank, in the split's order, on the CPU; None when empty.
    `prepare_input` turns a loader batch into the model's input (`run.prepare_input`)."""
    all_logits, all_targets = [], []
    with torch.no_grad():
        for x, y in loader:
            logits, _ = split_outputs(model(prepare_input(x)))
            logits, y = accelerator.gather_for_metrics((logits.float().contiguous(), y.contiguous()))
            all_logits.append(logits.cpu())
            all_targets.append(y.cpu())
    if not all_logits:
        return None
    return torch.cat(all_logits), torch.cat(all_targets)


def evaluate_classification(accelerator, model, loader, prepare_input: Callable, loss_fn: Callable, task: str) -> dict:
    """`loss_fn` of all gathered logits (not synchronized: every rank holds them all) and the task's metrics."""
    gathered = gather_logits(accelerator, model, loader, prepare_input)
    if gathered is None:
        return {}
    logits, targets = gathered
    metrics = {"loss": loss_fn(logits, targets).item()}
    metrics.update(classification_metrics(logits, targets, task))
    metrics["count"] = int(logits.shape[0])
    return metrics


@dataclass
class SegmentationTotals:
    """A split's segmentation statistics, summed over its samples (every rank holds the same)."""

    confusion: torch.Tensor  # (C, C) int64 on the CPU, rows = target class, columns = predicted
    ce: torch.Tensor  # (2,) float64: pixel cross-entropy sum and pixel count
    count: int  # samples


def gather_segmentation(
    accelerator,
    model,
    loader,
    prepare_input: Callable,
    num_classes: int,
    ignore_index: int | None,
    split: str = "validation",
) -> SegmentationTotals | None:
    """Each rank turns every sample into a confusion matrix and a cross-entropy (sum, count),
    `gather_for_metrics` gathers those rows (padding duplicates dropped) and their sums are the
    single-process numbers. None when the split is empty; mask values outside the classes are an error."""
    confusion = ce = bad = None
    count = 0
    with torch.no_grad():
        for x, y in loader:
            logits, _ = split_outputs(model(prepare_input(x)))
            conf_b, ce_b, bad_b = accelerator.gather_for_metrics(segmentation_sample_stats(logits, y, ignore_index))
            sums = (conf_b.sum(0), ce_b.sum(0), bad_b.sum())
            confusion, ce, bad = sums if confusion is None else (confusion + sums[0], ce + sums[1], bad + sums[2])
            count += conf_b.shape[0]
    if confusion is None:
        return None
    if bad.item():  # every rank holds the same gathered count, so every rank raises
        raise UserError(
            f"{bad.item()} {split} mask pixels are outside the model's {num_classes} classes and not "
            f"loss.ignore_index={ignore_index}; set model.num_classes, data.class_names or loss.ignore_index "
            "(255 in VOC-style masks)"
        )
    return SegmentationTotals(confusion=confusion.cpu(), ce=ce.cpu(), count=count)


def evaluate_segmentation(
    accelerator, model, loader, prepare_input: Callable, num_classes: int, ignore_index: int | None
) -> dict:
    """Pixel metrics from confusion matrices, without gathering logits (`gather_segmentation`). `loss`
    is the mean pixel cross-entropy over the split's non-ignored pixels, whatever the training loss."""
    totals = gather_segmentation(accelerator, model, loader, prepare_input, num_classes, ignore_index)
    if totals is None:
        return {}
    return segmentation_summary(totals)


def segmentation_summary(totals: SegmentationTotals) -> dict:
    """loss, pixel_accuracy, mean_iou, dice and count of a split's totals."""
    ce = totals.ce
    metrics = {"loss": (ce[0] / ce[1]).item()} if ce[1] > 0 else {}
    metrics.update(segmentation_metrics(totals.confusion))
    metrics["count"] = totals.count
    return metrics
