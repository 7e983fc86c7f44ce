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
from helpers import accelerate_launch_cmd  # noqa: E402


def run_package(procs: int, config: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if procs == 1:  # `ddp-finetune train`, with the CPU time of its training phase measured too (see child)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(out)]
    else:  # on a free port, so that a benchmark never collides with a test run or another job
        cmd = [*accelerate_launch_cmd(procs), "-m", "ddp_finetune", "train", str(config), f"output_dir={out}"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def child(config: str, out: str) -> None:
    """`ddp-finetune train CONFIG output_dir=OUT` in this process, adding to summary.json the CPU time
    (this process and its data workers) spent inside `train_one_epoch`, the span its images/s covers."""
    from peer_loop import cpu_seconds

    from ddp_finetune.config import load_config
    from ddp_finetune.training import loop as train

    spent, epoch = [0.0], train.train_one_epoch

    def timed(*args, **kwargs):
        start = cpu_seconds()
        try:
            return epoch(*args, **kwargs)
        finally:
            spent[0] += cpu_seconds() - start

    train.train_one_epoch = timed
    summary = train.fit(load_config(config, [f"output_dir={out}"]))
    summary["images_per_cpu_second"] = summary["steps"] * summary["global_batch_size"] / spent[0]
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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
    p.add_argument(
        "--pair-threads", type=int, default=1, help="torch threads of the pairs (1: no OpenMP spin-waiting in CPU time)"
    )
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from ddp_finetune.data.loaders import plan_loaders

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.pair_threads)  # as in the pair runs' processes (OMP_NUM_THREADS)
    workers = plan_loaders("auto", cuda=False)  # what the package's default gives them here
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
        for n in args.procs:
            threads = max(1, cores // n)
            s = run_package(n, config, tmp / f"run{n}", threads)
            rows.append((n, threads, s["images_per_second"], s["wall_time_s"]))
        pairs = []  # (package, peer) summaries, alternating
        for r in range(args.repeats):
            package = run_package(1, config, tmp / f"pair{r}", args.pair_threads)
            pairs.append((package, run_peer(images, args, workers.workers, args.pair_threads)))
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
        f"\nThe package against a hand-written loop (benchmarks/peer_loop.py), 1 process with {args.pair_threads} torch "
        f"thread(s), {args.repeats} alternating pairs; images per CPU-second counts the training process and its data workers, which other load on the "
        "machine does not inflate the way it stretches wall time:"
    )
    print(
        "| pair | package images/s | peer images/s | package / peer | package img/CPU-s | peer img/CPU-s | package / peer (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    wall, cpu = [], []
    for r, (package, peer) in enumerate(pairs):
        wall.append(package["images_per_second"] / peer["images_per_second"])
        cpu.append(package["images_per_cpu_second"] / peer["images_per_cpu_second"])
        print(
            f"| {r + 1} | {package['images_per_second']:.1f} | {peer['images_per_second']:.1f} | {wall[-1]:.3f} "
            f"| {package['images_per_cpu_second']:.1f} | {peer['images_per_cpu_second']:.1f} | {cpu[-1]:.3f} |"
        )
    print(
        f"\npackage / peer, median of {args.repeats} pairs: {statistics.median(wall):.3f} in images/s, "
        f"{statistics.median(cpu):.3f} in images per CPU-second (target >= 0.97)"
    )


if __name__ == "__main__":
    main()
