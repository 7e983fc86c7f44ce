"""Training throughput (images/s) of `ddp-finetune train` at 1 and N processes, and against a hand-written loop.

    python benchmarks/throughput.py                          # resnet18, 64px, 1 and 2 processes, CPU
    python benchmarks/throughput.py --model mobilenet_v3_small --size 96 --procs 1 2 4 --steps 30

Each run is a real `ddp-finetune train` (under `accelerate launch --multi_gpu` for N > 1) on a
generated folder of photo-like JPEGs; the number reported is `summary.json`'s
`images_per_second` (training steps only, evaluation excluded). The peer is
`benchmarks/peer_loop.py` (ImageFolder + DataLoader + the same v2 transforms + plain SGD) on the
same folder, model, batch, steps and data workers, in its own process like the package. Package
and peer runs alternate `--repeats` times, so a busy machine slows both alike; package/peer is
the median of the per-pair ratios. Prints Markdown tables to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from datagen import make_jpeg_folder  # noqa: E402


def run_package(procs: int, config: Path, out: Path, port: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if procs == 1:
        cmd = [sys.executable, "-m", "ddp_finetune", "train", str(config), f"output_dir={out}"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "-m",
            "ddp_finetune",
            "train",
            str(config),
            f"output_dir={out}",
        ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def run_peer(images: Path, args, workers: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_loop.py"), str(images), "--model", args.model]
    cmd += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--workers", str(workers)]
    proc = subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precision", default="no")
    p.add_argument("--repeats", type=int, default=3, help="alternating package / peer pairs at 1 process")
    args = p.parse_args()

    from ddp_finetune.loaders import plan_loaders

    cores = os.cpu_count() or 1
    workers = plan_loaders("auto", cuda=False)  # what the package's default gives a single process here
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # every step of the run inside one epoch, for the package (5% held out) and the peer alike
        per_class = args.batch * (args.steps + 2) // 4 + 1
        images = make_jpeg_folder(
            tmp / "images", classes=tuple("abcd"), per_class=per_class, height=args.size, width=args.size
        )
        cfg = {
            "data": {"path": str(images), "image_size": args.size, "augment": True, "val_fraction": 0.05},
            "model": {"name": args.model},
            "train": {
                "epochs": 1,
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
        for i, n in enumerate(args.procs):
            threads = max(1, cores // n)
            s = run_package(n, config, tmp / f"run{n}", 29700 + i, threads)
            rows.append((n, threads, s["images_per_second"], s["wall_time_s"]))
        pairs = []
        for r in range(args.repeats):
            package = run_package(1, config, tmp / f"pair{r}", 29690, cores)["images_per_second"]
            peer = run_peer(images, args, workers.workers, cores)["images_per_second"]
            pairs.append((package, peer))
    print(
        f"model {args.model}, {args.size}px JPEGs, global batch {args.batch}, {args.steps} steps, precision "
        f"{args.precision}; {platform.processor() or platform.machine()}, {cores} cores, torch threads per process "
        f"= cores / processes; {workers.describe()}"
    )
    print("| processes | threads each | train images/s | wall s (incl. start-up, eval) |")
    print("|---|---|---|---|")
    for n, t, ips, wall in rows:
        print(f"| {n} | {t} | {ips:.1f} | {wall:.1f} |")
    print(
        f"\nThe package against a hand-written loop (benchmarks/peer_loop.py), 1 process, {args.repeats} alternating pairs:"
    )
    print("| pair | package images/s | peer images/s | package / peer |")
    print("|---|---|---|---|")
    for r, (package, peer) in enumerate(pairs):
        print(f"| {r + 1} | {package:.1f} | {peer:.1f} | {package / peer:.3f} |")
    print(
        f"\npackage / peer, median of {args.repeats} pairs: {statistics.median(a / b for a, b in pairs):.3f} (target >= 0.97)"
    )


if __name__ == "__main__":
    main()
