"""`Run`: everything a training run holds, built once from the config by `build_run`.

    run = build_run(cfg)     # data -> classes -> model -> groups -> optimizer -> schedule -> prepare
    for line in start_lines(run): print0(line)

The loop (`train.py`) and evaluation (`evaluate.py`) read these fields by name; nothing else keeps
training state. Progress through the run (step, epoch) lives in `train.Progress`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed as dist_utils
from . import performance
from .config import Config, dump_config
from .data import Classes, Splits, decide_classes, load_splits
from .datasets import build_datasets, decide_decode
from .ema import ModelEma
from .errors import UserError
from .files import atomic_write_text
from .freeze import BackboneFreeze
from .guards import NonFiniteGuard
from .image_check import check_images
from .loaders import EpochSampler, LoaderPlan, build_loaders, plan_loaders
from .losses import build_loss, needs_statistics_pass
from .models import LoadReport, Parts, build_model, check_model_name
from .output_dir import check_free_space
from .param_groups import build_param_groups, describe_groups, make_optimizer
from .schedules import Schedule, build_schedule
from .tracking import log_with
from .transforms import DeviceInput, device_input


@dataclass
class Run:
    """The objects of one training run, by name (see `build_run` for how each is made)."""

    cfg: Config
    accelerator: Any  # accelerate.Accelerator
    model: nn.Module  # prepared: DDP-wrapped when there are several processes
    optimizer: Any  # the prepared optimizer (Accelerate's wrapper)
    raw_optimizer: Any  # the torch optimizer inside it: its param_groups carry the group names and lrs
    groups: list[dict]  # the parameter groups as built (names, roles, base lrs)
    schedule: Schedule
    train_loader: Any
    val_loader: Any
    sampler: EpochSampler
    train_set: Any  # its `.epoch` seeds augmentation
    prepare_input: DeviceInput  # uint8 batch (or an EncodedBatch) -> the model's input on the device
    loader_plan: LoaderPlan  # workers, pinning, prefetch (for the start-up lines)
    decode_note: str  # where images are decoded, and why (for the start-up lines)
    loss_fn: Callable  # the training loss, synchronized across ranks
    eval_loss_fn: Callable  # the same loss on gathered logits, not synchronized
    splits: Splits
    classes: Classes
    parts: Parts  # what the package knows of the model: head, blocks, aux-loss weight, normalization
    freeze: BackboneFreeze  # freeze_backbone / unfreeze_at_epoch / freeze_bn, at the moments it acts
    load_report: LoadReport  # what build_model loaded (weights, missing / unexpected keys)
    guard: NonFiniteGuard  # skips non-finite steps on the device, checked every check_every_n_steps
    steps_per_epoch: int
    ema: ModelEma | None = None  # train.ema_decay: the moving average of the weights, checkpointed


def check_batch_sizes(cfg: Config, processes: int) -> None:
    k = cfg.train.grad_accum
    if cfg.train.batch_size % (processes * k):
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not divide by {processes} processes x train.grad_accum={k}; "
            f"use a multiple of {processes * k}"
        )
    eval_batch = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_batch % processes:
        raise UserError(
            f"train.eval_batch_size={eval_batch} does not divide by {processes} processes; use a multiple of {processes}"
        )


def start_accelerator(cfg: Config):
    """The Accelerator, after every check that needs no data; the run's config.yaml written."""
    accelerator = dist_utils.make_accelerator(
        cfg.train.mixed_precision, log_with=log_with(cfg), project_dir=cfg.output_dir
    )
    check_batch_sizes(cfg, accelerator.num_processes)
    device_type = accelerator.device.type
    performance.configure_backends(device_type == "cuda", cfg.train.deterministic)
    if cfg.train.compile:
        performance.check_compile(device_type)  # before any data is loaded
    check_model_name(cfg.model.name, cfg.task)  # before loading any data
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    accelerator.wait_for_everyone()
    return accelerator


@dataclass
class Data:
    """The run's data, from the splits to the loaders (`build_data`)."""

    splits: Splits
    classes: Classes
    train_set: Any
    val_set: Any
    decode_note: str


def build_data(cfg: Config, accelerator) -> Data:
    """Splits (every image checked once), classes, and the torch datasets."""
    # the first rank of each node fills the node's caches (datasets), the others read
    with accelerator.local_main_process_first():
        splits = load_splits(cfg.data, cfg.seed, cfg.task)
    splits = check_images(cfg, splits, cfg.output_dir)  # unreadable images: listed, or dropped with skip
    classes = decide_classes(cfg, splits)
    decode_on_device, decode_note = decide_decode(cfg, splits, accelerator.device.type == "cuda")
    train_set, val_set = build_datasets(cfg, splits, classes, decode_on_device)
    return Data(splits, classes, train_set, val_set, decode_note)


