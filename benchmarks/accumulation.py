"""Cost of exact gradient accumulation: time per optimizer step, loss.accumulation exact vs micro_batch.

    python benchmarks/accumulation.py [--steps 6] [--repeats 3]

For each model (resnet18 classifying 64 px images with a Dice loss; deeplabv3_mobilenet_v3_large
segmenting 64 px images with Dice + ignore_index) and grad_accum 4, both settings train the same
number of optimizer steps in this one process, alternating, `--repeats` times; the table gives the
median seconds per optimizer step and the ratio exact / micro_batch. Exact accumulation adds a
forward pass without gradients per micro-batch (the statistics pass), so the ratio is expected
between 1 and ~1.35 (a forward is roughly a third of forward + backward).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {
    "resnet18": dict(task="binary", model={"name": "resnet18", "freeze_bn": True}, loss={"name": "dice"}),
    "deeplabv3_mobilenet_v3_large": dict(
        task="segmentation",
        model={"name": "deeplabv3_mobilenet_v3_large", "freeze_bn": True},
        loss={"name": "dice", "ignore_index": 255},
    ),
}


def seconds_per_step(config, steps: int) -> float:
    """Median wall time of `train.optimizer_step` (forward, backward, update) over the run's steps
    after the first (which pays one-time costs)."""
    from helpers import fit_in_process

    from ddp_finetune.training import loop as train

    times, original = [], train.optimizer_step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        original(*args, **kwargs)
        times.append(time.perf_counter() - start)

    train.optimizer_step = timed
    try:
        fit_in_process(config, f"train.max_steps={steps}")
    finally:
        train.optimizer_step = original
    return statistics.median(times[1:])


def main() -> None:
    import yaml
    from datagen import make_image_folder, make_mask_disk

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ddpf-accum-"))
    data = {
        "binary": make_image_folder(tmp / "binary", classes=("no", "yes"), per_class=100, size=64),
        "segmentation": make_mask_disk(tmp / "masks", n=200, size=64, ignore_border=True),
    }
    rows = []
    for name, spec in MODELS.items():
        times = {"exact": [], "micro_batch": []}
        for r in range(args.repeats):
            for mode in times:
                values = {
                    "output_dir": str(tmp / f"{name}-{mode}-{r}"),
                    "task": spec["task"],
                    "data": {
                        "path": str(data[spec["task"]]),
                        "source": "disk" if spec["task"] == "segmentation" else "imagefolder",
                        "image_size": 64,
                        "val_fraction": 0.05,
                    },
                    "model": spec["model"],
                    "loss": {**spec["loss"], "accumulation": mode},
                    "train": {"epochs": 1, "batch_size": 32, "grad_accum": 4},
                    "checkpoint": {"every_epoch": False},
                    "log": {"progress_bar": False, "every_n_steps": 100},
                }
                config = tmp / f"{name}-{mode}-{r}.yaml"
                config.write_text(yaml.safe_dump(values))
                times[mode].append(seconds_per_step(config, args.steps))
        exact, micro = statistics.median(times["exact"]), statistics.median(times["micro_batch"])
        rows.append((name, micro, exact, exact / micro))
    print(
        f"{platform.machine()}, torch threads default, {args.steps} steps x {args.repeats} repeats, grad_accum 4, "
        "global batch 32, 64 px"
    )
    print("| model | micro_batch s/step | exact s/step | exact / micro_batch |")
    print("|---|---|---|---|")
    for name, micro, exact, ratio in rows:
        print(f"| {name} | {micro:.3f} | {exact:.3f} | {ratio:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
