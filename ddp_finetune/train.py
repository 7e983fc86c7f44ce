"""The training loop: `fit` → `train_one_epoch` / `evaluate`, with one resumable state.

    summary = fit(load_config("configs/digits_source.yaml"))

Same config, same training at every world size: the global batch is split across ranks, the
data order and augmentation do not depend on the rank, losses and metrics are global, and the
schedule advances once per real optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import Config, dump_config
from .data import build_datasets, build_loaders, infer_num_classes, load_splits, normalization
from .errors import UserError
from .losses import build_loss
from .metrics import classification_metrics, segmentation_metrics, segmentation_sample_stats
from .models import build_model, check_model_name, head_prefixes, split_outputs
from .param_groups import (
    apply_static_freeze,
    backbone_frozen,
    backbone_params,
    build_param_groups,
    clear_grads,
    describe_groups,
    lr_log,
    make_optimizer,
    set_bn_eval,
    uses_static_freeze,
)
from .preemption import EXIT_PREEMPTED, PREEMPTED_FILE, StopWatcher
from .schedules import build_schedule
from .tracking import MetricsLog, init_trackers, log_with

AUX_LOSS_WEIGHT = 0.3  # GoogLeNet / Inception auxiliary heads, as in the GoogLeNet paper
SEGMENTATION_AUX_LOSS_WEIGHT = 0.5  # DeepLabV3 / FCN aux_classifier, as torchvision's segmentation reference


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint as trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    val: dict = field(default_factory=dict)  # the last validation metrics


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with EXIT_PREEMPTED."""


def setup(cfg: Config):
    """Everything `fit` needs, built in the order data → model → optimizer → schedule → prepare."""
    from accelerate.utils import set_seed

    accelerator = dist_utils.make_accelerator(
        cfg.train.mixed_precision, cfg.train.grad_accum, log_with=log_with(cfg), project_dir=cfg.output_dir
    )
    n = accelerator.num_processes
    if cfg.train.batch_size % (n * cfg.train.grad_accum):
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not divide by {n} processes x train.grad_accum={cfg.train.grad_accum}; "
            f"use a multiple of {n * cfg.train.grad_accum}"
        )
    eval_batch = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_batch % n:
        raise UserError(f"train.eval_batch_size={eval_batch} does not divide by {n} processes; use a multiple of {n}")
    check_model_name(cfg.model.name, cfg.task)  # before loading any data
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    accelerator.wait_for_everyone()

    # the first rank of each node fills the node's caches (datasets, $TORCH_HOME), the others read
    with accelerator.local_main_process_first():
        splits = load_splits(cfg.data, cfg.seed, cfg.task)
    num_classes, classes_from = infer_num_classes(cfg, splits)
    with accelerator.local_main_process_first():
        set_seed(cfg.seed)  # identical initial weights on every rank
        model, report = build_model(cfg.model, num_classes, cfg.task)
    train_ds, val_ds, num_classes = build_datasets(cfg, splits, normalization(report), num_classes)
    train_dl, val_dl, sampler = build_loaders(cfg, train_ds, val_ds)

    heads = head_prefixes(model)
    # frozen for the whole run: requires_grad=False before DDP wraps the model (saves compute);
    # frozen until an epoch: grads are dropped each step instead, so DDP registers every param
    dynamic_freeze = cfg.model.freeze_backbone and not uses_static_freeze(cfg.model)
    if uses_static_freeze(cfg.model):
        apply_static_freeze(model, heads)
    groups = build_param_groups(model, heads, cfg.optim)
    optimizer = make_optimizer(groups, cfg.optim)
    steps_per_epoch = len(train_ds) // cfg.train.batch_size
    schedule = build_schedule(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs)
    loss_fn = build_loss(cfg.loss, cfg.task, num_classes)
    eval_loss_fn = build_loss(dataclasses.replace(cfg.loss, sync=False), cfg.task, num_classes)

    model, prepared_opt, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    accelerator.register_for_checkpointing(schedule)
    # listed once, from the prepared model: the loop drops their grads every step while frozen
    frozen_params = backbone_params(model, heads) if dynamic_freeze else []
    return dict(
        accelerator=accelerator,
        cfg=cfg,
        model=model,
        optimizer=prepared_opt,
        raw_optimizer=optimizer,
        schedule=schedule,
        train_dl=train_dl,
        val_dl=val_dl,
        sampler=sampler,
        train_ds=train_ds,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        frozen_params=frozen_params,
        dynamic_freeze=dynamic_freeze,
        steps_per_epoch=steps_per_epoch,
        num_classes=num_classes,
        splits=splits,
        report=report,
        groups=groups,
        classes_from=classes_from,
        heads=heads,
    )