def build_run(cfg: Config) -> Run:
    """Build everything in the order data -> model -> optimizer -> schedule -> prepare."""
    from accelerate.utils import set_seed

    accelerator = start_accelerator(cfg)
    device_type = accelerator.device.type
    data = build_data(cfg, accelerator)
    with accelerator.local_main_process_first():  # the first rank of each node fills $TORCH_HOME
        set_seed(cfg.seed)  # identical initial weights on every rank
        model, parts, report = build_model(cfg.model, data.classes.outputs, cfg.task, image_size=cfg.data.image_size)
    check_free_space(cfg, model)
    loader_plan = plan_loaders(cfg.data.num_workers, device_type == "cuda")
    train_loader, val_loader, sampler = build_loaders(cfg, data.train_set, data.val_set, loader_plan)

    # SyncBatchNorm and channels_last before the optimizer exists: its state takes the params' layout
    model = performance.convert_model(model, cfg.model.sync_bn, device_type, accelerator.num_processes)
    channels_last = performance.channels_last(device_type, model)
    prepare_input = device_input(parts.mean, parts.std, accelerator.device, cfg.train.mixed_precision, channels_last)
    # frozen for the whole run: requires_grad=False before DDP wraps the model (saves compute);
    # frozen until an epoch: grads are dropped each step instead, so DDP registers every param.
    # After convert_model: the policy lists the (Sync)BatchNorm modules the model will run.
    freeze = BackboneFreeze(cfg.model, parts)
    freeze.before_wrap(model)
    groups = build_param_groups(model, parts, cfg.optim)
    # fused kernels skip a non-finite step on the device; under fp16 the GradScaler skips instead
    # (Accelerate tells which steps it skipped, so the schedule does not advance on them)
    on_device = cfg.train.mixed_precision != "fp16"
    optimizer = make_optimizer(groups, cfg.optim, fused=on_device)
    steps_per_epoch = len(data.train_set) // cfg.train.batch_size
    schedule = build_schedule(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs)
    outputs = data.classes.outputs
    # the training loss counts bad labels on the device; the loop reads them on check steps
    loss_fn = build_loss(cfg.loss, cfg.task, outputs, defer_target_check=True)
    eval_loss_fn = build_loss(dataclasses.replace(cfg.loss, sync=False), cfg.task, outputs)

    model, prepared_opt, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # the average of the model as trained (unwrapped from DDP, on its device), before compilation
    ema = (
        ModelEma(accelerator.unwrap_model(model), cfg.train.ema_decay, cfg.train.ema_warmup)
        if cfg.train.ema_decay
        else None
    )
    if cfg.train.compile:
        model = performance.compile_model(model, device_type)
    accelerator.register_for_checkpointing(schedule)
    if ema is not None:  # after the schedule: a checkpoint without EMA keeps its file names
        accelerator.register_for_checkpointing(ema.averaged)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=prepared_opt,
        raw_optimizer=optimizer,
        groups=groups,
        schedule=schedule,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        train_set=data.train_set,
        prepare_input=prepare_input,
        loader_plan=loader_plan,
        decode_note=data.decode_note,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        splits=data.splits,
        classes=data.classes,
        parts=parts,
        freeze=freeze,
        load_report=report,
        guard=NonFiniteGuard(accelerator.device, cfg.train.max_nonfinite_steps, on_device=on_device),
        steps_per_epoch=steps_per_epoch,
        ema=ema,
    )


def start_lines(run: Run) -> list[str]:
    """What the main process prints before training: world, data, weights, groups, schedule."""
    a, cfg = run.accelerator, run.cfg
    layout = dist_utils.layout()
    n, k = a.num_processes, cfg.train.grad_accum
    classes_from = f" (from {run.classes.source})" if run.classes.source else ""
    if cfg.task == "binary":
        classes_from = f" ({', '.join(run.classes.names)}) as one logit"
    count = len(run.classes.names) if cfg.task == "binary" else run.classes.outputs
    lines = [
        f"ddp-finetune: world size {n} (node rank {layout['node_rank']} of {layout['num_nodes']}, "
        f"main address {layout['main_address']}), device {a.device}, mixed precision {cfg.train.mixed_precision}",
        f"data: {len(run.train_set)} train images, {len(run.splits.val)} validation ({run.splits.val_source}), "
        f"{count} classes{classes_from}; global batch {cfg.train.batch_size} = {n} processes x {k} "
        f"accumulation x {cfg.train.batch_size // (n * k)} per micro-batch",
        *run.splits.notes,
    ]
    loaded = run.load_report.describe()
    if loaded:
        lines.append(loaded)
    lines.append(f"{run.loader_plan.describe()}; images {run.decode_note}, normalized on {a.device.type}")
    lines.append(loss_line(run))
    lines.append(describe_groups(run.groups))
    lines.append(run.schedule.describe())
    if run.ema is not None:
        warmup = ", warmup min(decay, (1 + t) / (10 + t))" if cfg.train.ema_warmup else ""
        lines.append(f"EMA of the weights: decay {cfg.train.ema_decay}{warmup}; evaluated as val_ema/...")
    return lines


def loss_line(run: Run) -> str:
    """The loss, and what gradient accumulation does to its objective."""
    cfg, k = run.cfg, run.cfg.train.grad_accum
    line = f"loss: {cfg.loss.name}"
    if k == 1 or ":" in cfg.loss.name:
        return line
    if needs_statistics_pass(run.loss_fn):
        return line + f"; exact over the {k} micro-batches of a step (a statistics pass without gradients first)"
    exact = dataclasses.replace(cfg.loss, accumulation="exact")
    if cfg.loss.accumulation == "micro_batch" and needs_statistics_pass(
        build_loss(exact, cfg.task, run.classes.outputs)
    ):
        return line + (
            f"; loss.accumulation=micro_batch: the mean of {k} micro-batch losses, so the objective depends on "
            "train.grad_accum (loss.accumulation=exact makes it the global batch's)"
        )
    return line
