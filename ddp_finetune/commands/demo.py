"""`ddp-finetune demo`: transfer learning that wins, offline, repeated over seeds.

1. Write an image folder from the 1,797 handwritten digits scikit-learn ships in its wheel
   (real 8x8 scans, upsampled to 32x32 grayscale PNGs).
2. Source task: train a ResNet-18 from scratch on the handwritten digits 0-9 (`@digits_source`),
   once: like downloaded pretrained weights, it is the same for every seed.
3. Target task: the same ten digits in another domain, printed with the fonts matplotlib
   ships (`printed_digits.py`), from only a few labelled images per class. For each seed of
   `--seeds` (which draws the labelled images, the head's initialization and the data order):
   fine-tune the source weights with the package's recipe (`@digits_target`: head_lr above lr,
   backbone frozen for the first epochs then unfrozen, source BatchNorm statistics kept, EMA of
   the weights as final/), and train the same network from scratch on the same images and
   budget with a recipe fit for random weights (`@digits_target_scratch`: BatchNorm trains,
   higher lr, the same EMA).
4. Print each seed's top-1 of both on the same validation images, and the mean, min and max;
   write them to `summary.json`; draw the first seed's curves (`curves.png`).

`ddp-finetune demo --task segmentation` writes synthetic shapes (`shapes.py`) and trains
LR-ASPP on them from scratch (`@segmentation_example`).

The `@NAME` configs ship inside the package (ddp_finetune/configs/NAME.yaml).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_write_text
from ddp_finetune.out_paths import folder_out

DEMO_TASKS = ("classification", "segmentation")
DEFAULT_OUT = {"classification": "runs/demo", "segmentation": "runs/demo_segmentation"}
SHAPES_PER_SPLIT, SHAPES_SIZE = 48, 64  # the segmentation demo's data: images per split, side in pixels
TARGET_TRAIN_PER_CLASS, TARGET_VAL_PER_CLASS = 3, 20  # printed digits: labelled / validation images per class
ARMS = {"fine-tuned": "@digits_target", "from scratch": "@digits_target_scratch"}


def make_digits_folders(root, size: int = 32) -> dict:
    """Write `digits_source/<d>/*.png`: scikit-learn's 1,797 handwritten digits 0-9 (the source task)."""
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
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16.0 * 255).astype(np.uint8)
        folder = root / "digits_source" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
    return {"source": len(digits.images)}


def parse_seeds(text: str) -> list[int]:
    """`0-4`, `0,2,5` or `3` -> a list of seeds."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            low, dash, high = part.strip().partition("-")
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a seed list; use e.g. 0-4, 0,1,2 or 3") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} needs distinct seeds >= 0, e.g. 0-4")
    return seeds


def run_demo(out=None, overrides=(), task: str = "classification", seeds: str | list[int] = "0-4") -> dict:
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
    return run_classification_demo(out, overrides, seeds if isinstance(seeds, list) else parse_seeds(seeds))


def _start_over(run_dir: Path) -> None:
    if run_dir.exists():  # the demo's own run from an earlier `ddp-finetune demo`: start over
        print(f"demo: replacing the earlier demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)


def _stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def versions() -> dict:
    import torch
    import torchvision

    from ddp_finetune import __version__

    return {
        "ddp-finetune": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_classification_demo(out: Path, overrides=(), seeds=(0,)) -> dict:
    from ddp_finetune.commands.printed_digits import make_printed_digits
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import fit

    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "digits_source").is_dir():
        counts = make_digits_folders(data)
        print(f"demo: wrote {counts['source']} handwritten digits 0-9 (the source task) under {data}", flush=True)
    source_dir = out / "source"
    _start_over(source_dir)
    source = load_config(
        "@digits_source", [f"output_dir={source_dir}", f"data.path={data / 'digits_source'}", *overrides]
    )
    print("\n== source task: ResNet-18 from scratch on handwritten digits 0-9 (once, for every seed)", flush=True)
    source_summary = fit(source)
    weights = source_summary["final_weights"]

    per_seed = []
    for n, seed in enumerate(seeds):
        target_data = data / f"printed_seed{seed}"
        if not (target_data / "validation").is_dir():
            make_printed_digits(target_data, TARGET_TRAIN_PER_CLASS, TARGET_VAL_PER_CLASS, train_seed=seed)
        row = {"seed": seed}
        for arm, config in ARMS.items():
            run_dir = out / f"seed{seed}" / arm.replace(" ", "_").replace("-", "_")
            _start_over(run_dir)
            print(f"\n== seed {seed} ({n + 1}/{len(seeds)}), target task, printed digits 0-9: {arm}", flush=True)
            values = [f"output_dir={run_dir}", f"data.path={target_data}", f"seed={seed}"]
            if arm == "fine-tuned":
                values.append(f"model.weights={weights}")
            cfg = load_config(config, [*values, *overrides])
            result = fit(cfg)
            # the top-1 of the weights in final/: the EMA's under train.final_weights=ema
            final_val = result["val_ema"] if cfg.train.final_weights == "ema" else result["val"]
            row[arm] = final_val.get("top1", float("nan"))
        per_seed.append(row)

    summary = {
        "task": (
            f"printed digits 0-9, {TARGET_TRAIN_PER_CLASS} labelled images per class; top-1 on the same "
            f"{10 * TARGET_VAL_PER_CLASS} validation images for every seed"
        ),
        "source_top1": source_summary["val"].get("top1"),
        "seeds": per_seed,
        **{arm: _stats([r[arm] for r in per_seed]) for arm in ARMS},
        "difference": _stats([r["fine-tuned"] - r["from scratch"] for r in per_seed]),
        "wall_time_s": time.perf_counter() - t0,
        "versions": versions(),
    }
    text = results_table(summary)
    print(f"\nsource task (handwritten digits 0-9) validation top-1: {summary['source_top1']:.3f}\n{text}", flush=True)
    atomic_write_text(out / "results.md", text + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    first = out / f"seed{seeds[0]}"
    draw_curves(
        [first / "fine_tuned", first / "from_scratch"], out / "curves.png", "printed digits: fine-tuned vs from scratch"
    )
    return summary


def results_table(summary: dict) -> str:
    """Per seed top-1 of both arms and their difference, then mean, min and max."""
    lines = ["| seed | fine-tuned top-1 | from scratch top-1 | difference |", "|---|---|---|---|"]
    for r in summary["seeds"]:
        lines.append(
            f"| {r['seed']} | {r['fine-tuned']:.3f} | {r['from scratch']:.3f} | {r['fine-tuned'] - r['from scratch']:+.3f} |"
        )
    for stat in ("mean", "min", "max"):
        ft, sc, diff = summary["fine-tuned"][stat], summary["from scratch"][stat], summary["difference"][stat]
        lines.append(f"| {stat} | {ft:.3f} | {sc:.3f} | {diff:+.3f} |")
    return "\n".join(lines)


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
