"""User-defined losses for the `loss.name: package.module:Name` test (tests/ is on sys.path)."""

import torch.nn.functional as F
from torch import nn


def scaled_bce(logits, targets, scale=1.0):
    """A user loss written as a function: fn(logits, targets, **loss.args)."""
    return scale * F.binary_cross_entropy_with_logits(logits, targets)


class ScaledCrossEntropy(nn.Module):
    """A user loss written as an nn.Module class: built with **loss.args, then called."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, logits, targets):
        return self.scale * F.cross_entropy(logits, targets)


NOT_CALLABLE = 3