def print_start(ctx) -> None:
    a, cfg = ctx["accelerator"], ctx["cfg"]
    layout = dist_utils.layout()
    n, k = a.num_processes, cfg.train.grad_accum
    classes_from = f" (from {ctx['classes_from']})" if ctx.get("classes_from") else ""
    dist_utils.print0(
        f"ddp-finetune: world size {n} (node rank {layout['node_rank']} of {layout['num_nodes']}, "
        f"main address {layout['main_address']}), device {a.device}, mixed precision {cfg.train.mixed_precision}"
    )
    dist_utils.print0(
        f"data: {len(ctx['train_ds'])} train images, {len(ctx['splits'].val)} validation ({ctx['splits'].val_source}), "
        f"{ctx['num_classes']} classes{classes_from}; global batch {cfg.train.batch_size} = {n} processes x {k} accumulation x "
        f"{cfg.train.batch_size // (n * k)} per micro-batch"
    )
    r = ctx["report"]
    if r.get("weights"):
        msg = f"weights: {r['weights']}; new head {', '.join(r['heads'])}"
        if r["missing_keys"]:
            msg += f"; missing {len(r['missing_keys'])} keys (e.g. {r['missing_keys'][0]})"
        if r["unexpected_keys"]:
            msg += f"; unexpected {len(r['unexpected_keys'])} keys (e.g. {r['unexpected_keys'][0]})"
        if r["skipped_head_keys"]:
            msg += f"; head keys not loaded: {', '.join(r['skipped_head_keys'])}"
        dist_utils.print0(msg)
    dist_utils.print0(describe_groups(ctx["groups"]))
    dist_utils.print0(ctx["schedule"].describe())


def _forward_loss(model, loss_fn, x, y, aux_weight=AUX_LOSS_WEIGHT):
    logits, aux = split_outputs(model(x))
    loss = loss_fn(logits, y)
    for a in aux:
        loss = loss + aux_weight * loss_fn(a, y)
    return loss


def _evaluate_segmentation(ctx) -> dict:
    """Pixel metrics of the whole validation split without gathering logits: each rank turns every
    sample into a confusion matrix and a cross-entropy (sum, count), `gather_for_metrics` gathers
    those rows (padding duplicates dropped) and the sums give the single-process numbers.
    `loss` is the mean pixel cross-entropy over the split's non-ignored pixels, whatever the training loss."""
    a, model, cfg = ctx["accelerator"], ctx["model"], ctx["cfg"]
    ignore = cfg.loss.ignore_index
    confusion = ce = bad = None
    count = 0
    with torch.no_grad():
        for x, y in ctx["val_dl"]:
            logits, _ = split_outputs(model(x))
            conf_b, ce_b, bad_b = a.gather_for_metrics(segmentation_sample_stats(logits, y, ignore))
            sums = (conf_b.sum(0), ce_b.sum(0), bad_b.sum())
            confusion, ce, bad = sums if confusion is None else (confusion + sums[0], ce + sums[1], bad + sums[2])
            count += conf_b.shape[0]
    if confusion is None:
        return {}
    if bad.item():  # every rank holds the same gathered count, so every rank raises
        raise UserError(
            f"{bad.item()} validation mask pixels are outside the model's {ctx['num_classes']} classes and not "
            f"loss.ignore_index={ignore}; set model.num_classes, data.class_names or loss.ignore_index (255 in VOC-style masks)"
        )
    ce = ce.cpu()
    metrics = {"loss": (ce[0] / ce[1]).item()} if ce[1] > 0 else {}
    metrics.update(segmentation_metrics(confusion.cpu()))
    metrics["count"] = count
    return metrics


