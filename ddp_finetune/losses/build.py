"""`loss:` config -> a loss callable: the one validation of the loss options, and user losses by import path."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from ddp_finetune.errors import UserError
from ddp_finetune.losses.batch import check_weight_count
from ddp_finetune.losses.kinds import Accumulation as LossAccumulation
from ddp_finetune.losses.module import Loss
from ddp_finetune.losses.options import check_options, show_value
from ddp_finetune.losses.table import LOSS_NAMES, LOSSES, TASK_MODES

# ignore_index: also read by the data scan and the metrics; sync: a user loss is never synchronized
# by us, so sync=false (as the evaluation loss is built) describes it
_USER_READS = ("name", "args", "ignore_index", "sync")
_USER_FORM = f"use package.module:Name of an importable function or nn.Module class, or one of {', '.join(LOSS_NAMES)}"


def _reads(cls: type[Loss]) -> set[str]:
    """The LossConfig fields a built-in loss reads."""
    return {"name", "mode", *cls.option_names()} | ({"accumulation"} if cls.is_region() else set())


def _reject_ignored(cfg, name: str, reads: set[str]) -> None:
    """An option set (different from its default) that this loss does not read is an error."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in reads or value == default:
            continue
        readers = [n for n, cls in LOSSES.items() if f.name in _reads(cls)] or ["a user loss (package.module:Name)"]
        raise UserError(
            f"loss.{f.name}={show_value(value, 'loss.')} is not used by {name} (only by {', '.join(readers)}); remove it"
        )


def _resolve_mode(cfg, task: str | None) -> str | None:
    if task is None:
        return cfg.mode
    if task not in TASK_MODES:
        raise UserError(f"task={task!r} is not one of {', '.join(TASK_MODES)}")
    needed = TASK_MODES[task]
    if cfg.mode not in (None, needed):
        raise UserError(
            f"loss.mode={cfg.mode} does not fit task={task}, whose labels need mode {needed}; "
            f"set loss.mode={needed} or null"
        )
    return needed


def check_loss_config(cfg, task: str | None = None, num_classes: int | None = None) -> str | None:
    """Check a `config.LossConfig` once, completely; returns the loss's mode (None: not known yet).

    Called by `LossConfig.validate` (no task yet) and again by `build_loss` with the task and the
    number of classes. Rejects an unknown name, a value out of range, a mode that does not fit
    the task, class weights of the wrong length, and any option the chosen loss does not read.
    An option counts as set when it differs from its LossConfig default (setting an option to
    its default changes nothing, so it is accepted whichever loss is chosen).
    """
    name = cfg.name
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise UserError(f"loss.name={name!r} is not of the form package.module:Name; {_USER_FORM}")
        _reject_ignored(cfg, name, set(_USER_READS))
        return None
    if name not in LOSSES:
        raise UserError(
            f"loss.name={name!r} is not one of {', '.join(LOSS_NAMES)}; or give your own loss as package.module:Name"
        )
    cls = LOSSES[name]
    _reject_ignored(cfg, name, _reads(cls))
    mode = _resolve_mode(cfg, task)
    owner = f"loss.name={name}"
    check_options(name, mode, {k: getattr(cfg, k) for k in cls.option_names()}, owner=owner, prefix="loss.")
    accumulations = typing.get_args(LossAccumulation)
    if cfg.accumulation not in accumulations:
        raise UserError(f"loss.accumulation={cfg.accumulation!r} is not one of {', '.join(accumulations)}")
    if num_classes is not None and mode is not None and cfg.class_weights is not None:
        check_weight_count(owner, cfg.class_weights, 1 if mode == "binary" else num_classes, key="loss.class_weights")
    return mode


def build_loss(
    cfg_loss, task: str, num_classes: int, *, defer_target_check: bool = False
) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss named by `cfg.loss` (a `config.LossConfig`) as a callable(logits, targets) -> scalar.

    `task` picks the default mode: `classification` (integer labels) -> multiclass, `binary`
    (one logit, float targets) -> binary, `multilabel` (multi-hot float targets) -> multilabel.
    A built-in loss is a `Loss` module (see its training options; `defer_target_check` for the
    training loop). `loss.name: package.module:Name` imports your own loss: a function is called
    as fn(logits, targets, **loss.args), an nn.Module class is built with **loss.args and called.
    A user loss is not synchronized across ranks by us; use `all_reduce_sum_with_grad` in it.
    """
    mode = check_loss_config(cfg_loss, task, num_classes)
    name = cfg_loss.name
    if ":" in name:
        return _user_loss(name, cfg_loss.args)
    cls = LOSSES[name]
    options = {k: getattr(cfg_loss, k) for k in cls.option_names()}  # the config's fields, by name
    return cls(mode, accumulation=cfg_loss.accumulation, defer_target_check=defer_target_check, **options)


def needs_statistics_pass(loss_fn) -> bool:
    """Whether the loop must run a statistics pass for this loss (any loss `build_loss` returns)."""
    return isinstance(loss_fn, Loss) and loss_fn.needs_statistics_pass


def check_targets(loss_fn) -> None:
    """`Loss.check_targets` for any loss `build_loss` returns (a user loss checks its own input)."""
    if isinstance(loss_fn, Loss):
        loss_fn.check_targets()


def _user_loss(name: str, args: dict) -> Callable[[Tensor, Tensor], Tensor]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"loss.name={name!r}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH or {_USER_FORM}"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"loss.name={name!r}: module {module_name!r} has no {attr!r}; {_USER_FORM}")
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            raise UserError(f"loss.name={name!r} is a class but not an nn.Module; {_USER_FORM}")
        try:
            return obj(**args)
        except TypeError as exc:
            raise UserError(
                f"loss.name={name!r}: cannot build it with loss.args={args!r} ({exc}); fix loss.args"
            ) from None
    if not callable(obj):
        raise UserError(f"loss.name={name!r} is not callable; {_USER_FORM}")
    return partial(obj, **args) if args else obj
