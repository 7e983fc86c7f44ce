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

from ddp_finetune.errors import UserError
from ddp_finetune.inference.pictures import save_figure
from ddp_finetune.models import build_model
from ddp_finetune.out_paths import PICTURES, file_out
from ddp_finetune.training.param_groups import NO_DECAY_SUFFIX, build_param_groups, lr_log, make_optimizer
from ddp_finetune.training.schedules import build_schedule


def _meta_model(cfg):
    """The configured model and its `Parts`, its parameters on the meta device."""
    model, parts, _ = build_model(
        cfg.model, cfg.model.num_classes or 2, cfg.task, image_size=cfg.data.image_size, meta=True
    )
    return model, parts


def _simulate(cfg, steps_per_epoch: int, meta=None):
    model, parts = meta or _meta_model(cfg)
    groups = build_param_groups(model, parts, cfg.optim)
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


def drawn_lrs(cfg, steps_per_epoch: int) -> tuple[dict[str, list[float]], list[tuple[int, str]]]:
    """What `lr-plot` draws: `simulate_lrs` with each frozen stretch at 0, and the unfreezes as
    (optimizer step, blocks that start training there).

    A group whose blocks freeze and unfreeze together keeps its one series (`lr/backbone`,
    `lr/backbone.layer1`, `lr/head`); one whose blocks unfreeze at different epochs (gradual
    unfreezing without layer decay) is drawn per block (`lr/layer1`, ...). The optimizer's groups
    keep their lr while frozen (the logged `lr/*` too); the 0 is what a frozen block gets
    (`freeze.py` drops its gradients). A block only partly frozen is drawn at its group's lr.
    """
    from ddp_finetune.training.freeze import plan_freeze

    model, parts = _meta_model(cfg)
    series, _ = _simulate(cfg, steps_per_epoch, (model, parts))
    if not cfg.model.freezes_anything():
        return series, []
    plan = plan_freeze(cfg.model, parts, model, cfg.train.epochs)
    group_of = {}
    for g in build_param_groups(model, parts, cfg.optim):
        for p in g["params"]:
            group_of[id(p)] = str(g["name"]).removesuffix(NO_DECAY_SUFFIX)
    params = dict(model.named_parameters())
    curves: dict[str, dict[str, list[float]]] = {}  # group -> unit -> its lr at every step
    for unit in plan.units:
        group = group_of[id(params[unit.params[0]])]
        lrs = series[f"lr/{group}"]
        if unit.frozen_count == unit.count:  # wholly frozen: 0 until its epoch
            start = len(lrs) if unit.trains_from is None else unit.trains_from * steps_per_epoch
            lrs = [0.0 if s < start else lr for s, lr in enumerate(lrs)]
        curves.setdefault(group, {})[unit.name] = list(lrs)
    drawn: dict[str, list[float]] = {}
    for group, units in curves.items():
        first = next(iter(units.values()))
        if all(c == first for c in units.values()):
            drawn[f"lr/{group}"] = first
        else:
            drawn.update({f"lr/{unit}": c for unit, c in units.items()})
    marks = [(epoch * steps_per_epoch, ", ".join(units)) for epoch, units in plan.unfreezes()]
    return drawn, marks


def plot_lrs(
    series: dict[str, list[float]],
    out_path,
    unfreeze_step: int | None = None,
    title: str = "learning rate per group",
    unfreezes: list[tuple[int, str]] | None = None,
):
    """Draw each series against the optimizer step into a PNG; returns its path.

    `unfreeze_step`: the optimizer step from which the backbone trains; the frozen span before
    it is shaded. `unfreezes`: (optimizer step, what starts training there), each marked with a
    dashed line.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    except ImportError:
        raise UserError("the lr plot needs matplotlib; install it with pip install 'ddp-finetune[plot]'") from None

    out = file_out(out_path, "--out", default_name="lr.png", suffixes=PICTURES)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    for key, values in series.items():
        # with unfreezes marked, steps: a block's lr jumps from 0 at its first step, it does not ramp
        style = "steps-post" if unfreezes else "default"
        ax.plot(range(len(values)), values, label=key.removeprefix("lr/"), linewidth=1.2, drawstyle=style)
    if unfreeze_step is not None:
        ax.axvspan(0, unfreeze_step, color="0.85", alpha=0.5, label="backbone frozen")
        ax.axvline(
            unfreeze_step, color="0.3", linestyle="--", linewidth=1, label=f"backbone unfreezes (step {unfreeze_step})"
        )
    for i, (step, what) in enumerate(unfreezes or []):
        ax.axvline(step, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(
            f"unfreeze {what}",
            (step, 1 - 0.06 * (i % 8)),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            va="top",
            rotation=0,
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
    series, marks = drawn_lrs(cfg, steps_per_epoch)
    _, description = _simulate(cfg, steps_per_epoch)
    unfreeze = cfg.model.unfreeze_at_epoch
    plain = cfg.model.freeze_backbone and not cfg.model.unfreeze_every  # today's whole-backbone unfreeze: shaded
    unfreeze_step = unfreeze * steps_per_epoch if plain and unfreeze is not None else None
    title = (
        f"{cfg.model.name}, {cfg.optim.name}, schedule {cfg.schedule.name}: "
        f"{steps_per_epoch} optimizer steps/epoch x {cfg.train.epochs} epochs"
    )
    if cfg.schedule.name.lower() == "reducelronplateau":
        title += "\nReduceLROnPlateau drawn flat: it reacts to validation metrics, which only training gives"
    if cfg.model.freeze_backbone and unfreeze is None:
        title += "\nbackbone frozen for the whole run (only the head trains)"
    if marks and unfreeze_step is None:
        title += "\nfrozen blocks drawn at lr 0; dashed lines: where blocks start training"
    unfreezes = None if unfreeze_step is not None else marks
    return plot_lrs(series, out_path, unfreeze_step=unfreeze_step, title=title, unfreezes=unfreezes), description


def lr_plot_command(config_path, overrides, out_path, steps_per_epoch: int | None = None):
    """`ddp-finetune lr-plot CONFIG [overrides] --out lr.png [--steps-per-epoch N]`.

    Without `steps_per_epoch`, it is the training split's size // `train.batch_size` (as in
    training), which loads the dataset.
    """
    from ddp_finetune.config import load_config

    cfg = load_config(config_path, overrides)
    out_path = file_out(out_path, "--out", default_name="lr.png", suffixes=PICTURES)  # before loading the dataset
    if steps_per_epoch is None:
        from ddp_finetune.data.sources import load_splits

        steps_per_epoch = len(load_splits(cfg.data, cfg.seed, cfg.task).train) // cfg.train.batch_size
    path, description = plot_schedule(cfg, steps_per_epoch, out_path)
    print(description)
    print(f"wrote {path}")
    return path
