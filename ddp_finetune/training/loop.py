"""The training loop: `fit` -> `train_one_epoch` -> one optimizer step at a time.

    summary = fit(load_config("my_run.yaml"))

An epoch is a short loop over named steps: take the step's `grad_accum` micro-batches,
`optimizer_step` (forward, backward, clip, update), `count_step` (schedule), and on check steps
only — every `train.check_every_n_steps`, log, checkpoint and epoch-end step — the device-side
checks, `log_train` and `checkpoint_or_stop`. Other steps never wait for the device. Same config, same training at every world size: the global batch is split
across ranks, the data order and augmentation do not depend on the rank, losses and metrics are
global, and the schedule advances once per real optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddp_finetune import distributed as dist_utils
from ddp_finetune.config import Config, dump_config
from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_write_text
from ddp_finetune.losses import check_targets, needs_statistics_pass
from ddp_finetune.models import split_outputs
from ddp_finetune.models.folder import model_files
from ddp_finetune.training import checkpoint as ckpt
from ddp_finetune.training import performance
from ddp_finetune.training.guards import all_finite
from ddp_finetune.training.output_dir import claim_output_dir
from ddp_finetune.training.param_groups import lr_log
from ddp_finetune.training.preemption import EXIT_PREEMPTED, PREEMPTED_FILE, StopWatcher
from ddp_finetune.training.resume_check import CLASS_NAMES_KEY, check_classes
from ddp_finetune.training.run import Inputs, Run, build_run, start_lines
from ddp_finetune.training.selection import Selection
from ddp_finetune.training.tracking import MetricsLog, init_trackers
from ddp_finetune.training.validation import evaluate


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint as trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    val: dict = field(default_factory=dict)  # the last validation metrics
    val_ema: dict = field(default_factory=dict)  # the last validation metrics of the EMA weights
    last_eval_step: int | None = None  # the step of the last evaluation (not evaluated twice at one step)
    selection: Selection = field(default_factory=Selection)  # train.monitor: the best so far, early stopping

    def __post_init__(self):
        if isinstance(self.selection, dict):  # read back from trainer_state.json
            self.selection = Selection(**self.selection)


@dataclass
class Window:
    """Training loss (sum, count) since the last log line, kept on the device: no host sync per step."""

    sums: torch.Tensor
    images: int = 0
    start: float = field(default_factory=time.perf_counter)
    micro_losses: list = field(default_factory=list)  # log.trace: the last step's micro-batch losses
    grad_norm: torch.Tensor | None = None  # log.trace: the last step's global gradient norm

    @classmethod
    def on(cls, device) -> Window:
        return cls(torch.zeros(2, dtype=torch.float64, device=device))

    def reset(self) -> None:
        self.sums.zero_()
        self.images, self.start = 0, time.perf_counter()


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with EXIT_PREEMPTED."""


# --------------------------------------------------------------------------- one optimizer step


def forward_loss(run: Run, x, y, stats: list[torch.Tensor] | None = None, micro_batches: int = 1) -> torch.Tensor:
    """The training loss of one micro-batch, auxiliary heads (GoogLeNet, Inception, DeepLabV3, FCN) included.

    With `stats` (one tensor per output, from `statistics_pass`) each output's loss is the loss
    module's surrogate: the value of the whole step's loss, the gradient of its share."""
    outputs = split_outputs(run.model(x))
    outputs = [outputs[0], *outputs[1]]
    if stats is None:
        losses = [run.loss_fn(out, y) for out in outputs]
    else:
        losses = [run.loss_fn.surrogate(out, y, s, micro_batches) for out, s in zip(outputs, stats)]
    loss = losses[0]
    for extra in losses[1:]:
        loss = loss + run.parts.aux_weight * extra
    return loss


def statistics_pass(run: Run, micro_batches: list) -> list[torch.Tensor] | None:
    """Exact accumulation (`loss.accumulation: exact`): the step's global loss statistics, before
    any gradient, or None when the loss does not need them (see losses.Loss.needs_statistics_pass).

    A forward of every micro-batch without autograd, the statistics summed, then one all-reduce.
    It sees what the gradient pass will see — the same dropout / stochastic-depth masks (the RNG
    is forked and restored, so the gradient pass replays the same draws) and the same BatchNorm
    batch statistics — and changes no state: BatchNorm running statistics are put back, the data
    were already read."""
    if len(micro_batches) == 1 or not needs_statistics_pass(run.loss_fn):
        return None
    device = run.accelerator.device
    saved = [(b, [t.clone() for t in _bn_buffers(b)]) for b in run.model.modules() if _tracks_stats(b)]
    devices = [device.index or 0] if device.type == "cuda" else []
    totals: list[torch.Tensor] | None = None
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for x, y in micro_batches:
            logits, aux = split_outputs(run.model(x))
            stats = [run.loss_fn.statistics(out, y) for out in (logits, *aux)]
            totals = stats if totals is None else [t + s for t, s in zip(totals, stats)]
        for module, buffers in saved:
            for live, kept in zip(_bn_buffers(module), buffers):
                live.copy_(kept)
    return [run.loss_fn.reduce_statistics(t) for t in totals]


