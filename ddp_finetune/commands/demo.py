"""`ddp-finetune demo`: the transfer-learning workflow, offline, in about a minute on 2 CPU cores.

1. Write an image folder from the 1,797 handwritten digits scikit-learn ships in its wheel
   (real 8x8 scans, upsampled to 32x32 grayscale PNGs).
2. Source task: train a ResNet-18 from scratch on digits 0-4 (`@digits_source`).
3. Target task: digits 5-9 with only a few labelled images per class. Fine-tune from the source
   weights, loaded from the local .safetensors file with a fresh head (`@digits_target`), and
   train the same model from scratch on the same budget.
4. Print the target accuracy of both, and draw their training curves side by side (`curves.png`).

`ddp-finetune demo --task segmentation` writes synthetic shapes (`shapes.py`) and trains
LR-ASPP on them from scratch (`@segmentation_example`).

The `@NAME` configs ship inside the package (ddp_finetune/configs/NAME.yaml).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_write_text
from ddp_finetune.out_paths import folder_out

DEMO_TASKS = ("classification", "segmentation")
DEFAULT_OUT = {"classification": "runs/demo", "segmentation": "runs/demo_segmentation"}
SHAPES_PER_SPLIT, SHAPES_SIZE = 48, 64  # the segmentation demo's data: images per split, side in pixels
SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)


def make_digits_folders(
    root, target_train_per_class: int = 5, target_val_per_class: int = 60, size: int = 32, seed: int = 0
) -> dict:
    """Write `digits_source/<d>/*.png` and `digits_target/{train,validation}/<d>/*.png`.

    The target task gets few labelled training images (the point of transfer learning) and a
    validation set large enough to tell 1% apart, small enough to evaluate every epoch quickly.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "the demo needs scikit-learn's digits; install it with: pip install 'ddp-finetune[demo]'"
        ) from None
    import numpy as np
    from PIL import Image

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"source": 0, "target_train": 0, "target_validation": 0}
    seen = {d: 0 for d in TARGET_DIGITS}
    for i in rng.permutation(len(digits.images)):
        label = int(digits.target[i])
        pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR)
        if label in SOURCE_DIGITS:
            folder, key = root / "digits_source" / str(label), "source"
        else:
            if seen[label] >= target_train_per_class + target_val_per_class:
                continue
            split = "train" if seen[label] < target_train_per_class else "validation"
            seen[label] += 1
            folder, key = root / "digits_target" / split / str(label), f"target_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i}.png")
        counts[key] += 1
    return counts


def run_demo(out=None, overrides=(), task: str = "classification") -> dict:
    """The demo of `task` under `out` (default `DEFAULT_OUT[task]`); `overrides` apply to every run."""
    from ddp_finetune.distributed import launched_world_size

    if task not in DEMO_TASKS:
        raise UserError(f"demo --task {task!r} is not one of {', '.join(DEMO_TASKS)}")
    if launched_world_size() > 1:
        # the demo writes its data set before any training starts: one process does it all
        example = "@digits_source" if task == "classification" else "@segmentation_example"
        raise UserError(
            "ddp-finetune demo runs in one process; to try several, run its configs under accelerate launch, e.g. "
            f"accelerate launch --multi_gpu --num_processes 2 -m ddp_finetune train {example} (after the demo wrote its data)"
        )
    out = folder_out(out or DEFAULT_OUT[task], "--out", what="its data, runs and results")  # out_paths.py
    if task == "segmentation":
        return run_segmentation_demo(out, overrides)
    return run_classification_demo(out, overrides)


