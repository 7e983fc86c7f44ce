"""Learning-rate schedules, defined per optimizer step.

    schedule = build_schedule(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs)
    print0(schedule.describe())
    ...  # after an optimizer step that really happened:
    schedule.step()
    ...  # after each epoch's evaluation:
    schedule.epoch_end(epoch, val_metrics)

A "step" is one optimizer step: never a micro-batch of gradient accumulation, never multiplied
by the number of processes (a scheduler passed to `accelerator.prepare` is stepped once per
process: docs/pitfalls.md, "A prepared scheduler steps N times"; do not prepare this one, register it with `register_for_checkpointing`).
The loop calls `step()` only when the optimizer really stepped, not when fp16 loss scaling
skipped the step. `steps_per_epoch` is optimizer steps per epoch.

Every schedule scales each group's own `base_lr` (set by `param_groups.build_param_groups`), so
the head / backbone and layer-decay ratios hold through warmup and decay.

Warmup. With W warmup steps (`schedule.warmup_steps`, or `round(warmup_epochs x steps_per_epoch)`
when `warmup_steps` is 0), optimizer step s (0-based) for s < W runs at

    lr = start_lr x (s + 1) / (W + 1)

where start_lr is the lr the schedule itself starts from (the group's base lr for every schedule
whose first value is its base lr; e.g. OneCycleLR starts at max_lr / div_factor), so the ramp
joins the schedule without a jump. Step W runs the schedule's own step 0: every schedule counts
its steps (and `step_decay` / epoch-interval schedulers their epochs) from the end of warmup.

Schedules (`schedule.name`):
- `constant`: the base lr.
- `step_decay`: base x gamma^(epoch // every), with epoch = optimizer steps after warmup //
  steps_per_epoch (the classic `adjust_learning_rate`); it changes at step boundaries, whatever
  `schedule.interval`.
- any `torch.optim.lr_scheduler` class by name with `schedule.args` as its keyword arguments,
  stepped after every optimizer step (`interval: step`) or after every epoch (`interval: epoch`;
  only epochs that started after warmup count). Lengths are in `interval` units; when not given,
  CosineAnnealingLR `T_max`, OneCycleLR `total_steps`, PolynomialLR and LinearLR `total_iters`
  default to the length of the run after warmup (optimizer steps, or epochs). OneCycleLR
  `max_lr` defaults to each group's base lr.
- `ReduceLROnPlateau` is stepped after each epoch's evaluation with `val_metrics[schedule.monitor]`,
  whatever `interval`.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch.optim import lr_scheduler

from ddp_finetune.errors import UserError

MULTIPLIER_SCHEDULES = ("constant", "step_decay")

# Schedulers that need other schedulers or Python callables: not expressible as YAML args.
_NOT_BY_NAME = {"LRScheduler", "_LRScheduler", "SequentialLR", "ChainedScheduler", "LambdaLR", "MultiplicativeLR"}

# Length arguments defaulted to the run's length (after warmup, in interval units).
_LENGTH_ARGS = {
    "CosineAnnealingLR": "T_max",
    "OneCycleLR": "total_steps",
    "PolynomialLR": "total_iters",
    "LinearLR": "total_iters",
}


def torch_scheduler_names() -> list[str]:
    """The `torch.optim.lr_scheduler` classes usable by name."""
    names = []
    for name in dir(lr_scheduler):
        obj = getattr(lr_scheduler, name)
        if isinstance(obj, type) and issubclass(obj, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)):
            if name not in _NOT_BY_NAME and not name.startswith("_"):
                names.append(name)
    return sorted(names)


def valid_schedule_names() -> list[str]:
    return list(MULTIPLIER_SCHEDULES) + torch_scheduler_names()


def _resolve_name(name: str) -> str:
    valid = valid_schedule_names()
    by_lower = {v.lower(): v for v in valid}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"schedule.name={name!r} is not a known schedule{hint}; use one of {', '.join(valid)}")


def warmup_steps_of(schedule_cfg, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: `warmup_steps`, else `round(warmup_epochs x steps_per_epoch)`."""
    if schedule_cfg.warmup_steps > 0:
        return int(schedule_cfg.warmup_steps)
    return int(round(schedule_cfg.warmup_epochs * steps_per_epoch))


