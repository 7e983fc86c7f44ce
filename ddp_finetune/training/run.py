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

from ddp_finetune import distributed as dist_utils
from ddp_finetune.config import Config
from ddp_finetune.data.datasets import build_datasets, decide_decode
from ddp_finetune.data.image_check import check_images
from ddp_finetune.data.loaders import EpochSampler, LoaderPlan, build_loaders, eval_batch_size, plan_loaders
from ddp_finetune.data.sources import Classes, Splits, decide_classes, load_splits
from ddp_finetune.data.transforms import DeviceInput, device_input
from ddp_finetune.errors import UserError
from ddp_finetune.losses import build_loss, needs_statistics_pass
from ddp_finetune.models import LoadReport, Parts, build_model, check_model_name, generic_parts
from ddp_finetune.training import performance
from ddp_finetune.training.checkpoint import list_checkpoints
from ddp_finetune.training.ema import ModelEma
from ddp_finetune.training.freeze import BackboneFreeze
from ddp_finetune.training.guards import NonFiniteGuard
from ddp_finetune.training.output_dir import check_free_space
from ddp_finetune.training.param_groups import build_param_groups, describe_groups, make_optimizer
from ddp_finetune.training.schedules import Schedule, build_schedule
from ddp_finetune.training.tracking import log_with


@dataclass
class Inputs:
    """What a Python caller hands `fit` in place of what the config names; None: the config's.

    - `train_data` / `val_data`: `datasets.Dataset`s with the columns `data.*` names (image, label
      or mask): they go through everything a folder goes through (image check, classes, seeded
      augmentation, sampling). Without `val_data`, `data.val_fraction` of `train_data` is held out.
      Or torch `Dataset`s of (uint8 image (3, S, S), target) pairs, used as they are (no image
      check, no augmentation of ours; `class_names` required), e.g. in-memory data for a benchmark.
    - `model` + `head`: your own `nn.Module` (its output: the logits for the classes) and the
      parameter-name prefixes of its head (`["fc"]`); the backbone is its other top-level children
      (for `head_lr`, freezing, layer decay). `final/` holds its weights; rebuild it yourself.
    - `loss`: a callable (logits, targets) -> scalar, or an `nn.Module`, used as the training and
      evaluation loss. Not synchronized across ranks by us: reduce its sums with
      `distributed.all_reduce_sum_with_grad` to keep the N-process = 1-process promise.
    """

    train_data: Any = None
    val_data: Any = None
    class_names: tuple[str, ...] | None = None
    model: nn.Module | None = None
    head: tuple[str, ...] = ()
    loss: Callable | None = None

    def __post_init__(self):
        if self.class_names is not None:
            self.class_names = tuple(str(n) for n in self.class_names)
        self.head = tuple(self.head or ())
        if self.val_data is not None and self.train_data is None:
            raise UserError("fit(val_data=...) without train_data; give train_data too, or neither")
        if self.model is not None and not self.head:
            raise UserError("fit(model=...) needs head=[...]: the parameter-name prefixes of its head, e.g. ['fc']")
        if self.model is not None:
            names = [n for n, _ in self.model.named_parameters()]
            for prefix in self.head:
                if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                    raise UserError(f"fit(head={list(self.head)!r}): no parameter of the model is under {prefix!r}")
        if self.torch_data and self.class_names is None:
            raise UserError("fit(train_data=<a torch Dataset>) needs class_names=[...] (one name per model output)")

    @property
    def hf_data(self) -> bool:
        return self.train_data is not None and _is_hf_dataset(self.train_data)

    @property
    def torch_data(self) -> bool:
        return self.train_data is not None and not _is_hf_dataset(self.train_data)


def _is_hf_dataset(obj) -> bool:
    import datasets

    return isinstance(obj, datasets.Dataset)


@dataclass
class Run:
    """The objects of one training run, by name (see `build_run` for how each is made)."""

    cfg: Config
    accelerator: Any  # accelerate.Accelerator
    model: nn.Module  # prepared: DDP-wrapped when there are several processes
    optimizer: Any  # the prepared optimizer (Accelerate's wrapper)
    raw_optimizer: Any  # the torch optimizer inside it: its param_groups carry the group names and lrs
    schedule: Schedule
    train_loader: Any
    val_loader: Any
    sampler: EpochSampler
    train_set: Any  # its `.epoch` seeds augmentation
    prepare_input: DeviceInput  # uint8 batch (or an EncodedBatch) -> the model's input on the device
    loss_fn: Callable  # the training loss, synchronized across ranks
    eval_loss_fn: Callable  # the same loss on gathered logits, not synchronized
    classes: Classes
    parts: Parts  # what the package knows of the model: head, blocks, aux-loss weight, normalization
    freeze: BackboneFreeze  # what is frozen until when (freeze, freeze_blocks, unfreeze_*), freeze_bn; acts at named moments
    guard: NonFiniteGuard  # skips non-finite steps on the device, checked every check_every_n_steps
    steps_per_epoch: int
    report: StartReport  # what only the start-up lines print
    ema: ModelEma | None = None  # train.ema_decay: the moving average of the weights, checkpointed
    inputs: Inputs = dataclasses.field(default_factory=Inputs)  # what the Python caller gave fit instead


