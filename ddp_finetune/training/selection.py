"""Model selection: the best evaluation of a monitored metric, and early stopping.

    state = Selection()                                # lives in train.Progress (every checkpoint)
    improved = state.observe(cfg.train, metrics, step)  # metrics: {"val/top1": ..., "val_ema/top1": ...}
    state.should_stop(cfg.train)                        # patience evaluations without improvement

The metrics an evaluation returns are global (gathered or reduced across ranks), so every rank
observes the same values and takes the same decision; train.py still agrees on the stop across
ranks (`distributed.any_rank`) so that no rank can leave the loop alone and hang the others.
The state is plain numbers saved in `trainer_state.json`: a resumed run stops where the
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddp_finetune.errors import UserError


def monitor_mode(train_cfg) -> str:
    """`min` or `max`: `auto` is min for a loss, max for accuracy, IoU, Dice..."""
    if train_cfg.monitor_mode != "auto":
        return train_cfg.monitor_mode
    return "min" if "loss" in train_cfg.monitor.partition("/")[2] else "max"


@dataclass
class Selection:
    """Where the monitored metric stands; saved as a dict in every checkpoint."""

    best_value: float | None = None  # the best value seen
    best_step: int | None = None  # the optimizer step it was seen at
    bad_evaluations: int = 0  # evaluations in a row without an improvement
    stopped_early: bool = False  # early stopping ended the run

    def observe(self, train_cfg, metrics: dict, step: int) -> bool:
        """Record one evaluation; True when it is the new best (more than min_delta better)."""
        key = train_cfg.monitor
        if key not in metrics:
            known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
            raise UserError(f"train.monitor={key!r} is not a metric this run evaluates; use one of: {known}")
        value = float(metrics[key])
        delta = train_cfg.early_stopping_min_delta
        if self.best_value is None:
            better = math.isfinite(value)
        elif monitor_mode(train_cfg) == "max":
            better = value > self.best_value + delta
        else:
            better = value < self.best_value - delta
        if better:
            self.best_value, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return better

    def should_stop(self, train_cfg) -> bool:
        patience = train_cfg.early_stopping_patience
        return patience is not None and self.bad_evaluations >= patience

    def describe(self, train_cfg) -> dict:
        """What model.json and summary.json say about the selected model."""
        return {
            "monitor": train_cfg.monitor,
            "mode": monitor_mode(train_cfg),
            "step": self.best_step,
            "value": self.best_value,
        }
