"""Training throughput (images/s) of `ddp-finetune train` at 1 and N processes.

    python benchmarks/throughput.py                          # resnet18, 64px, 1 and 2 processes, CPU
    python benchmarks/throughput.py --model mobilenet_v3_small --size 96 --procs 1 2 4 --steps 30

Each run is a real `ddp-finetune train` (under `accelerate launch --multi_gpu` for N > 1) on a
generated image folder; the number reported is `summary.json`'s `images_per_second` (training
steps only, evaluation excluded). Prints a Markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from datagen import make_image_folder  # noqa: E402
from helpers import accelerate_launch_cmd  # noqa: E402


def run(procs: int, config: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline")
    train = ["-m", "ddp_finetune", "train", str(config), f"output_dir={out}"]
    # N > 1: on a free port, so that a benchmark never collides with a test run or another job
    cmd = [sys.executable, *train] if procs == 1 else [*accelerate_launch_cmd(procs), *train]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precision", default="no")
    args = p.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_image_folder(tmp / "images", classes=tuple("abcd"), per_class=args.batch * 2, size=args.size)
        cfg = {
            "data": {"path": str(images), "image_size": args.size, "augment": True, "val_fraction": 0.05},
            "model": {"name": args.model},
            "train": {
                "epochs": 100,
                "batch_size": args.batch,
                "max_steps": args.steps,
                "mixed_precision": args.precision,
            },
            "checkpoint": {"every_epoch": False},
            "log": {"progress_bar": False, "every_n_steps": 5},
        }
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump(cfg))
        rows = []
        for n in args.procs:
            threads = max(1, cores // n)
            s = run(n, config, tmp / f"run{n}", threads)
            rows.append((n, threads, s["images_per_second"], s["wall_time_s"]))
    print(
        f"model {args.model}, {args.size}px, global batch {args.batch}, {args.steps} steps, precision {args.precision}; "
        f"{platform.processor() or platform.machine()}, {cores} cores, torch threads per process = cores / processes"
    )
    print("| processes | threads each | train images/s | wall s (incl. start-up, eval) |")
    print("|---|---|---|---|")
    for n, t, ips, wall in rows:
        print(f"| {n} | {t} | {ips:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
