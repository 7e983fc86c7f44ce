"""Freezing the backbone (`model.freeze_backbone`, `model.unfreeze_at_epoch`) and BatchNorm statistics
(`model.freeze_bn`): one policy object that acts at a few named moments of the run.

    freeze = BackboneFreeze(cfg.model, parts)
    freeze.before_wrap(model)                 # before accelerator.prepare / DDP
    ...
    freeze.start_epoch(model, epoch)          # model.train(), then the frozen BatchNorms to eval
    loss.backward()
    if accelerator.sync_gradients:
        freeze.after_backward(epoch)          # before clipping and optimizer.step()

Why the optimizer groups exist from step 0: gradual unfreezing that adds a group later breaks
torch schedulers (the new group is not scheduled), DDP (parameters it did not register) and
resume (the saved optimizer has fewer groups) — docs/pitfalls.md, "Gradual unfreezing". Here a frozen
backbone keeps its group (param_groups.py); freezing happens on the gradients instead:

- `freeze_backbone` without `unfreeze_at_epoch` (frozen for the whole run): `before_wrap` sets
  `requires_grad=False` on the backbone before the model is wrapped (DDP never sees it, backward
  skips it: cheapest).
- with `unfreeze_at_epoch`: every parameter keeps `requires_grad=True` (DDP registers them all
  at wrap time), and while `frozen(epoch)` `after_backward` drops the backbone's grads.
  Optimizers skip parameters whose `.grad` is None, so the backbone weights stay bit-identical
  and no momentum / AdamW state accumulates until the unfreeze epoch; clipping measures the
  head's gradient only.

A frozen backbone is frozen entirely: its BatchNorm running statistics stay fixed too, while
the BatchNorms inside a trained head (DeepLabV3's ASPP, FCN's head, LR-ASPP's `cbr`) keep
learning theirs. `model.freeze_bn` fixes every BatchNorm, the whole run.

The policy lists the backbone's parameters and BatchNorms once, on the bare model. Moving a
model to a device and wrapping it (DDP, torch.compile) keep its parameter and module objects —
the optimizer, built before wrapping, relies on the same — so the objects listed are the ones
the wrapped model trains, and no wrapper's name prefix matters.
"""

from __future__ import annotations

from torch import nn

from .models import Parts


class BackboneFreeze:
    """When the backbone and the BatchNorm statistics are frozen, and the few things that does."""

    def __init__(self, model_cfg, parts: Parts):
        self.freeze_backbone: bool = bool(model_cfg.freeze_backbone)
        self.unfreeze_at_epoch: int | None = model_cfg.unfreeze_at_epoch if self.freeze_backbone else None
        self.freeze_bn: bool = bool(model_cfg.freeze_bn)
        self.parts = parts
        self._backbone: list[nn.Parameter] = []  # listed by before_wrap (frozen until an epoch only)
        self._backbone_bn: list[nn.Module] = []
        self._all_bn: list[nn.Module] = []

    @property
    def whole_run(self) -> bool:
        """Frozen for the whole run: `requires_grad=False` before wrapping."""
        return self.freeze_backbone and self.unfreeze_at_epoch is None

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen during `epoch` (0-based)."""
        if not self.freeze_backbone:
            return False
        return self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch

    def before_wrap(self, model: nn.Module) -> int:
        """List the backbone's parameters and BatchNorms on the bare model; frozen for the whole
        run: `requires_grad=False` on the backbone. Returns how many parameters were frozen."""
        backbone = [p for name, p in model.named_parameters() if not self.parts.is_head(name)]
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._all_bn.append(module)
                if not self.parts.is_head(name):
                    self._backbone_bn.append(module)
        if self.whole_run:
            for p in backbone:
                p.requires_grad_(False)
            return len(backbone)
        if self.freeze_backbone:
            self._backbone = backbone
        return 0

    def start_epoch(self, model: nn.Module, epoch: int) -> int:
        """`model.train()` for `epoch`, then BatchNorms with fixed statistics back to eval mode:
        all with `freeze_bn`, the backbone's while it is frozen. Returns how many.

        Only BatchNorm: LayerNorm / GroupNorm have no running statistics, and dropout must stay
        in train mode.
        """
        model.train()
        fixed = self._all_bn if self.freeze_bn else self._backbone_bn if self.frozen(epoch) else []
        for module in fixed:
            module.eval()
        return len(fixed)

    def after_backward(self, epoch: int) -> int:
        """While frozen until an epoch: `.grad = None` on the backbone. Call when the gradients
        are synchronized, before clipping and `optimizer.step()`. Returns how many had one."""
        if not self.frozen(epoch):
            return 0
        dropped = 0
        for p in self._backbone:
            if p.grad is not None:
                p.grad = None
                dropped += 1
        return dropped
