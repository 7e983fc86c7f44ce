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
the guard then only counts the steps it reports as skipped (`on_device=False`).
"""

from __future__ import annotations

import torch

from .errors import UserError


class NonFiniteGuard:
    def __init__(self, device, limit: int, on_device: bool = True):
        self.limit, self.on_device = limit, on_device
        # [skipped in a row, skipped in total, last finite step loss]
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)
        self.counts[2] = float("nan")
        self._found: torch.Tensor | None = None

    def before_update(self, optimizer, grads: list[torch.Tensor], grad_norm: torch.Tensor | None, loss) -> None:
        """Decide on the device whether this step's gradients are finite; hand the verdict to `optimizer`."""
        step_loss = loss.detach().to(torch.float64)
        self.counts[2] = torch.where(torch.isfinite(step_loss), step_loss, self.counts[2])
        if not self.on_device or not grads:
            self._found = None
            return
        if grad_norm is None:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        found = (~torch.isfinite(grad_norm)).to(torch.float32).reshape(())
        self._found = found
        # the protocol torch's GradScaler uses with fused optimizers: a 0-dim float tensor, 1 = skip
        optimizer.found_inf = found

    def after_update(self, optimizer, skipped_by_scaler: bool = False) -> None:
        """Count the step as skipped or not (on the device, no sync)."""
        if self.on_device:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
            found = self._found.to(torch.float64) if self._found is not None else None
        else:
            found = torch.tensor(float(skipped_by_scaler), dtype=torch.float64, device=self.counts.device)
        if found is None:
            return
        self.counts[0] = (self.counts[0] + 1) * found  # consecutive skips, reset by a real step
        self.counts[1] += found

    @property
    def last_found(self) -> torch.Tensor | None:
        """The last step's verdict on the device (0-dim float, 1 = skipped), or None when the guard
        does not skip on the device (fp16: ask Accelerate's `optimizer_step_was_skipped`)."""
        return self._found if self.on_device else None

    def check(self, step: int) -> dict:
        """Read the counters (one small device-to-host copy); raise once `limit` steps in a row were skipped."""
        in_a_row, total, last_loss = self.counts.tolist()
        if in_a_row >= self.limit:
            first = step - int(in_a_row) + 1
            last = f"{last_loss:.6g}" if last_loss == last_loss else "none yet"
            raise UserError(
                f"{int(in_a_row)} optimizer steps in a row (steps {first}-{step}) had non-finite gradients and were "
                f"skipped (train.max_nonfinite_steps={self.limit}); last finite loss {last}; the weights were not "
                "updated by them: lower optim.lr, set train.max_grad_norm, or check the data and the loss"
            )
        return {"nonfinite_steps": int(total)}


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating buffer (BatchNorm statistics) is finite: one host read."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    norms = torch.stack([torch.linalg.vector_norm(t.detach().float(), ord=float("inf")) for t in tensors])
    return bool(torch.isfinite(norms).all())
