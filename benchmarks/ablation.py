"""What each element of the training recipe adds: top-1 over seeds, one element added at a time.

    python benchmarks/ablation.py [--seeds 0 1 2 --epochs 15 --lr 0.002 --out /tmp/ablation] [--weights SOURCE.safetensors]

The task is offline and small: the demo's printed digits 0-9 (matplotlib's fonts, 16 px) on an
imbalanced training split (class d has about 24 x 0.8^d images: 24 of digit 0, 3 of digit 9), a
balanced validation split (what `train.monitor` selects on) and a balanced test split, never
seen in training or selection, that the reported top-1 comes from (`ddp-finetune evaluate` of
final/). ResNet-18 from scratch, or fine-tuned from `--weights` (e.g. the demo's source model
`runs/demo/source/final/model.safetensors`).

The elements are added cumulatively, in this order: baseline, augmentation policy, Mixup /
CutMix, EMA, best model, class-balanced sampler. An element whose config keys this version of the
package does not have is skipped with a line that says so (the augmentation policy, Mixup /
CutMix and the balanced sampler come with the augmentation work of issue 20), and the rows after
it are measured without it. Prints a Markdown table (paste it into docs/benchmarks.md with the
machine and the date) and writes it, with every run's numbers, to OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, overrides): each row adds its overrides to all the rows above it
ELEMENTS = [
    ("baseline", []),
    ("+ augmentation (crop, flip, TrivialAugment)", ["data.augment=true", "data.policy=trivialaugment"]),
    ("+ Mixup / CutMix", ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"]),
    ("+ EMA", ["train.ema_decay=0.9", "train.final_weights=ema"]),
    ("+ best model", ["train.monitor=val_ema/top1", "train.eval_every_n_steps=10"]),
    ("+ balanced sampler", ["data.sampler=balanced"]),
]
TRAIN_MAX, TRAIN_RATIO, VAL_PER_CLASS, TEST_PER_CLASS = 24, 0.8, 10, 30


def train_counts() -> list[int]:
    return [max(3, round(TRAIN_MAX * TRAIN_RATIO**d)) for d in range(10)]


def write_data(root: Path) -> None:
    """root/train (imbalanced), root/validation, and root/test (balanced, for the reported top-1)."""
    import numpy as np

    from ddp_finetune.commands.printed_digits import font_paths, render_digit

    fonts = font_paths()
    plan = {"train": train_counts(), "validation": [VAL_PER_CLASS] * 10}
    for seed, (split, counts) in enumerate(plan.items()):
        _draw(root / "run_data" / split, counts, fonts, np.random.default_rng(100 + seed), render_digit)
    _draw(root / "test", [TEST_PER_CLASS] * 10, fonts, np.random.default_rng(200), render_digit)


def _draw(folder: Path, counts, fonts, rng, render_digit) -> None:
    for digit, n in enumerate(counts):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            render_digit(digit, fonts[int(rng.integers(len(fonts)))], rng).save(folder / str(digit) / f"{i}.png")


def known_keys() -> set[str]:
    from ddp_finetune.config import reference_rows

    return {key for key, _, _ in reference_rows()}


def base_overrides(args, data: Path, out: Path) -> list[str]:
    values = [
        f"output_dir={out}",
        f"data.path={data}",
        "data.image_size=16",
        "data.augment=false",
        "data.num_workers=0",
        "model.name=resnet18",
        f"train.epochs={args.epochs}",
        "train.batch_size=16",
        "train.eval_batch_size=100",
        f"optim.lr={args.lr}",
        "schedule.name=CosineAnnealingLR",
        "log.progress_bar=false",
        "log.every_n_steps=10",
        "checkpoint.every_epoch=false",
    ]
    if args.weights:
        values += [f"model.weights={args.weights}", "model.freeze_bn=true", "optim.lr=0.01", "optim.head_lr=0.1"]
    return values


def run_one(overrides: list[str]) -> float:
    """Train in this process (Accelerate's singletons reset around it); return final/'s top-1 on the test split."""
    from accelerate.state import AcceleratorState, GradientState

    from ddp_finetune.config import load_config
    from ddp_finetune.inference.evaluate import evaluate_model
    from ddp_finetune.training.loop import fit

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        cfg = load_config(None, overrides)
        fit(cfg)
        test = Path(cfg.data.path).parent / "test"
        report = evaluate_model(Path(cfg.output_dir) / "final", data=str(test), out=Path(cfg.output_dir) / "test_eval")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return float(report["metrics"]["top1"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddp_finetune_ablation"))
    parser.add_argument("--lr", type=float, default=0.002, help="optim.lr from scratch (default: the demo baseline's)")
    parser.add_argument(
        "--weights", default=None, help="fine-tune from this state dict instead of training from scratch"
    )
    args = parser.parse_args()

    data = args.out / "data"
    if not (data / "test").is_dir():
        write_data(data)
    keys = known_keys()
    rows, active, t0 = [], [], time.perf_counter()
    for name, overrides in ELEMENTS:
        missing = [o.split("=")[0] for o in overrides if o.split("=")[0] not in keys]
        if missing:
            print(
                f"ablation: skipping '{name}': this ddp_finetune has no {', '.join(missing)} "
                "(merge the augmentation work of issue 20 first); later rows are measured without it",
                flush=True,
            )
            rows.append({"element": name, "overrides": overrides, "skipped": f"no {', '.join(missing)}"})
            continue
        active = active + overrides
        tops = []
        for seed in args.seeds:
            run_dir = (
                args.out / "runs" / f"{len(rows)}_{name.strip('+ ').replace(' / ', '_').replace(' ', '_')}_s{seed}"
            )
            tops.append(run_one([*base_overrides(args, data / "run_data", run_dir), f"seed={seed}", *active]))
            print(f"ablation: {name}, seed {seed}: test top-1 {tops[-1]:.3f}", flush=True)
        rows.append({"element": name, "overrides": overrides, "top1": tops, "mean": sum(tops) / len(tops)})

    lines = [
        f"| recipe (cumulative) | added keys | test top-1, mean of seeds {' '.join(map(str, args.seeds))} | per seed |",
        "|---|---|---|---|",
    ]
    for r in rows:
        keys_cell = " ".join(f"`{o}`" for o in r["overrides"]) or "-"
        if "skipped" in r:
            lines.append(f"| {r['element']} | {keys_cell} | skipped ({r['skipped']}) | |")
        else:
            lines.append(
                f"| {r['element']} | {keys_cell} | {r['mean']:.3f} | {' '.join(f'{t:.3f}' for t in r['top1'])} |"
            )
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    import torch

    result = {
        "rows": rows,
        "train_counts": train_counts(),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "lr": args.lr,
        "weights": args.weights,
        "wall_time_s": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
    }
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ablation.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
