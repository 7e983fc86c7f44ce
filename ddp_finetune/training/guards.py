"""Non-finite steps: skipped on the device, counted there, and looked at only every few steps.

    guard = NonFiniteGuard(device, limit=cfg.train.max_nonfinite_steps, on_device=True)
    ...  # each optimizer step, after backward (and clipping):
    guard.before_update(optimizer, grads, grad_norm, loss)   # hands `found_inf` to the optimizer
    optimizer.step()
    guard.after_update(optimizer)
    ...  # every train.check_every_n_steps steps:
    guard.check(step)                                        # one small read; UserError past the limit

A NaN or inf in any gradient (after DDP's all-reduce, so every rank sees the same) makes the step
a no-op: the optimizer is a fused SGD / AdamW that reads `found_inf` on the device and leaves the
weights and its state untouched, the way torch's GradScaler skips fp16 overflow steps with
fused optimizers. Nothing waits for the device on an ordinary step; the counters (steps skipped
in a row, in total, the last finite loss) stay on the device until `check`.

Under fp16, Accelerate's GradScaler does the skipping (and its own per-step overflow read);
the guard then only counts the steps it reports as skipped (`on_device=False`, `scaler=`).
Those skips are expected: the scaler starts at 2^16 and halves on each overflow until the
gradients fit (about 5 skips to ~2^11 on a healthy run, more after each growth), so they are
counted apart (`scaler_skipped_steps`) and do not count toward `limit`. A skip counts as a
non-finite step only once the scale has collapsed below 1 (even unscaled, the fp16 gradients
overflow: a NaN / inf loss halves the scale on every step); and skips that persist for `limit`
steps beyond the scaler's whole calibration range (`SCALER_CALIBRATION_SKIPS`) stop the run too.
"""

from __future__ import annotations

import torch

from ddp_finetune.errors import UserError

# halvings from GradScaler's initial scale 2^16 down to 1: the skips a calibration may take
SCALER_CALIBRATION_SKIPS = 16


class NonFiniteGuard:
    def __init__(self, device, limit: int, on_device: bool = True, scaler=None):
        self.limit, self.on_device, self.scaler = limit, on_device, scaler
        # [non-finite in a row, non-finite in total, last finite step loss, scaler skips in total, in a row]
        self.counts = torch.zeros(5, dtype=torch.float64, device=device)
        self.counts[2] = float("nan")
        self._found: torch.Tensor | None = None

    def before_update(self, optimizer, grads: list[torch.Tensor], grad_norm: torch.Tensor | None, loss) -> bool:
        """Decide on the device whether this step's gradients are finite; hand the verdict to `optimizer`.

        Returns whether to call `optimizer.step()`: always for a fused optimizer (it reads the verdict
        on the device); for one without fused kernels (`optim.name: radam`, ...) the verdict is read
        here, a host sync per step, and a non-finite step is not taken."""
        step_loss = loss.detach().to(torch.float64)
        self.counts[2] = torch.where(torch.isfinite(step_loss), step_loss, self.counts[2])
        if not self.on_device or not grads:
            self._found = None
            return True
        if grad_norm is None:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        found = (~torch.isfinite(grad_norm)).to(torch.float32).reshape(())
        self._found = found
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            return not bool(found.item())
        # the protocol torch's GradScaler uses with fused optimizers: a 0-dim float tensor, 1 = skip
        optimizer.found_inf = found
        return True

    def after_update(self, optimizer, skipped_by_scaler: bool = False) -> None:
        """Count the step as skipped or not (on the device, no sync)."""
        if self.on_device:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
            found = self._found.to(torch.float64) if self._found is not None else None
        else:
            found = self._count_scaler_skip(float(skipped_by_scaler))
        if found is None:
            return
        self.counts[0] = (self.counts[0] + 1) * found  # consecutive skips, reset by a real step
        self.counts[1] += found

    def _count_scaler_skip(self, skipped: float) -> torch.Tensor:
        """Count a GradScaler skip (a host bool Accelerate has read already; arithmetic with a Python
        number copies nothing). Returns whether it is a non-finite step: the scale, as the scaler's
        update left it, is below 1."""
        self.counts[4] = (self.counts[4] + 1) * skipped
        self.counts[3] += skipped
        scale = getattr(self.scaler, "_scale", None)  # the device tensor behind get_scale(), which would sync
        if scale is None:
            return torch.zeros((), dtype=torch.float64, device=self.counts.device)
        collapsed = (scale.reshape(()).to(self.counts.device) < 1.0).to(torch.float64)
        return collapsed * skipped

    @property
    def last_found(self) -> torch.Tensor | None:
        """The last step's verdict on the device (0-dim float, 1 = skipped), or None when the guard
        does not skip on the device (fp16: ask Accelerate's `optimizer_step_was_skipped`)."""
        return self._found if self.on_device else None

    def check(self, step: int) -> dict:
        """Read the counters (one small device-to-host copy); raise once `limit` steps in a row were skipped
        as non-finite, or (fp16) the GradScaler kept skipping `limit` steps past its calibration."""
        in_a_row, total, last_loss, scaler_total, scaler_in_a_row = self.counts.tolist()
        if not self.on_device and scaler_in_a_row >= self.limit + SCALER_CALIBRATION_SKIPS and in_a_row < self.limit:
            first = step - int(scaler_in_a_row) + 1
            raise UserError(
                f"fp16 loss scaling skipped {int(scaler_in_a_row)} optimizer steps in a row (steps {first}-{step}), "
                f"{self.limit} more than its calibration can take (train.max_nonfinite_steps={self.limit}); the "
                "gradients overflow fp16 at every scale: use train.mixed_precision=bf16, lower optim.lr or set "
                "train.max_grad_norm"
            )
        if in_a_row >= self.limit:
            first = step - int(in_a_row) + 1
            last = f"{last_loss:.6g}" if last_loss == last_loss else "none yet"
            raise UserError(
                f"{int(in_a_row)} optimizer steps in a row (steps {first}-{step}) had non-finite gradients and were "
                f"skipped (train.max_nonfinite_steps={self.limit}); last finite loss {last}; the weights were not "
                "updated by them: lower optim.lr, set train.max_grad_norm, or check the data and the loss"
            )
        health = {"nonfinite_steps": int(total)}
        if not self.on_device:
            health["scaler_skipped_steps"] = int(scaler_total)
        return health


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating buffer (BatchNorm statistics) is finite: one host read."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    norms = torch.stack([torch.linalg.vector_norm(t.detach().float(), ord=float("inf")) for t in tensors])
    return bool(torch.isfinite(norms).all())