def _start_over(run_dir: Path) -> None:
    if run_dir.exists():  # the demo's own run from an earlier `ddp-finetune demo`: start over
        print(f"demo: replacing the earlier demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)


def run_classification_demo(out: Path, overrides=()) -> dict:
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import fit

    data = out / "data"
    if not (data / "digits_target" / "validation").is_dir():
        counts = make_digits_folders(data)
        print(
            f"demo: wrote {counts['source']} source images (digits 0-4), {counts['target_train']} target training "
            f"and {counts['target_validation']} target validation images (digits 5-9) under {data}",
            flush=True,
        )
    source_dir, target_dir = out / "source", out / "target_finetuned"
    for run_dir in (source_dir, target_dir, out / "target_scratch"):
        _start_over(run_dir)
    common = [*overrides]
    source = load_config("@digits_source", [f"output_dir={source_dir}", f"data.path={data / 'digits_source'}", *common])
    print("\n== 1/3 source task: ResNet-18 from scratch on digits 0-4", flush=True)
    source_summary = fit(source)
    weights = source_summary["final_weights"]

    results = {}
    for label, run_dir, weights_value in (
        ("fine-tuned from source weights", target_dir, weights),
        ("from scratch", out / "target_scratch", "null"),
    ):
        print(f"\n== {'2/3' if weights_value != 'null' else '3/3'} target task, digits 5-9: {label}", flush=True)
        cfg = load_config(
            "@digits_target",
            [f"output_dir={run_dir}", f"data.path={data / 'digits_target'}", f"model.weights={weights_value}", *common],
        )
        results[label] = fit(cfg)

    rows = [
        (label, s["val"].get("top1", float("nan")), s["val"].get("loss", float("nan")), s["steps"])
        for label, s in results.items()
    ]
    table = ["| target task (digits 5-9) | top-1 | loss | optimizer steps |", "|---|---|---|---|"]
    table += [f"| {label} | {top1:.3f} | {loss:.3f} | {steps} |" for label, top1, loss, steps in rows]
    text = "\n".join(table)
    print(
        f"\nsource task (digits 0-4) validation top-1: {source_summary['val'].get('top1', float('nan')):.3f}\n{text}",
        flush=True,
    )
    atomic_write_text(out / "results.md", text + "\n")
    summary = {"source": source_summary, **results}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    draw_curves([target_dir, out / "target_scratch"], out / "curves.png", "digits 5-9: fine-tuned vs from scratch")
    return summary


def draw_curves(runs, path: Path, title: str) -> None:
    """The runs' training curves (`ddp-finetune plot`), or a note when matplotlib is not installed."""
    import importlib.util

    from ddp_finetune.commands.plot import plot_runs

    if importlib.util.find_spec("matplotlib") is None:  # the results stand without the picture
        print("demo: no curves picture: install matplotlib with pip install 'ddp-finetune[plot]'", flush=True)
        return
    plot_runs(runs, path, title=title)
    print(f"demo: training curves in {path}", flush=True)


def run_segmentation_demo(out: Path, overrides=()) -> dict:
    """Shapes under `out/data` (`SHAPES_PER_SPLIT` training and validation images), LR-ASPP in `out/lraspp`."""
    from ddp_finetune.commands.shapes import CLASS_NAMES, make_mask_folder
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import fit

    data, run_dir = out / "data", out / "lraspp"
    if not (data / "validation" / "masks").is_dir():
        make_mask_folder(data, n=SHAPES_PER_SPLIT, size=SHAPES_SIZE, splits=["train", "validation"])
        print(
            f"demo: wrote {SHAPES_PER_SPLIT} training and {SHAPES_PER_SPLIT} validation {SHAPES_SIZE}x{SHAPES_SIZE} "
            f"images with masks under {data} "
            f"(classes {', '.join(f'{i} {name}' for i, name in enumerate(CLASS_NAMES))})",
            flush=True,
        )
    _start_over(run_dir)
    cfg = load_config("@segmentation_example", [f"output_dir={run_dir}", f"data.path={data}", *overrides])
    print(f"\n== {cfg.model.name} from scratch on the shapes (@segmentation_example)", flush=True)
    summary = fit(cfg)
    val = summary["val"]
    names = ("mean_iou", "pixel_accuracy", "dice", "loss")
    cells = " | ".join(f"{val.get(name, float('nan')):.3f}" for name in names)
    table = "\n".join(
        [
            f"| shapes ({SHAPES_PER_SPLIT} validation images) | {' | '.join(names)} | optimizer steps |",
            "|---" * (len(names) + 2) + "|",
            f"| {cfg.model.name} | {cells} | {summary['steps']} |",
        ]
    )
    print(f"\n{table}", flush=True)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    draw_curves([run_dir], out / "curves.png", f"{cfg.model.name} on the shapes")
    return summary
