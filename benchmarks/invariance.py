"""How close 1 process and 2 processes stay over a longer run (the world-size promise, measured).

    python benchmarks/invariance.py [--steps 60]

Trains one config (resnet18, 48 px images, BatchNorm frozen, SGD lr 0.01 / head 0.03, cosine,
augmentation on) with 1 process and with 2 gloo ranks (`accelerate launch --multi_gpu`), then
prints the largest difference of the logged training loss at a few steps and of the final weights.
Both runs see the same global batches, augmentation, losses and learning rates; they differ only in
the order floating-point sums are taken (a gradient all-reduce adds two halves), and training
amplifies that: the README quotes these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from datagen import make_image_folder
    from helpers import accelerate_launch_cmd, child_env, load_weights, max_abs_diff, read_metrics

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ddpf-invariance-"))
    images = make_image_folder(tmp / "images", per_class=60, size=48)  # 180 images, 162 for training
    epochs = -(-args.steps // (162 // 16))
    runs = {}
    for n in (1, 2):
        values = {
            "output_dir": str(tmp / f"n{n}"),
            "data": {"path": str(images), "image_size": 48, "augment": True, "val_fraction": 0.1},
            "model": {"name": "resnet18", "freeze_bn": True},
            "train": {"epochs": epochs, "batch_size": 16, "max_steps": args.steps},
            "optim": {"lr": 0.01, "head_lr": 0.03},
            "schedule": {"name": "CosineAnnealingLR"},
            "log": {"every_n_steps": 1, "progress_bar": False},
            "checkpoint": {"every_epoch": False},
        }
        config = tmp / f"n{n}.yaml"
        config.write_text(yaml.safe_dump(values))
        cmd = [sys.executable, "-m", "ddp_finetune", "train", str(config)]
        if n == 2:
            cmd = [*accelerate_launch_cmd(2), "-m", "ddp_finetune", "train", str(config)]
        env = child_env()
        env["CUDA_VISIBLE_DEVICES"] = ""
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        runs[n] = tmp / f"n{n}"
    losses = {n: {r["step"]: r["loss"] for r in read_metrics(d) if r["split"] == "train"} for n, d in runs.items()}
    report = {"steps": args.steps}
    for step in (1, 2, 5, 10, 20, 40, args.steps):
        if step <= args.steps:
            report[f"loss_diff_step_{step}"] = abs(losses[1][step] - losses[2][step])
    report["final_weight_max_abs_diff"] = max_abs_diff(load_weights(runs[1]), load_weights(runs[2]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
