"""See a run's learning rates before training: simulate the schedule, draw every group's lr.

    series = simulate_lrs(cfg, steps_per_epoch)     # {"lr/head": [...], "lr/backbone": [...]}
    plot_schedule(cfg, steps_per_epoch, "lr.png")   # the same, drawn, unfreeze point marked
    ddp-finetune lr-plot configs/x.yaml --out lr.png  # lr_plot_command

The simulation uses the real parameter groups (names, base lrs, layer decay) of the configured
model, built on the `meta` device (no memory, no weights, a few milliseconds even for ViT-H;
RegNet, whose builder needs real tensors, on the CPU), then runs the real `Schedule` on an
optimizer that holds one tiny stand-in tensor per group.
ReduceLROnPlateau needs validation metrics, which only training gives: it stays flat here.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import torch

from .errors import UserError
from .param_groups import build_param_groups, lr_log, make_optimizer, uses_static_freeze
from .schedules import build_schedule


def _meta_model(name: str, num_classes: int | None):
    import torchvision

    from .models import builder_kwargs, check_model_name

    check_model_name(name)
    # The same architecture as models.build_model (aux heads kept, no backbone download), without weights.
    kwargs = builder_kwargs(name, weights=None)
    if "init_weights" in kwargs:
        kwargs["init_weights"] = False  # nothing to initialize on the meta device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(name, weights=None, num_classes=num_classes or 2, **kwargs)
        except (NotImplementedError, RuntimeError):
            # Builders that compute their widths from tensors (RegNet) need real data: CPU it is.
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes or 2, **kwargs)


def _simulate(cfg, steps_per_epoch: int, model=None, head_prefixes: list[str] | None = None):
    if model is None:
        model = _meta_model(cfg.model.name, cfg.model.num_classes)
    if head_prefixes is None:
        from .models import head_prefixes as prefixes_of

        head_prefixes = prefixes_of(model)
    groups = build_param_groups(model, head_prefixes, cfg.optim)
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


def simulate_lrs(
    cfg, steps_per_epoch: int, model=None, head_prefixes: list[str] | None = None
) -> dict[str, list[float]]:
    """The lr of each logical group at every optimizer step of the run (index s: the lr step s uses).

    Keys are those of `param_groups.lr_log(optimizer, per_block=True)`: `lr/head`,
    `lr/backbone`, and with layer decay `lr/backbone.<block>` for every block instead of
    `lr/backbone` (which would repeat the block nearest the head). `model`: the real model if
    already built (else the configured one on the meta device); `head_prefixes`: null asks
    `models.head_prefixes(model)`. Epoch ends are simulated without validation metrics.
    """
    return _simulate(cfg, steps_per_epoch, model, head_prefixes)[0]


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

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(out, dpi=100)
    return out


def plot_schedule(cfg, steps_per_epoch: int, out_path, model=None, head_prefixes: list[str] | None = None):
    """`simulate_lrs` + `plot_lrs` with the unfreeze point and a title from the config.

    Returns (path of the PNG, the schedule's description).
    """
    series, description = _simulate(cfg, steps_per_epoch, model=model, head_prefixes=head_prefixes)
    unfreeze = cfg.model.unfreeze_at_epoch
    unfreeze_step = unfreeze * steps_per_epoch if cfg.model.freeze_backbone and unfreeze is not None else None
    title = (
        f"{cfg.model.name}, {cfg.optim.name}, schedule {cfg.schedule.name}: "
        f"{steps_per_epoch} optimizer steps/epoch x {cfg.train.epochs} epochs"
    )
    if cfg.schedule.name.lower() == "reducelronplateau":
        title += "\nReduceLROnPlateau drawn flat: it reacts to validation metrics, which only training gives"
    if uses_static_freeze(cfg.model):
        title += "\nbackbone frozen for the whole run (only the head trains)"
    return plot_lrs(series, out_path, unfreeze_step=unfreeze_step, title=title), description


def lr_plot_command(config_path, overrides, out_path, steps_per_epoch: int | None = None):
    """`ddp-finetune lr-plot CONFIG [overrides] --out lr.png [--steps-per-epoch N]`.

    Without `steps_per_epoch`, it is the training split's size // `train.batch_size` (as in
    training), which loads the dataset.
    """
    from .config import load_config

    cfg = load_config(config_path, overrides)
    if steps_per_epoch is None:
        from .data import load_splits

        steps_per_epoch = len(load_splits(cfg.data, cfg.seed, cfg.task).train) // cfg.train.batch_size
    path, description = plot_schedule(cfg, steps_per_epoch, out_path)
    print(description)
    print(f"wrote {path}")
    return path
