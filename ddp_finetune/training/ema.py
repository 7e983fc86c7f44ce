"""Model EMA: an exponential moving average of the weights, with torch's `swa_utils.AveragedModel`.

    ema = ModelEma(unwrapped_model, decay=0.999, warmup=True)   # after accelerator.prepare
    accelerator.register_for_checkpointing(ema.averaged)       # in every checkpoint
    ...  # after each optimizer step (train.count_step), unless fp16 loss scaling skipped it:
    ema.update(step, found_inf=guard.last_found)                # no host sync
    evaluate(run, ema.module)                                   # val_ema/... metrics

`AveragedModel` keeps the copy of the model, the first-update copy, the parameter / buffer pairing
and the state dict; its `multi_avg_fn` is a foreach lerp as in `get_ema_multi_avg_fn`, with two
differences the training loop needs: the decay may change per step (warmup), and the weight of
the update is a device tensor that is 0 on a step the non-finite guard skipped. That step left
the weights untouched, and an update towards them would still move the average, so it must be
a no-op; reading the guard's verdict on the host would wait for the device on every step.

Every rank holds the same average: it follows the weights, which are the same on every rank after
DDP's all-reduce, and it is updated on the same steps. BatchNorm statistics are averaged too
(`use_buffers=True`, as timm's ModelEmaV3 does), integer buffers copied.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, step: int, warmup: bool) -> float:
    """The decay of the update after optimizer step `step` (1-based): min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.source = model
        self._weight: torch.Tensor | None = None  # 1 - decay, or 0 on a skipped step (on the model's device)
        # AveragedModel deep-copies `model` where it lives; its `n_averaged` counter stays on the CPU,
        # so the first-update test it makes on every update never waits for a GPU
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.update_parameters(model)  # the average starts at the initial weights
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict keys as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def _lerp(self, ema_params: list[torch.Tensor], model_params: list[torch.Tensor], _n_averaged) -> None:
        if torch.is_floating_point(ema_params[0]):
            weight = self._weight.to(device=ema_params[0].device, dtype=ema_params[0].dtype)
            torch._foreach_lerp_(ema_params, model_params, weight)
        else:  # num_batches_tracked: follows the model
            torch._foreach_copy_(ema_params, model_params)

    def update(self, step: int, found_inf: torch.Tensor | None = None) -> None:
        """Move the average towards the current weights after optimizer step `step` (1-based).
        `found_inf` (a 0-dim device tensor, 1 = the step was skipped) makes the update a no-op."""
        weight = torch.tensor(1.0 - warmup_decay(self.decay, step, self.warmup), dtype=torch.float64)
        device = next(self.module.parameters()).device
        weight = weight.to(device, non_blocking=True)
        if found_inf is not None:
            weight = weight * (1 - found_inf.to(weight.dtype))
        self._weight = weight
        self.averaged.update_parameters(self.source)
