"""Evaluation metrics on the gathered predictions of the whole validation split.

`evaluate` gathers every rank's logits with `gather_for_metrics` (which drops the samples a
distributed sampler repeats to even out the last batch), so these functions see exactly the
samples a single process sees and return exactly its numbers.
"""

from __future__ import annotations

import torch


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
