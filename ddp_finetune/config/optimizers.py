"""`optim.name`: every `torch.optim` optimizer by name (kept apart from param_groups.py so that checking a
config does not import the model zoo)."""

from __future__ import annotations

import torch

from ddp_finetune.errors import UserError

# need a closure per step (LBFGS) or sparse gradients (SparseAdam): not what a training step gives them
_UNSUPPORTED = {"lbfgs": "needs a closure that re-evaluates the loss", "sparseadam": "needs sparse gradients"}


def optimizer_classes() -> dict[str, type]:
    """Every `torch.optim` optimizer class by its lower-case name (`sgd`, `adamw`, `radam`, ...)."""
    out = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            out[name.lower()] = cls
    return out


def optimizer_class(name: str) -> type:
    """The `torch.optim` class named `name` (any case), or a UserError listing them."""
    classes = optimizer_classes()
    key = name.lower()
    if key in _UNSUPPORTED:
        raise UserError(
            f"optim.name={name!r} {_UNSUPPORTED[key]}, which the training loop does not give it; use another"
        )
    if key not in classes:
        names = ", ".join(sorted(n for n in classes if n not in _UNSUPPORTED))
        raise UserError(f"optim.name={name!r} is not a torch.optim optimizer; use one of {names}")
    return classes[key]