class Schedule:
    """The learning rate of every group, as a function of optimizer steps and finished epochs.

    Use `build_schedule`. State: optimizer steps taken, the last epoch passed to `epoch_end`,
    and the torch scheduler's state; `state_dict()` / `load_state_dict()` restore it exactly
    (the lrs are re-applied on load, whether the optimizer state is loaded before or after).
    """

    def __init__(
        self,
        optimizer,
        name: str,
        interval: str,
        warmup_steps: int,
        steps_per_epoch: int,
        epochs: int,
        every: int = 30,
        gamma: float = 0.1,
        monitor: str = "val/loss",
        args: dict | None = None,
    ):
        self.optimizer = optimizer
        self.name = name
        self.interval = interval
        self.warmup_steps = warmup_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.every = every
        self.gamma = gamma
        self.monitor = monitor
        self.args = dict(args or {})
        self.steps = 0  # optimizer steps taken
        self.last_epoch_end = -1  # guards against stepping an epoch twice
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"]
            g["initial_lr"] = g["base_lr"]  # torch schedulers take their base from here
        self.scheduler = None if name in MULTIPLIER_SCHEDULES else self._make_torch_scheduler()
        self._apply()

    # ---------------------------------------------------------------- construction

    @property
    def plateau(self) -> bool:
        return isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def schedule_length(self) -> int:
        """Length of the run after warmup in `interval` units (the default for length arguments)."""
        if self.interval == "epoch":
            first_epoch = math.ceil(self.warmup_steps / self.steps_per_epoch)
            return max(1, self.epochs - first_epoch)
        return max(1, self.total_steps - self.warmup_steps)

    def _make_torch_scheduler(self):
        cls = getattr(lr_scheduler, self.name)
        kwargs = dict(self.args)
        length_arg = _LENGTH_ARGS.get(self.name)
        one_cycle_by_epochs = self.name == "OneCycleLR" and "epochs" in kwargs
        if length_arg and length_arg not in kwargs and not one_cycle_by_epochs:
            kwargs[length_arg] = self.schedule_length()
        if self.name == "OneCycleLR" and "max_lr" not in kwargs:
            kwargs["max_lr"] = [g["base_lr"] for g in self.optimizer.param_groups]
        self.resolved_args = kwargs
        try:
            return cls(self.optimizer, **kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())
            raise UserError(
                f"schedule.args={self.args} do not fit {self.name}: {msg}; fix schedule.args "
                f"(keyword arguments of torch.optim.lr_scheduler.{self.name})"
            ) from None

    # ---------------------------------------------------------------- the lr

    def _schedule_lrs(self) -> list[float]:
        """The schedule's own lrs, ignoring warmup (its step 0 while warming up)."""
        if self.scheduler is not None:
            return [float(lr) for lr in self.scheduler.get_last_lr()]
        after = max(0, self.steps - self.warmup_steps)
        mult = 1.0
        if self.name == "step_decay":
            mult = self.gamma ** ((after // self.steps_per_epoch) // self.every)
        return [g["base_lr"] * mult for g in self.optimizer.param_groups]

    def _apply(self) -> None:
        lrs = self._schedule_lrs()
        if self.steps < self.warmup_steps:
            ramp = (self.steps + 1) / (self.warmup_steps + 1)
            lrs = [lr * ramp for lr in lrs]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def step(self) -> None:
        """Call after each optimizer step that really happened."""
        self.steps += 1
        # The torch scheduler's step 0 is optimizer step W; it is stepped from there on.
        if (
            self.scheduler is not None
            and self.interval == "step"
            and not self.plateau
            and self.steps > self.warmup_steps
        ):
            self.scheduler.step()
        self._apply()

    def epoch_end(self, epoch: int, val_metrics: dict | None) -> None:
        """Call after epoch `epoch` (0-based) was trained and evaluated.

        Steps `interval: epoch` schedulers and ReduceLROnPlateau, for epochs that started after
        warmup. `val_metrics=None` means no evaluation happened: ReduceLROnPlateau then waits.
        Calling it again for an epoch already seen does nothing (safe around a resume).
        """
        if epoch <= self.last_epoch_end:
            return
        self.last_epoch_end = epoch
        if self.scheduler is None or epoch * self.steps_per_epoch < self.warmup_steps:
            return
        if self.plateau:
            if val_metrics is None:
                return
            if self.monitor not in val_metrics:
                raise UserError(
                    f"schedule.monitor={self.monitor!r} is not a validation metric; use one of {', '.join(sorted(val_metrics))}"
                )
            self.scheduler.step(float(val_metrics[self.monitor]))
        elif self.interval == "epoch":
            self.scheduler.step()
        self._apply()

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "last_epoch_end": self.last_epoch_end,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise UserError(
                f"the checkpoint's schedule is {state.get('name')!r} but schedule.name={self.name!r}; "
                "resume with the same schedule, or start a fresh run"
            )
        self.steps = int(state["steps"])
        self.last_epoch_end = int(state["last_epoch_end"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._apply()

    # ---------------------------------------------------------------- printing

    def describe(self) -> str:
        if self.name == "constant":
            what = "constant lr"
        elif self.name == "step_decay":
            what = f"step_decay: lr x {self.gamma}^(epoch // {self.every})"
        else:
            args = ", ".join(f"{k}={v}" for k, v in self.resolved_args.items())
            if self.plateau:
                when = f"on {self.monitor} after each epoch's evaluation"
            else:
                when = f"stepped per {'optimizer step' if self.interval == 'step' else 'epoch'}"
            what = f"{self.name}({args}) {when}"
        warmup = (
            f"linear warmup over {self.warmup_steps} steps to each group's starting lr"
            if self.warmup_steps
            else "no warmup"
        )
        return (
            f"lr schedule: {what}; {self.steps_per_epoch} optimizer steps/epoch x {self.epochs} epochs "
            f"= {self.total_steps} steps; {warmup}"
        )


def build_schedule(schedule_cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> Schedule:
    """The run's schedule; sets every group's lr for optimizer step 0."""
    if steps_per_epoch <= 0:
        raise UserError(
            f"{steps_per_epoch} optimizer steps per epoch: the training split is smaller than one "
            "train.batch_size; use a smaller train.batch_size or more data"
        )
    if epochs <= 0:
        raise UserError(f"train.epochs={epochs} must be a positive number")
    name = _resolve_name(schedule_cfg.name)
    if name in MULTIPLIER_SCHEDULES and schedule_cfg.args:
        raise UserError(
            f"schedule.args={schedule_cfg.args} is only for torch schedulers; {name} takes schedule.every / schedule.gamma"
        )
    return Schedule(
        optimizer,
        name=name,
        interval=schedule_cfg.interval,
        warmup_steps=warmup_steps_of(schedule_cfg, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        every=schedule_cfg.every,
        gamma=schedule_cfg.gamma,
        monitor=schedule_cfg.monitor,
        args=schedule_cfg.args,
    )
