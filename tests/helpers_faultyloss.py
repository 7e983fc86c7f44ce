"""User losses that misbehave on purpose (`loss.name: helpers_faultyloss:Name`; tests/ is on sys.path)."""

import torch.nn.functional as F
from torch import nn


class NaNAtCalls(nn.Module):
    """Cross-entropy, except that the calls numbered in `calls` (1-based) return NaN (`always`: every call)."""

    def __init__(self, calls=(), always=False):
        super().__init__()
        self.calls, self.always, self.count = set(calls), always, 0

    def forward(self, logits, targets):
        self.count += 1
        loss = F.cross_entropy(logits, targets)
        return loss * float("nan") if self.always or self.count in self.calls else loss