@dataclass
class StartReport:
    """What the start-up lines say about a run that the loop itself never reads."""

    splits: Splits  # sizes, which validation split, notes of the data checks
    load_report: LoadReport  # what build_model loaded (weights, missing / unexpected keys)
    loader_plan: LoaderPlan  # workers, pinning, prefetch
    decode_note: str  # where images are decoded, and why
    groups: list[dict]  # the parameter groups as built (names, roles, base lrs)


def check_batch_sizes(cfg: Config, processes: int) -> None:
    k = cfg.train.grad_accum
    if cfg.train.batch_size % (processes * k):
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not divide by {processes} processes x train.grad_accum={k}; "
            f"use a multiple of {processes * k}"
        )
    eval_batch_size(cfg, processes)


def start_accelerator(cfg: Config, custom_model: bool = False):
    """The Accelerator, after every check that needs no data (loop._fit writes the run's config.yaml once
    the run is known to go ahead: a refused resume leaves the run's own config.yaml as it was)."""
    accelerator = dist_utils.make_accelerator(
        cfg.train.mixed_precision,
        log_with=log_with(cfg),
        project_dir=cfg.output_dir,
        timeout_minutes=cfg.train.dist_timeout_minutes,
    )
    check_batch_sizes(cfg, accelerator.num_processes)
    device_type = accelerator.device.type
    performance.configure_backends(device_type == "cuda", cfg.train.deterministic)
    if cfg.train.compile:
        performance.check_compile(device_type)  # before any data is loaded
    if not custom_model:
        check_model_name(cfg.model.name, cfg.task)  # before loading any data
    if accelerator.is_main_process:  # the folder the run writes to (the image check's list, the free-space check)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
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


def build_data(cfg: Config, accelerator, inputs: Inputs | None = None) -> Data:
    """Splits (every image checked once), classes, and the torch datasets; or the caller's (`Inputs`)."""
    inputs = inputs or Inputs()
    if inputs.torch_data:
        return _given_torch_data(cfg, inputs)
    raw = None
    if inputs.hf_data:
        import datasets

        raw = {cfg.data.train_split: inputs.train_data}
        if inputs.val_data is not None:
            raw[cfg.data.val_split or "validation"] = inputs.val_data
        raw = datasets.DatasetDict(raw)
    # the first rank of each node fills the node's caches (datasets), the others read
    with dist_utils.first_on_each_node(accelerator):
        splits = load_splits(cfg.data, cfg.seed, cfg.task, raw=raw)
    splits = check_images(cfg, splits, cfg.output_dir)  # unreadable images: listed, or dropped with skip
    classes = decide_classes(cfg, splits)
    decode_on_device, decode_note = decide_decode(cfg, splits, accelerator.device.type == "cuda")
    train_set, val_set = build_datasets(cfg, splits, classes, decode_on_device)
    return Data(splits, classes, train_set, val_set, decode_note)


def _given_torch_data(cfg: Config, inputs: Inputs) -> Data:
    """torch datasets of (uint8 image, target) from the caller, as they are."""
    names = inputs.class_names
    outputs = 1 if cfg.task == "binary" else len(names)
    if cfg.task != "binary" and outputs < 2:
        raise UserError(f"fit(class_names={list(names)!r}): a classifier needs at least 2 classes")
    kind = "mask" if cfg.task == "segmentation" else "index"
    classes = Classes(names=names, outputs=outputs, label_kind=kind, source="class_names given to fit")
    val = inputs.val_data if inputs.val_data is not None else []
    splits = Splits(train=inputs.train_data, val=val, class_names=list(names), val_source="given to fit")
    return Data(splits, classes, inputs.train_data, val, "by the datasets given to fit")


