"""Pictures, drawn with matplotlib and written atomically: the confusion matrix `evaluate` draws, and the
figure helpers the plot commands (commands/plot.py, commands/lr_plot.py) share."""

from __future__ import annotations

from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_path
from ddp_finetune.out_paths import PICTURES, file_out, writing


def new_figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("drawing needs matplotlib; install it with pip install 'ddp-finetune[plot]'") from None
    return Figure(layout="constrained", **kwargs)


def save_figure(fig, out: Path, dpi: int) -> Path:
    """`fig` into the checked path `out` (out_paths.file_out), atomically; the format named explicitly,
    since the temporary name's suffix is not the picture's."""
    with writing(out), atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".").lower())
    return out


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion(confusion, names, out_path, title: str = "", multilabel: bool = False, unit: str = "images") -> Path:
    """A confusion matrix as a heat map, coloured by the share of each true class's row, with the counts.

    `confusion`: (C, C), rows = true class; multilabel: (L, 2, 2), one row of TP, FN, FP, TN per label."""
    import numpy as np

    matrix = np.asarray(confusion.tolist() if hasattr(confusion, "tolist") else confusion, dtype=np.int64)
    if multilabel:
        matrix = np.stack([matrix[:, 1, 1], matrix[:, 1, 0], matrix[:, 0, 1], matrix[:, 0, 0]], axis=1)
        columns, xlabel, ylabel = ["TP", "FN", "FP", "TN"], "", "label"
    else:
        columns, xlabel, ylabel = list(names), "predicted class", "true class"
    rows = matrix.shape[0]
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(16.0, max(4.5, 0.45 * max(rows, len(columns)) + 2.5))
    fig = new_figure(figsize=(side, side * 0.85 if not multilabel else max(3.0, 0.35 * rows + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if rows * len(columns) <= 900:  # counts stay readable up to 30 x 30
        for i in range(rows):
            for j in range(len(columns)):
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    if len(columns) <= 60:
        ax.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 6 else 0, ha="right", fontsize=8)
    if rows <= 60:
        ax.set_yticks(range(rows), list(names)[:rows], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    total = int(matrix[0].sum() if multilabel else matrix.sum()) if rows else 0
    ax.set_title(f"{title}\n{total} {unit}", fontsize=9)
    return save_figure(fig, file_out(out_path, "--out", suffixes=PICTURES), dpi=90)