def evaluate(ctx) -> dict:
    """Loss and metrics of the whole validation split, identical at every world size."""
    a, model, cfg = ctx["accelerator"], ctx["model"], ctx["cfg"]
    model.eval()
    if cfg.task == "segmentation":
        return _evaluate_segmentation(ctx)
    all_logits, all_targets = [], []
    with torch.no_grad():
        for x, y in ctx["val_dl"]:
            logits, _ = split_outputs(model(x))
            logits, y = a.gather_for_metrics((logits.float().contiguous(), y.contiguous()))
            all_logits.append(logits.cpu())
            all_targets.append(y.cpu())
    if not all_logits:
        return {}
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    metrics = {"loss": ctx["eval_loss_fn"](logits, targets).item()}
    metrics.update(classification_metrics(logits, targets, cfg.task))
    metrics["count"] = int(logits.shape[0])
    return metrics


def train_one_epoch(ctx, prog: Progress, log: MetricsLog, watcher, bar) -> bool:
    """One epoch from `prog.step_in_epoch`. Returns False when the run must stop early (max_steps)."""
    a, cfg, model = ctx["accelerator"], ctx["cfg"], ctx["model"]
    optimizer, schedule = ctx["optimizer"], ctx["schedule"]
    epoch = prog.epoch
    model.train()
    frozen_now = ctx["dynamic_freeze"] and backbone_frozen(epoch, cfg.model)
    # a frozen backbone is frozen entirely: its BatchNorm statistics stay fixed too (the head's train)
    if cfg.model.freeze_bn:
        set_bn_eval(model)
    elif backbone_frozen(epoch, cfg.model):
        set_bn_eval(model, ctx["heads"])

    # same epoch on the sampler, the dataset's augmentation seed and Accelerate's loader
    ctx["sampler"].set_epoch(epoch)
    ctx["train_ds"].epoch = epoch
    loader = ctx["train_dl"]
    loader.set_epoch(epoch)
    if prog.step_in_epoch:
        loader = a.skip_first_batches(loader, prog.step_in_epoch * cfg.train.grad_accum)

    # local (loss sum, sample count) since the last log, kept on the device: no host sync per step
    window = torch.zeros(2, dtype=torch.float64, device=a.device)
    window_images, window_start = 0, time.perf_counter()
    aux_weight = SEGMENTATION_AUX_LOSS_WEIGHT if cfg.task == "segmentation" else AUX_LOSS_WEIGHT
    for x, y in loader:
        with a.accumulate(model):
            loss = _forward_loss(model, ctx["loss_fn"], x, y, aux_weight)
            a.backward(loss)
            if a.sync_gradients:
                if frozen_now:
                    clear_grads(ctx["frozen_params"])
                if cfg.train.max_grad_norm:
                    a.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window[0] += loss.detach().double() * x.shape[0]
        window[1] += x.shape[0]
        if not a.sync_gradients:
            continue

        # ---- one optimizer step done (or skipped by fp16 loss scaling)
        prog.step += 1
        prog.step_in_epoch += 1
        window_images += cfg.train.batch_size
        log_now = prog.step % cfg.log.every_n_steps == 0
        # log the lr this step used (index s of lr_plot.simulate_lrs), not the next step's
        step_lrs = lr_log(ctx["raw_optimizer"]) if log_now else None
        if not a.optimizer_step_was_skipped:
            schedule.step()
        if log_now:
            total = dist_utils.sum_across_ranks(window)  # sums and counts, then divide
            elapsed = time.perf_counter() - window_start
            record = {"step": prog.step, "epoch": epoch, "split": "train", "loss": (total[0] / total[1]).item()}
            record.update(step_lrs)
            record["images_per_second"] = window_images / max(elapsed, 1e-9)
            if a.optimizer_step_was_skipped:
                record["skipped_step"] = True
            log.log(record)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{next(iter(step_lrs.values())):.2e}",
                    img_s=f"{record['images_per_second']:.0f}",
                )
            window.zero_()
            window_images, window_start = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)

        if cfg.checkpoint.every_n_steps and prog.step % cfg.checkpoint.every_n_steps == 0:
            save(ctx, prog)
        if dist_utils.any_rank(watcher.requested(), device=a.device):
            save(ctx, prog)
            if a.is_main_process:
                (Path(cfg.output_dir) / PREEMPTED_FILE).write_text(
                    json.dumps({"step": prog.step, "epoch": epoch}) + "\n"
                )
                watcher.clear()  # honoured: the resumed run must not stop at once
            # no rank exits before preempted.json exists: under `srun --kill-on-bad-exit` the
            # first rank to exit ends the others, and the SLURM templates requeue only on that file
            a.wait_for_everyone()
            dist_utils.print0(
                f"ddp-finetune: stop requested ({watcher.reason or 'by another rank'}); "
                f"saved checkpoint at step {prog.step}, exiting with {EXIT_PREEMPTED}"
            )
            raise Preempted()
        if cfg.train.max_steps and prog.step >= cfg.train.max_steps:
            return False
    return True


