"""`ddp-finetune plot`: the training curves of finished (or running) runs (matplotlib's Figure API, no
pyplot: no global state, no display needed; the figure helpers and the confusion matrix that
`evaluate` draws are in inference/pictures.py).

    ddp-finetune plot runs/a runs/b --out curves.png      # plot_runs: several runs overlaid

`plot_runs` reads each run's `metrics.jsonl` and draws, against the optimizer step: the training
loss (validation loss dashed), the validation metrics, the learning rate of every parameter group
and the throughput in images/s. One colour per run, named in the legend.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.inference.pictures import new_figure, save_figure
from ddp_finetune.out_paths import PICTURES, file_out
from ddp_finetune.training.tracking import METRICS_FILE, read_metrics

_NOT_CURVES = {"step", "epoch", "split", "count", "skipped_step", "nonfinite_steps"}
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# --------------------------------------------------------------------------- curves


@dataclass
class Curves:
    """A run's logged series against the optimizer step: name -> (steps, values)."""

    name: str
    train: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    val: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def _number(value) -> float | None:
    """A logged value as a float: numbers, and the strings metrics.jsonl writes for nan / inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def run_metrics_file(run) -> Path:
    """The metrics.jsonl of a run folder (or of the run around a final/ folder)."""
    p = Path(run)
    for folder in (p, p.parent):
        if (folder / METRICS_FILE).is_file():
            return folder / METRICS_FILE
    what = "does not exist" if not p.exists() else f"has no {METRICS_FILE}"
    raise UserError(f"run {str(p)!r} {what}; give a run folder (the output_dir of a training run)")


def _warn(message: str) -> None:
    print(f"plot: warning: {message}", file=sys.stderr, flush=True)


def read_curves(run, name: str | None = None) -> Curves:
    """Every numeric series of a run's metrics.jsonl, train and val records apart."""
    path = run_metrics_file(run)
    curves = Curves(name or path.parent.name)
    for record in read_metrics(path, warn=_warn):
        step = _number(record.get("step"))
        if step is None or step != step or abs(step) == float("inf"):  # no step to draw it at: not a record of ours
            _warn(f"{path}: a record without a numeric step skipped: {str(record)[:80]}")
            continue
        target = curves.val if record.get("split") == "val" else curves.train
        for key, value in record.items():
            number = _number(value)
            if key in _NOT_CURVES or number is None:
                continue
            steps, values = target.setdefault(key, ([], []))
            steps.append(int(step))
            values.append(number)
    if not curves.train and not curves.val:
        raise UserError(f"{path} holds no records yet; plot it once training has logged (log.every_n_steps)")
    return curves


def run_names(runs) -> list[str]:
    """Each run's folder name; the parent folder too where two runs share a name."""
    paths = [run_metrics_file(r).parent.resolve() for r in runs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def plot_runs(runs, out_path, title: str | None = None) -> Path:
    """Training loss, validation metrics, learning rates and images/s of `runs`, overlaid, into a PNG."""
    runs = list(runs)
    out = file_out(out_path, "--out", default_name="curves.png", suffixes=PICTURES)
    all_curves = [read_curves(r, n) for r, n in zip(runs, run_names(runs))]
    fig = new_figure(figsize=(12, 7.5))
    (loss_ax, val_ax), (lr_ax, speed_ax) = fig.subplots(2, 2, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(all_curves))]
    metric_names = sorted({k for c in all_curves for k in c.val if k != "loss"})
    lr_names = sorted({k for c in all_curves for k in c.train if k.startswith("lr/")})
    for curves, colour in zip(all_curves, colours):
        _line(loss_ax, curves.train.get("loss"), colour, "-")
        _line(loss_ax, curves.val.get("loss"), colour, "--", marker="o")
        for i, metric in enumerate(metric_names):
            _line(val_ax, curves.val.get(metric), colour, _STYLES[i % 4], marker=_MARKERS[i % len(_MARKERS)])
        for i, group in enumerate(lr_names):
            _line(lr_ax, curves.train.get(group), colour, _STYLES[i % 4])
        _line(speed_ax, curves.train.get("images_per_second"), colour, "-")
    _decorate(loss_ax, "loss (solid: training, dashed: validation)", "loss")
    if all(v > 0 for line in loss_ax.lines for v in line.get_ydata()):
        loss_ax.set_yscale("log")  # an early spike of one run must not flatten the others' curves
    _decorate(val_ax, "validation metrics", "value")
    _decorate(lr_ax, "learning rate per parameter group", "learning rate")
    _decorate(speed_ax, "throughput", "images / s")
    _run_legend(loss_ax, [c.name for c in all_curves], colours)
    _style_legend(val_ax, metric_names, markers=True)
    _style_legend(lr_ax, [g.removeprefix("lr/") for g in lr_names], markers=False)
    for ax in (lr_ax, speed_ax):
        ax.set_xlabel("optimizer step")
        ax.set_ylim(bottom=0)  # a constant lr or a steady speed reads as one, not as noise around a point
    fig.suptitle(title or "training curves: " + ", ".join(c.name for c in all_curves), fontsize=11)
    return save_figure(fig, out, dpi=90)


def _line(ax, series, colour, style, marker=None) -> None:
    if not series or not series[0]:
        return
    steps, values = series
    ax.plot(steps, values, color=colour, linestyle=style, marker=marker, markersize=3.5, linewidth=1.2)


def _decorate(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not ax.lines:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _run_legend(ax, names: list[str], colours: list[str]) -> None:
    """One colour per run (also when a run has logged only validation records so far)."""
    from matplotlib.lines import Line2D

    ax.legend([Line2D([], [], color=c) for c in colours], names, fontsize=8, loc="best", title="run")


def _style_legend(ax, names: list[str], markers: bool) -> None:
    """A legend of line styles (one per metric or group), in grey: the colours are the runs."""
    from matplotlib.lines import Line2D

    if not names:
        return
    handles = [
        Line2D([], [], color="0.3", linestyle=_STYLES[i % 4], marker=_MARKERS[i % len(_MARKERS)] if markers else None)
        for i in range(len(names))
    ]
    ax.legend(handles, names, fontsize=8, loc="best", ncol=2 if len(names) > 6 else 1)


def plot_command(runs, out_path) -> Path:
    """`ddp-finetune plot RUN [RUN ...] --out curves.png`."""
    path = plot_runs(runs, out_path)
    print(f"wrote {path}", flush=True)
    return path
