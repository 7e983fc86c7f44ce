"""See a run's learning rates before training: simulate the schedule, draw every group's lr.

    series = simulate_lrs(cfg, steps_per_epoch)     # {"lr/head": [...], "lr/backbone": [...]}
    plot_schedule(cfg, steps_per_epoch, "lr.png")   # the same, drawn, unfreeze point marked
    ddp-finetune lr-plot my_run.yaml --out lr.png     # lr_plot_command

The simulation uses the real parameter groups (names, base lrs, layer decay) of the configured
model, built by `models.build_model(..., meta=True)`: the architecture and `Parts` training
gets, with its parameters on the `meta` device (no memory, no weights loaded, well under a
second even for ViT-H). Then it runs the real `Schedule` on an optimizer that holds one tiny
stand-in tensor per group.
ReduceLROnPlateau needs validation metrics, which only training gives: it stays flat here.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .errors import UserError
from .models import build_model
from .out_paths import PICTURES, file_out
from .param_groups import build_param_groups, lr_log, make_optimizer
from .plot import save_figure
from .schedules import build_schedule


def _meta_groups(cfg) -> list[dict]:
    """The configured model's parameter groups, its parameters on the meta device."""
    model, parts, _ = build_model(
        cfg.model, cfg.model.num_classes or 2, cfg.task, image_size=cfg.data.image_size, meta=True
    )
    return build_param_groups(model, parts, cfg.optim)


def _simulate(cfg, steps_per_epoch: int):
    groups = _meta_groups(cfg)
    # Same groups and hyperparameters, one 1-element tensor each: the schedule only sees groups.
    stand_in = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [torch.zeros(1, requires_grad=True)]}
        for g in groups
    ]
    optimizer = make_optimizer(stand_in, cfg.optim)
    schedule = build_schedule(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs)
    description = schedule.describe()
    series: dict[str, list[float]] = defaultdict(list)
    for s in range(schedule.total_steps):
        for key, lr in lr_log(optimizer, per_block=True).items():
            series[key].append(lr)
        optimizer.step()  # no gradients, so a no-op; keeps torch's "step the optimizer first" check quiet
        schedule.step()
        if (s + 1) % steps_per_epoch == 0:
            schedule.epoch_end(s // steps_per_epoch, None)
    if any(key.startswith("lr/backbone.") for key in series):
        series.pop("lr/backbone", None)
    return dict(series), description


def simulate_lrs(cfg, steps_per_epoch: int) -> dict[str, list[float]]:
    """The lr of each logical group at every optimizer step of the run (index s: the lr step s uses).

    Keys are those of `param_groups.lr_log(optimizer, per_block=True)`: `lr/head`,
    `lr/backbone`, and with layer decay `lr/backbone.<block>` for every block instead of
    `lr/backbone` (which would repeat the block nearest the head). Epoch ends are simulated
    without validation metrics.
    """
    return _simulate(cfg, steps_per_epoch)[0]


def plot_lrs(
    series: dict[str, list[float]], out_path, unfreeze_step: int | None = None, title: str = "learning rate per group"
):
    """Draw each series against the optimizer step into a PNG; returns its path.

    `unfreeze_step`: the optimizer step from which the backbone trains; the frozen span before
    it is shaded.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    except ImportError:
        raise UserError("the lr plot needs matplotlib; install it with pip install 'ddp-finetune[plot]'") from None

    out = file_out(out_path, "--out", default_name="lr.png", suffixes=PICTURES)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    for key, values in series.items():
        ax.plot(range(len(values)), values, label=key.removeprefix("lr/"), linewidth=1.2)
    if unfreeze_step is not None:
        ax.axvspan(0, unfreeze_step, color="0.85", alpha=0.5, label="backbone frozen")
        ax.axvline(
            unfreeze_step, color="0.3", linestyle="--", linewidth=1, label=f"backbone unfreezes (step {unfreeze_step})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=2 if len(series) > 8 else 1)
    return save_figure(fig, out, dpi=100)


def plot_schedule(cfg, steps_per_epoch: int, out_path):
    """`simulate_lrs` + `plot_lrs` with the unfreeze point and a title from the config.

    Returns (path of the PNG, the schedule's description).
    """
    series, description = _simulate(cfg, steps_per_epoch)
    unfreeze = cfg.model.unfreeze_at_epoch
    unfreeze_step = unfreeze * steps_per_epoch if cfg.model.freeze_backbone and unfreeze is not None else None
    title = (
        f"{cfg.model.name}, {cfg.optim.name}, schedule {cfg.schedule.name}: "
        f"{steps_per_epoch} optimizer steps/epoch x {cfg.train.epochs} epochs"
    )
    if cfg.schedule.name.lower() == "reducelronplateau":
        title += "\nReduceLROnPlateau drawn flat: it reacts to validation metrics, which only training gives"
    if cfg.model.freeze_backbone and unfreeze is None:
        title += "\nbackbone frozen for the whole run (only the head trains)"
    return plot_lrs(series, out_path, unfreeze_step=unfreeze_step, title=title), description


def lr_plot_command(config_path, overrides, out_path, steps_per_epoch: int | None = None):
    """`ddp-finetune lr-plot CONFIG [overrides] --out lr.png [--steps-per-epoch N]`.

    Without `steps_per_epoch`, it is the training split's size // `train.batch_size` (as in
    training), which loads the dataset.
    """
    from .config import load_config

    cfg = load_config(config_path, overrides)
    out_path = file_out(out_path, "--out", default_name="lr.png", suffixes=PICTURES)  # before loading the dataset
    if steps_per_epoch is None:
        from .data import load_splits

        steps_per_epoch = len(load_splits(cfg.data, cfg.seed, cfg.task).train) // cfg.train.batch_size
    path, description = plot_schedule(cfg, steps_per_epoch, out_path)
    print(description)
    print(f"wrote {path}")
    return path