def _tracks_stats(module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats


def _bn_buffers(module) -> list[torch.Tensor]:
    return [module.running_mean, module.running_var, module.num_batches_tracked]


def optimizer_step(run: Run, micro_batches: list, epoch: int, window: Window) -> None:
    """Forward and backward over the step's micro-batches, then clip and update the weights.

    Gradients are summed over the micro-batches (each loss divided by their number, so the step
    follows the mean loss of the global batch); DDP all-reduces them once, on the last backward.
    A region loss under exact accumulation first gets the step's global statistics
    (`statistics_pass`). A step whose gradients are not finite is skipped on the device (`run.guard`).
    """
    a, k = run.accelerator, len(micro_batches)
    # uint8 batches (or JPEG files) -> the model's input, normalized on the device; once per step
    micro_batches = [(run.prepare_input(x), y) for x, y in micro_batches]
    stats = statistics_pass(run, micro_batches)
    step_loss = torch.zeros((), dtype=torch.float64, device=a.device)
    trace = run.cfg.log.trace
    window.micro_losses = []
    for i, (x, y) in enumerate(micro_batches):
        # DDP all-reduces the gradients on the last micro-batch's backward only
        with a.no_sync(run.model) if i < k - 1 else contextlib.nullcontext():
            loss = forward_loss(run, x, y, stats, k)
            a.backward(loss / k)
        window.sums[0] += loss.detach().double() * x.shape[0]
        window.sums[1] += x.shape[0]
        step_loss += loss.detach().double() / k
        if trace:
            window.micro_losses.append(loss.detach().double())
    run.freeze.after_backward(epoch)  # blocks frozen until a later epoch: their grads dropped
    grad_norm = None
    if run.cfg.train.max_grad_norm:
        grad_norm = a.clip_grad_norm_(run.model.parameters(), run.cfg.train.max_grad_norm)
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    if trace:  # DDP has averaged the gradients: the norm of the global batch's gradient, on every rank
        window.grad_norm = (
            grad_norm
            if grad_norm is not None
            else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        )
    if run.guard.before_update(run.raw_optimizer, grads, grad_norm, step_loss):
        run.optimizer.step()
    run.guard.after_update(run.raw_optimizer, skipped_by_scaler=a.optimizer_step_was_skipped)
    run.optimizer.zero_grad(set_to_none=True)


def count_step(run: Run, progress: Progress, window: Window) -> dict | None:
    """Count the step and advance the schedule (unless fp16 loss scaling skipped the step).
    Returns the lrs this step used when it is a log step (index s of lr_plot.simulate_lrs)."""
    cfg = run.cfg
    progress.step += 1
    progress.step_in_epoch += 1
    window.images += cfg.train.batch_size
    step_lrs = lr_log(run.raw_optimizer) if progress.step % cfg.log.every_n_steps == 0 else None
    if not run.accelerator.optimizer_step_was_skipped:
        run.schedule.step()
        if run.ema is not None:
            # a step the non-finite guard skipped on the device leaves the average as it is (no host sync)
            run.ema.update(progress.step, found_inf=run.guard.last_found)
    return step_lrs


def is_check_step(run: Run, progress: Progress) -> bool:
    """Steps where the loop may wait for the device: checks, logging, checkpoints, the epoch's end."""
    cfg, s = run.cfg, progress.step
    return (
        s % cfg.train.check_every_n_steps == 0
        or s % cfg.log.every_n_steps == 0
        or bool(cfg.checkpoint.every_n_steps and s % cfg.checkpoint.every_n_steps == 0)
        or progress.step_in_epoch >= run.steps_per_epoch
        or bool(cfg.train.max_steps and s >= cfg.train.max_steps)
        or is_eval_step(run, progress)
    )


def is_eval_step(run: Run, progress: Progress) -> bool:
    """A `train.eval_every_n_steps` evaluation inside an epoch (an epoch's last step is evaluated by
    `_epochs`, after the step's checkpoint as before). At `max_steps` too: before the step's checkpoint,
    as in a run that goes on, so that a run resumed from that checkpoint selects and stops the same."""
    cfg, s = run.cfg, progress.step
    return bool(
        cfg.train.eval_every_n_steps
        and s % cfg.train.eval_every_n_steps == 0
        and progress.step_in_epoch < run.steps_per_epoch
    )


def evaluate_and_select(run: Run, progress: Progress, log: MetricsLog) -> bool:
    """Evaluate the model (and its EMA), log, keep the best model; True when early stopping ends the run.

    The metrics are global, so every rank takes the same decision; the ranks still agree on it
    (`any_rank`), so none can leave the loop alone."""
    cfg = run.cfg
    progress.val = evaluate(run)
    log.log({"step": progress.step, "epoch": progress.epoch, "split": "val", **progress.val})
    if run.ema is not None:
        progress.val_ema = evaluate(run, run.ema.module)
        log.log({"step": progress.step, "epoch": progress.epoch, "split": "val_ema", **progress.val_ema})
    progress.last_eval_step = progress.step
    if not cfg.train.monitor:
        return False
    metrics = {f"val/{k}": v for k, v in progress.val.items()}
    metrics.update({f"val_ema/{k}": v for k, v in progress.val_ema.items()})
    if progress.selection.observe(cfg.train, metrics, progress.step):
        save_best(run, progress)
    stop = dist_utils.any_rank(progress.selection.should_stop(cfg.train), device=run.accelerator.device)
    if stop:
        progress.selection.stopped_early = True
        sel = progress.selection
        dist_utils.print0(
            f"early stopping at step {progress.step}: {cfg.train.monitor} did not improve by more than "
            f"{cfg.train.early_stopping_min_delta} in {sel.bad_evaluations} evaluations "
            f"(best {sel.best_value:.6g} at step {sel.best_step})"
        )
    return stop


def _selected_weights(run: Run, ema: bool) -> torch.nn.Module:
    return run.ema.module if ema else run.model


def save_best(run: Run, progress: Progress) -> Path:
    """best/: the monitored metric's weights (the EMA's for a val_ema/ metric), atomically, with a manifest."""
    cfg = run.cfg
    ema = cfg.train.monitor.startswith("val_ema/")
    selected = progress.selection.describe(cfg.train)
    files = _model_files(run, averaged=ema, selected=selected)
    return ckpt.save_final_weights(
        run.accelerator, _selected_weights(run, ema), cfg.output_dir, files, name=ckpt.BEST, manifest=True
    )


def log_train(run: Run, progress: Progress, log: MetricsLog, window: Window, step_lrs: dict, health: dict, bar):
    """One train record: the global mean loss since the last one (sums and counts over ranks), lrs, speed."""
    total = dist_utils.sum_across_ranks(window.sums)
    elapsed = time.perf_counter() - window.start
    record = {"step": progress.step, "epoch": progress.epoch, "split": "train", "loss": (total[0] / total[1]).item()}
    record.update(step_lrs)
    record["images_per_second"] = window.images / max(elapsed, 1e-9)
    if run.accelerator.optimizer_step_was_skipped:
        record["skipped_step"] = True
    if health.get("nonfinite_steps"):
        record["nonfinite_steps"] = health["nonfinite_steps"]
    if health.get("scaler_skipped_steps"):  # fp16 loss-scale calibration: expected, counted apart
        record["scaler_skipped_steps"] = health["scaler_skipped_steps"]
    if run.cfg.log.trace:
        record.update(_trace(window))
    log.log(record)
    if bar is not None:
        lr = next(iter(step_lrs.values()))
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_second']:.0f}")
    window.reset()


def _trace(window: Window) -> dict:
    """`log.trace`: the last step's gradient norm and micro-batch losses, every rank's, in the order of
    the global batch (micro-batch j of rank r is the (j * ranks + r)-th slice of the step)."""
    per_rank = dist_utils.gather_objects([v.item() for v in window.micro_losses])
    ordered = [losses[j] for j in range(len(per_rank[0])) for losses in per_rank]
    norm = window.grad_norm.item() if window.grad_norm is not None else None
    return {"grad_norm": norm, "micro_losses": ordered}


def checkpoint_or_stop(run: Run, progress: Progress, watcher: StopWatcher) -> None:
    """Save on `checkpoint.every_n_steps`; on a stop request save, write preempted.json and raise Preempted.

    Called on check steps only: the ranks agree on a stop every `train.check_every_n_steps` steps."""
    a, cfg = run.accelerator, run.cfg
    if cfg.checkpoint.every_n_steps and progress.step % cfg.checkpoint.every_n_steps == 0:
        save(run, progress)
    if not dist_utils.any_rank(watcher.requested(), device=a.device):
        return
    save(run, progress)
    if a.is_main_process:
        record = {"step": progress.step, "epoch": progress.epoch}
        atomic_write_text(Path(cfg.output_dir) / PREEMPTED_FILE, json.dumps(record) + "\n")
        watcher.clear()  # honoured: the resumed run must not stop at once
    # no rank exits before preempted.json exists: under `srun --kill-on-bad-exit` the
    # first rank to exit ends the others, and the SLURM templates requeue only on that file
    a.wait_for_everyone()
    dist_utils.print0(
        f"ddp-finetune: stop requested ({watcher.reason or 'by another rank'}); "
        f"saved checkpoint at step {progress.step}, exiting with {EXIT_PREEMPTED}"
    )
    raise Preempted()


# --------------------------------------------------------------------------- epochs


def grouped(loader, k: int):
    """The loader's micro-batches in lists of `k`: one list per optimizer step."""
    step = []
    for batch in loader:
        step.append(batch)
        if len(step) == k:
            yield step
            step = []


def start_epoch(run: Run, progress: Progress):
    """Train mode, BatchNorm freezing, and the epoch on everything that seeds the data; the loader from
    where the epoch stands (a resumed run skips exactly the batches already consumed)."""
    cfg, epoch = run.cfg, progress.epoch
    # model.train(); a frozen backbone is frozen entirely: its BatchNorm statistics stay fixed too
    run.freeze.start_epoch(run.model, epoch)
    # same epoch on the sampler, the dataset's augmentation seed and Accelerate's loader
    run.sampler.set_epoch(epoch)
    run.train_set.epoch = epoch
    run.train_loader.set_epoch(epoch)
    if progress.step_in_epoch:
        return run.accelerator.skip_first_batches(run.train_loader, progress.step_in_epoch * cfg.train.grad_accum)
    return run.train_loader


def train_one_epoch(run: Run, progress: Progress, log: MetricsLog, watcher: StopWatcher, bar) -> bool:
    """One epoch from `progress.step_in_epoch`. Returns False when the run must stop early (max_steps)."""
    cfg = run.cfg
    loader = start_epoch(run, progress)
    window = Window.on(run.accelerator.device)
    for micro_batches in grouped(loader, cfg.train.grad_accum):
        optimizer_step(run, micro_batches, progress.epoch, window)
        step_lrs = count_step(run, progress, window)
        stop_early = False
        if is_check_step(run, progress):
            health = run.guard.check(progress.step)
            check_targets(run.loss_fn)  # bad labels seen since the last check: UserError on every rank
            if step_lrs is not None:
                log_train(run, progress, log, window, step_lrs, health, bar)
            if is_eval_step(run, progress):
                stop_early = evaluate_and_select(run, progress, log)
                run.freeze.start_epoch(run.model, progress.epoch)  # back to train mode (BatchNorm frozen as before)
            # after the evaluation: a checkpoint of this step holds its selection state
            checkpoint_or_stop(run, progress, watcher)
        if bar is not None:
            bar.update(1)
        if stop_early or (cfg.train.max_steps and progress.step >= cfg.train.max_steps):
            return False
    return True


def save(run: Run, progress: Progress) -> Path:
    """A resumable checkpoint of the run at `progress`; never one with NaN or inf weights."""
    cfg = run.cfg
    if not all_finite(run.model):
        newest = ckpt.latest_checkpoint(cfg.output_dir)
        kept = f"the newest good checkpoint is {newest}" if newest else "no checkpoint was written"
        raise UserError(
            f"the weights or BatchNorm statistics hold NaN or inf at step {progress.step}; not saving them ({kept}): "
            "lower optim.lr, set train.max_grad_norm, or check the data and the loss"
        )
    # the class names go with the position: a resume checks them by name (resume_check.check_classes)
    state = {**dataclasses.asdict(progress), CLASS_NAMES_KEY: list(run.classes.names)}
    return ckpt.save_checkpoint(
        run.accelerator, cfg.output_dir, progress.step, state, dump_config(cfg), cfg.checkpoint.keep_last
    )


# --------------------------------------------------------------------------- the run


def _refuse_mixing_runs(cfg: Config, resume_from: Path | None) -> None:
    earlier = ckpt.latest_checkpoint(cfg.output_dir)
    if resume_from is None and earlier is not None:
        # starting over would mix two runs' checkpoints, and keep_last would prune the new ones
        raise UserError(
            f"output_dir={cfg.output_dir!r} already holds checkpoints of an earlier run (newest {earlier.name}); "
            "continue it with checkpoint.resume=auto, or use a new output_dir"
        )


def _refuse_replacing_finished(cfg: Config, resume_from: Path | None) -> None:
    """A fresh run (no checkpoint to resume, `auto` included) into an output_dir holding a finished run would
    replace that run's final/ and metrics.jsonl: the user's result. Refused unless checkpoint.overwrite_finished."""
    if resume_from is not None or cfg.checkpoint.overwrite_finished:
        return
    out = Path(cfg.output_dir)
    found = [p for p in (out / "final" / "model.safetensors", out / "summary.json") if p.is_file()]
    if (out / "final" / "model.safetensors.index.json").is_file():
        found.append(out / "final")
    if found:
        raise UserError(
            f"output_dir={cfg.output_dir!r} holds a finished run ({', '.join(str(p.relative_to(out)) for p in found)}); "
            "a new run would replace its final/ and metrics.jsonl: choose a new output_dir, or set "
            "checkpoint.overwrite_finished=true to replace it"
        )


def _write_run_config(run: Run) -> None:
    """output_dir/config.yaml, once the run goes ahead (a refused resume leaves the run's own as it was)."""
    if run.accelerator.is_main_process:
        atomic_write_text(Path(run.cfg.output_dir) / "config.yaml", dump_config(run.cfg))
    run.accelerator.wait_for_everyone()


def _epochs(run: Run, progress: Progress, log: MetricsLog, watcher: StopWatcher, bar) -> float:
    """Train and evaluate epoch after epoch; returns the seconds spent training."""
    cfg, train_time, keep_going = run.cfg, 0.0, not progress.selection.stopped_early
    while progress.epoch < cfg.train.epochs and keep_going:
        start = time.perf_counter()
        keep_going = train_one_epoch(run, progress, log, watcher, bar)
        train_time += time.perf_counter() - start
        epoch_done = progress.step_in_epoch >= run.steps_per_epoch
        if progress.last_eval_step != progress.step:  # not when early stopping just evaluated this step
            keep_going = not evaluate_and_select(run, progress, log) and keep_going
        if progress.selection.stopped_early:
            break
        if epoch_done:
            run.schedule.epoch_end(progress.epoch, {f"val/{k}": v for k, v in progress.val.items()})
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            if cfg.checkpoint.every_epoch and (keep_going and progress.epoch < cfg.train.epochs):
                save(run, progress)
    return train_time


def fit(
    cfg: Config,
    *,
    train_data=None,
    val_data=None,
    class_names=None,
    model: torch.nn.Module | None = None,
    head=(),
    loss=None,
) -> dict:
    """Train (or resume) per the config; returns the summary also written to summary.json.

    What the CLI's `ddp-finetune train` calls, and what a notebook or a script calls (one process,
    or each rank under `accelerate launch`). The config is validated as one read from YAML is.
    The keyword arguments replace what the config names with your own objects (`run.Inputs`):
    `train_data` / `val_data` (Hugging Face `datasets.Dataset`s, or torch datasets of (uint8
    image, target) with `class_names`), `model` with its `head` prefixes, `loss`.

    Everything `fit` starts ends with it, on every way out (done, error, `Preempted`): the process
    group it created is destroyed and Accelerate's process-wide state reset, so a second `fit` in
    the same Python process starts clean.
    """
    inputs = Inputs(train_data, val_data, class_names, model, head, loss)
    cfg.validate(data_given=inputs.train_data is not None)
    with dist_utils.session():
        with claim_output_dir(cfg.output_dir):  # checked, locked for the run's life, leftovers removed
            return _fit(cfg, inputs)


def _fit(cfg: Config, inputs: Inputs) -> dict:
    t0 = time.perf_counter()
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.output_dir)
    _refuse_mixing_runs(cfg, resume_from)
    _refuse_replacing_finished(cfg, resume_from)
    run = build_run(cfg, inputs)
    progress = Progress()
    if resume_from is None and run.accelerator.is_main_process:
        shutil.rmtree(Path(cfg.output_dir) / ckpt.BEST, ignore_errors=True)  # an earlier run's best model
    if resume_from is not None:
        check_classes(resume_from, run.classes.names, cfg.data.path)  # by name: before the weights' shapes
        # a checkpoint taken on an epoch's last step resumes into that epoch with nothing left to
        # train: it still runs the epoch's evaluation and epoch-end schedule step
        state = ckpt.load_checkpoint(run.accelerator, resume_from, dump_config(cfg))
        state.pop(CLASS_NAMES_KEY, None)
        progress = Progress(**state)
    _write_run_config(run)
    for line in start_lines(run):
        dist_utils.print0(line)
    if resume_from is not None:
        where = f"at step {progress.step} (epoch {progress.epoch}, step {progress.step_in_epoch} in it)"
        dist_utils.print0(f"resumed from {resume_from} {where}")
    init_trackers(run.accelerator, cfg)
    log = MetricsLog(run.accelerator, cfg.output_dir, resume_step=progress.step if resume_from is not None else None)
    watcher = StopWatcher(cfg.output_dir)
    watcher.install()
    bar = _progress_bar(run, progress)
    steps_before = progress.step
    try:
        with performance.deterministic_refusals():  # train.deterministic: an op with no deterministic kernel
            train_time = _epochs(run, progress, log, watcher, bar)
    finally:
        watcher.uninstall()
        if bar is not None:
            bar.close()
    weights = _save_final(run, progress)
    images = (progress.step - steps_before) * cfg.train.batch_size
    speed = images / train_time if train_time > 0 else None
    summary = _summary(run, progress, weights, resume_from, time.perf_counter() - t0, speed)
    if run.accelerator.is_main_process:
        atomic_write_text(Path(cfg.output_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        (Path(cfg.output_dir) / PREEMPTED_FILE).unlink(missing_ok=True)
        watcher.clear()
        vals = ", ".join(f"{k} {v:.4f}" for k, v in progress.val.items() if isinstance(v, float))
        print(f"done: {progress.step} steps, validation {vals}; weights {weights}", flush=True)
    run.accelerator.end_training()
    return summary


def _progress_bar(run: Run, progress: Progress):
    """tqdm on the main process when `log.progress_bar`, else None."""
    cfg = run.cfg
    if not (cfg.log.progress_bar and run.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    total_steps = run.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    return tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True)


def _save_final(run: Run, progress: Progress) -> Path:
    """final/: the weights and the model card; never NaN or inf weights."""
    if not all_finite(run.model):
        raise UserError(
            f"the final weights hold NaN or inf (step {progress.step}); final/ was not written: lower optim.lr, "
            "set train.max_grad_norm, or check the data and the loss"
        )
    cfg = run.cfg
    if cfg.train.monitor:  # the best model, kept as the run went
        return ckpt.promote_best(run.accelerator, cfg.output_dir, progress.selection.best_step)
    ema = cfg.train.final_weights == "ema"
    if ema and not all_finite(run.ema.module):
        raise UserError(f"the EMA weights hold NaN or inf (step {progress.step}); final/ was not written")
    files = _model_files(run, averaged=ema)
    return ckpt.save_final_weights(run.accelerator, _selected_weights(run, ema), cfg.output_dir, files)


def _model_files(run: Run, **card) -> dict[str, str]:
    """What goes beside the weights in final/ or best/: model.json and config.yaml; for a model given to
    fit, config.yaml only (nothing could rebuild that model from a card)."""
    if run.inputs.model is not None:
        return {"config.yaml": dump_config(run.cfg)}
    return model_files(run.cfg, run.classes, run.parts, **card)


def _summary(
    run: Run, progress: Progress, weights: Path, resume_from: Path | None, wall_time: float, speed: float | None
) -> dict:
    a, cfg = run.accelerator, run.cfg
    return {
        "world_size": a.num_processes,
        "global_batch_size": cfg.train.batch_size,
        "per_device_batch_size": cfg.train.batch_size // (a.num_processes * cfg.train.grad_accum),
        "grad_accum": cfg.train.grad_accum,
        "steps": progress.step,
        "epochs": progress.epoch,
        "val": progress.val,
        "val_ema": progress.val_ema or None,
        "selected": progress.selection.describe(cfg.train) if cfg.train.monitor else None,
        "stopped_early": progress.selection.stopped_early,
        "wall_time_s": wall_time,
        "images_per_second": speed,
        "final_weights": str(weights),
        "resumed_from": str(resume_from) if resume_from else None,
        "mixed_precision": cfg.train.mixed_precision,
    }