def build_run(cfg: Config, inputs: Inputs | None = None) -> Run:
    """Build everything in the order data -> model -> optimizer -> schedule -> prepare."""
    from accelerate.utils import set_seed

    inputs = inputs or Inputs()
    accelerator = start_accelerator(cfg, custom_model=inputs.model is not None)
    device_type = accelerator.device.type
    data = build_data(cfg, accelerator, inputs)
    with dist_utils.first_on_each_node(accelerator):  # the first rank of each node fills $TORCH_HOME
        set_seed(cfg.seed)  # identical initial weights on every rank
        if inputs.model is None:
            model, parts, report = build_model(
                cfg.model, data.classes.outputs, cfg.task, image_size=cfg.data.image_size
            )
        else:
            model, parts, report = inputs.model, generic_parts(inputs.model, inputs.head), LoadReport()
    check_free_space(cfg, model, len(list_checkpoints(cfg.output_dir)))
    if cfg.task != "segmentation" and not inputs.torch_data:
        # validation uses the model's evaluation crop (timm's crop_pct, interpolation)
        data.val_set.eval_crop = (parts.crop_pct, parts.interpolation)
    loader_plan = plan_loaders(cfg.data.num_workers, device_type == "cuda")
    train_loader, val_loader, sampler = build_loaders(cfg, data.train_set, data.val_set, loader_plan)

    # SyncBatchNorm and channels_last before the optimizer exists: its state takes the params' layout
    model = performance.convert_model(model, cfg.model.sync_bn, device_type, accelerator.num_processes)
    channels_last = performance.channels_last(device_type, model)
    prepare_input = device_input(parts.mean, parts.std, accelerator.device, cfg.train.mixed_precision, channels_last)
    # frozen for the whole run: requires_grad=False before DDP wraps the model (saves compute);
    # frozen until an epoch: grads are dropped each step instead, so DDP registers every param.
    # After convert_model: the policy lists the (Sync)BatchNorm modules the model will run.
    freeze = BackboneFreeze(cfg.model, parts, model, cfg.train.epochs)  # the plan: a bad pattern stops here
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
    if inputs.loss is not None:
        loss_fn = eval_loss_fn = inputs.loss
    else:
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
        schedule=schedule,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        train_set=data.train_set,
        prepare_input=prepare_input,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        classes=data.classes,
        parts=parts,
        freeze=freeze,
        # under fp16 the guard reads the GradScaler's scale (on the device) to tell calibration from collapse
        guard=NonFiniteGuard(
            accelerator.device, cfg.train.max_nonfinite_steps, on_device=on_device, scaler=accelerator.scaler
        ),
        steps_per_epoch=steps_per_epoch,
        report=StartReport(data.splits, report, loader_plan, data.decode_note, groups),
        inputs=inputs,
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
        f"data: {len(run.train_set)} train images, {len(run.report.splits.val)} validation ({run.report.splits.val_source}), "
        f"{count} classes{classes_from}; global batch {cfg.train.batch_size} = {n} processes x {k} "
        f"accumulation x {cfg.train.batch_size // (n * k)} per micro-batch",
        *run.report.splits.notes,
    ]
    loaded = run.report.load_report.describe()
    if loaded:
        lines.append(loaded)
    lines.append(f"{run.report.loader_plan.describe()}; images {run.report.decode_note}, normalized on {a.device.type}")
    lines.append(augmentation_line(cfg))
    lines.append(loss_line(run))
    lines.append(describe_groups(run.report.groups))
    lines.append(run.freeze.plan.describe())
    lines.append(run.schedule.describe())
    if run.ema is not None:
        warmup = ", warmup min(decay, (1 + t) / (10 + t))" if cfg.train.ema_warmup else ""
        lines.append(f"EMA of the weights: decay {cfg.train.ema_decay}{warmup}; evaluated as val_ema/...")
    return lines


def augmentation_line(cfg: Config) -> str:
    """What the training images go through, and in which order the samples come."""
    d, parts = cfg.data, []
    if d.augment:
        parts.append(f"crop scale {d.crop_scale} ratio [{d.crop_ratio[0]:.3g}, {d.crop_ratio[1]:.3g}]")
        parts += ["horizontal flip"] if d.hflip else []
        parts += [f"policy {d.policy}"] if d.policy != "none" else []
        parts += [f"colour jitter {d.color_jitter}"] if d.color_jitter else []
        parts += [f"random erasing p={d.random_erasing}"] if d.random_erasing else []
    if d.mixup_alpha or d.cutmix_alpha:
        kinds = [f"{n} alpha {a}" for n, a in (("Mixup", d.mixup_alpha), ("CutMix", d.cutmix_alpha)) if a]
        parts.append(f"{' / '.join(kinds)} with partners from the global batch (p={d.mix_prob})")
    what = ", ".join(parts) or "none (evaluation view)"
    order = "class-balanced draws with replacement" if d.sampler == "balanced" else "a seeded permutation per epoch"
    return f"augmentation: {what}; sampling: {order}"


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
