"""User-defined losses for the `loss.name: package.module:Name` test (tests/ is on sys.path)."""

import time
from pathlib import Path

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


class GatedCrossEntropy(nn.Module):
    """Cross-entropy that can hold a run at a known step, for the stop-request tests.

    At its `gate_call`-th training call in this process (1-based; with grad_accum 1 and no aux
    heads, the forward of optimizer step `gate_call` after the run's start or resume) it writes
    `<gate_dir>/reached.<rank>`, then waits until `<gate_dir>/go` exists. A test waits for
    `reached`, sends its stop request, then creates `go`: the request is there before that step
    ends, whatever the speed of the machine. Without `gate_dir` (the reference runs) and once
    `go` exists (a resumed run) it is plain cross-entropy. Evaluation calls (no gradient) are
    not counted.
    """

    def __init__(self, gate_dir=None, gate_call=0, timeout=300.0):
        super().__init__()
        self.gate_dir = Path(gate_dir) if gate_dir else None
        self.gate_call = gate_call
        self.timeout = timeout
        self.calls = 0

    def forward(self, logits, targets):
        if logits.requires_grad:
            self.calls += 1
            if self.gate_dir is not None and self.calls == self.gate_call:
                self._hold()
        return F.cross_entropy(logits, targets)

    def _hold(self) -> None:
        from ddp_finetune.distributed import rank

        (self.gate_dir / f"reached.{rank()}").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.gate_dir / "go").exists():
            if time.monotonic() > deadline:  # the test died: fail instead of hanging its run
                raise RuntimeError(f"{self.gate_dir / 'go'} did not appear within {self.timeout} s")
            time.sleep(0.01)


class GradientBlowUp(nn.Module):
    """Cross-entropy whose gradient is multiplied by `factor` at the chosen training calls
    (1-based; with grad_accum 1 and no aux heads, call i is optimizer step i), its value unchanged.

    With fp16 loss scaling (x 2**16) a factor of 1e38 overflows float32: GradScaler finds inf and
    the optimizer step is skipped. Without it the gradient is huge but finite. When `record` is a
    path, every training call appends its number and whether it was scaled (`3` or `2 x`), so
    a test can check that the calls it chose are the steps it means.
    """

    def __init__(self, calls=(), factor=1e38, record=None):
        super().__init__()
        self.scaled_calls = set(calls)
        self.factor = factor
        self.record = Path(record) if record else None
        self.calls = 0

    def forward(self, logits, targets):
        loss = F.cross_entropy(logits, targets)
        if not logits.requires_grad:  # evaluation
            return loss
        self.calls += 1
        scaled = self.calls in self.scaled_calls
        if scaled:
            huge = loss * self.factor
            loss = loss + (huge - huge.detach())  # same value, gradient x (1 + factor)
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(f"{self.calls}{' x' if scaled else ''}\n")
        return loss


class SquaredMeanCrossEntropy(nn.Module):
    """(mean cross-entropy)²: a nonlinear function of a per-rank mean, so N ranks averaging their
    own values is not the global batch's loss (what `check-invariance` must catch)."""

    def forward(self, logits, targets):
        return F.cross_entropy(logits, targets) ** 2


class RankNoiseCrossEntropy(nn.Module):
    """Cross-entropy plus noise from a generator seeded by the rank: rank-dependent randomness."""

    def forward(self, logits, targets):
        import torch

        from ddp_finetune.distributed import rank

        g = torch.Generator().manual_seed(1234 + rank())
        return F.cross_entropy(logits, targets) + 0.1 * torch.rand((), generator=g)
