"""Evaluation metrics on the gathered predictions of the whole validation split.

`evaluate` gathers every rank's logits with `gather_for_metrics` (which drops the samples a
distributed sampler repeats to even out the last batch), so these functions see exactly the
samples a single process sees and return exactly its numbers.

Segmentation logits are too big to gather (N x C x H x W). Each rank reduces every sample to
small additive statistics instead — a C x C confusion matrix over its non-ignored pixels and its
pixel cross-entropy (sum, count) — `gather_for_metrics` gathers those per-sample rows (dropping
the padding duplicates) and their sums give the exact single-process metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets.view(-1, 1)).any(dim=1).float().mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, task: str) -> dict:
    if logits.shape[0] == 0:
        return {}
    if task == "classification":
        return {"top1": topk_accuracy(logits, targets, 1), "top5": topk_accuracy(logits, targets, 5)}
    if task == "binary":
        pred = (logits.reshape(-1) > 0).float()
        return {"accuracy": (pred == (targets.reshape(-1) >= 0.5).float()).float().mean().item()}
    # multilabel: per-label accuracy and the share of images with every label right
    pred = (logits > 0).float()
    right = pred == (targets >= 0.5).float()
    return {"accuracy": right.float().mean().item(), "exact_match": right.all(dim=1).float().mean().item()}


# --------------------------------------------------------------------------- segmentation


def confusion_matrices(preds: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int | None = None):
    """Per-sample confusion matrices and out-of-range counts.

    preds, targets: (N, H, W) class indices. Returns (confusion (N, C, C) int64 with rows = target
    class and columns = predicted class, over the pixels whose target is a class in [0, C);
    bad (N,) int64: pixels whose target is neither a class nor `ignore_index`).
    """
    n, c = targets.shape[0], num_classes
    t, p = targets.reshape(n, -1).long(), preds.reshape(n, -1).long()
    in_range = (t >= 0) & (t < c)
    ignored = t == ignore_index if ignore_index is not None else torch.zeros_like(in_range)
    valid = in_range & ~ignored
    bad = (~in_range & ~ignored).sum(1)
    sample = torch.arange(n, device=t.device).unsqueeze(1)
    flat = (sample * c * c + t.clamp(0, c - 1) * c + p)[valid]
    confusion = torch.bincount(flat, minlength=n * c * c).reshape(n, c, c)
    return confusion, bad


def segmentation_sample_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None):
    """What `evaluate` gathers per sample: (confusion (N, C, C) int64, cross-entropy sum and pixel
    count (N, 2) float64, bad target values (N,) int64), from logits (N, C, H, W) and targets (N, H, W)."""
    num_classes = logits.shape[1]
    preds = logits.argmax(dim=1)
    confusion, bad = confusion_matrices(preds, targets, num_classes, ignore_index)
    valid = (targets >= 0) & (targets < num_classes)
    if ignore_index is not None:
        valid &= targets != ignore_index
    safe = torch.where(valid, targets.long(), torch.full_like(targets.long(), -100))
    ce = F.cross_entropy(logits.float(), safe, ignore_index=-100, reduction="none")  # 0 on left-out pixels
    n = targets.shape[0]
    ce_stats = torch.stack([ce.reshape(n, -1).double().sum(1), valid.reshape(n, -1).sum(1).double()], dim=1)
    return confusion, ce_stats, bad


def classification_confusion(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Counts of (target, predicted) as evaluation predicts: argmax (classification, (C, C)), logit > 0
    (binary, (2, 2); multilabel, one (2, 2) per label: (L, 2, 2)). Rows are the target."""
    if task == "classification":
        preds, truth, classes = logits.argmax(1).view(1, -1), targets.view(1, -1), logits.shape[1]
    elif task == "binary":
        preds, truth, classes = (logits.reshape(1, -1) > 0), (targets.reshape(1, -1) >= 0.5), 2
    else:  # multilabel: one "sample" per label
        preds, truth, classes = (logits > 0).T, (targets >= 0.5).T, 2
    confusion, _ = confusion_matrices(preds.long(), truth.long(), classes)
    return confusion[0] if task != "multilabel" else confusion


def per_class_metrics(confusion: torch.Tensor) -> dict[str, list]:
    """Per class of a (C, C) confusion matrix (rows = target): precision, recall, f1 (= Dice), iou and
    support (target count). A ratio of 0 / 0 (a class never predicted, or absent from the targets) is None."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    fp, fn = predicted - tp, actual - tp

    def ratio(num, den) -> list:
        return [None if d == 0 else (n / d).item() for n, d in zip(num, den)]

    return {
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, actual),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "support": [int(a) for a in actual.tolist()],
    }


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """Pixel accuracy, mean IoU and mean Dice from a summed (C, C) confusion matrix (rows = target).

    Per class: IoU = TP / (TP + FP + FN), Dice = 2TP / (2TP + FP + FN); the means run over the
    classes present in the targets or the predictions (TP + FP + FN > 0), so a class absent from
    both neither counts as 0 nor as 1.
    """
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        return {}
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = (tp + fp + fn) > 0
    iou = tp[present] / (tp + fp + fn)[present]
    dice = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return {"pixel_accuracy": (tp.sum() / total).item(), "mean_iou": iou.mean().item(), "dice": dice.mean().item()}