def save(ctx, prog: Progress) -> Path:
    cfg = ctx["cfg"]
    return ckpt.save_checkpoint(
        ctx["accelerator"],
        cfg.output_dir,
        prog.step,
        dataclasses.asdict(prog),
        dump_config(cfg),
        cfg.checkpoint.keep_last,
    )


def fit(cfg: Config) -> dict:
    """Train (or resume) per the config; returns the summary also written to summary.json."""
    t0 = time.perf_counter()
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.output_dir)
    earlier = ckpt.latest_checkpoint(cfg.output_dir)
    if resume_from is None and earlier is not None:
        # starting over would mix two runs' checkpoints, and keep_last would prune the new ones
        raise UserError(
            f"output_dir={cfg.output_dir!r} already holds checkpoints of an earlier run (newest {earlier.name}); "
            "continue it with checkpoint.resume=auto, or use a new output_dir"
        )
    ctx = setup(cfg)
    a = ctx["accelerator"]
    prog = Progress()
    if resume_from is not None:
        # a checkpoint taken on an epoch's last step resumes into that epoch with nothing left to
        # train: it still runs the epoch's evaluation and epoch-end schedule step
        prog = Progress(**ckpt.load_checkpoint(a, resume_from))
    print_start(ctx)
    if resume_from is not None:
        dist_utils.print0(
            f"resumed from {resume_from} at step {prog.step} (epoch {prog.epoch}, step {prog.step_in_epoch} in it)"
        )
    init_trackers(a, cfg)
    log = MetricsLog(a, cfg.output_dir, resume_step=prog.step if resume_from is not None else None)
    watcher = StopWatcher(cfg.output_dir)
    watcher.install()
    total_steps = ctx["steps_per_epoch"] * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    bar = None
    if cfg.log.progress_bar and a.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=prog.step, desc="train", dynamic_ncols=True)

    images_before = prog.step * cfg.train.batch_size
    train_time = 0.0
    try:
        keep_going = True
        while prog.epoch < cfg.train.epochs and keep_going:
            start = time.perf_counter()
            keep_going = train_one_epoch(ctx, prog, log, watcher, bar)
            train_time += time.perf_counter() - start
            epoch_done = prog.step_in_epoch >= ctx["steps_per_epoch"]
            prog.val = evaluate(ctx)
            log.log({"step": prog.step, "epoch": prog.epoch, "split": "val", **prog.val})
            if epoch_done:
                ctx["schedule"].epoch_end(prog.epoch, {f"val/{k}": v for k, v in prog.val.items()})
                prog.epoch, prog.step_in_epoch = prog.epoch + 1, 0
                if cfg.checkpoint.every_epoch and (keep_going and prog.epoch < cfg.train.epochs):
                    save(ctx, prog)
    finally:
        watcher.uninstall()
        if bar is not None:
            bar.close()

    weights = ckpt.save_final_weights(a, ctx["model"], cfg.output_dir)
    images = prog.step * cfg.train.batch_size - images_before
    summary = {
        "world_size": a.num_processes,
        "global_batch_size": cfg.train.batch_size,
        "per_device_batch_size": cfg.train.batch_size // (a.num_processes * cfg.train.grad_accum),
        "grad_accum": cfg.train.grad_accum,
        "steps": prog.step,
        "epochs": prog.epoch,
        "val": prog.val,
        "wall_time_s": time.perf_counter() - t0,
        "images_per_second": images / train_time if train_time > 0 else None,
        "final_weights": str(weights),
        "resumed_from": str(resume_from) if resume_from else None,
        "mixed_precision": cfg.train.mixed_precision,
    }
    if a.is_main_process:
        Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (Path(cfg.output_dir) / PREEMPTED_FILE).unlink(missing_ok=True)
        watcher.clear()
        vals = ", ".join(f"{k} {v:.4f}" for k, v in prog.val.items() if isinstance(v, float))
        print(f"done: {prog.step} steps, validation {vals}; weights {weights}", flush=True)
    a.end_training()
    return summary
