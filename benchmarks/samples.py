"""Per-core cost of producing one training sample: the package's dataset against hand-written ways.

    python benchmarks/samples.py                    # 120 JPEGs of 500x375, crop 224, 7 rounds
    python benchmarks/samples.py --images 240 --rounds 9

One thread, one process, the same generated JPEG files and the same crop size for every row.
Each round runs every row once over all files, rows interleaved, so a busy machine slows them
alike; a row's figure is the median over rounds of samples per CPU-second of this thread
(`time.thread_time`, which other processes on the machine do not inflate), and the ratio is the
median of the per-round ratios. Prints a Markdown table (issue 10's table, measured here).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth colour fields plus grain, quality 90) as an image folder:
    train/{a,b}/ (two classes) and one validation image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count + 1):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        out = folder / "validation" / "a" if i == count else folder / "train" / "ab"[i % 2]
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out / f"{i:04d}.jpg", quality=90)
    return folder


def ways(folder: Path, size: int) -> dict:
    """name -> function(i) producing sample i, each over the same files."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from ddp_finetune.config import config_from_dict
    from ddp_finetune.data.datasets import build_datasets
    from ddp_finetune.data.sources import decide_classes, load_splits

    files = sorted((folder / "train").glob("*/*.jpg"))
    crop_flip = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    cfg = config_from_dict({"data": {"path": str(folder), "image_size": size}})
    splits = load_splits(cfg.data, cfg.seed)
    classes = decide_classes(cfg, splits)
    package, _ = build_datasets(cfg, splits, classes)
    on_device, _ = build_datasets(cfg, splits, classes, on_device=True)
    n = len(package)

    def read(i):
        return torch.frombuffer(bytearray(files[i].read_bytes()), dtype=torch.uint8)

    return {
        "the package's `ImageDataset` (uint8 output, decode: cpu)": (n, lambda i: package[(0, i)]),
        "PIL + v2 crop/flip + float32 normalize (the package before issue 10)": (
            len(files),
            lambda i: to_float(crop_flip(Image.open(files[i]).convert("RGB"))),
        ),
        "PIL decode + the same v2 crop/flip, **uint8** output": (
            len(files),
            lambda i: v2.functional.pil_to_tensor(crop_flip(Image.open(files[i]).convert("RGB"))),
        ),
        "`torchvision.io.decode_jpeg` + the same crop/flip, uint8": (
            len(files),
            lambda i: crop_flip(decode_jpeg(read(i), mode=ImageReadMode.RGB)),
        ),
        "the package's worker with `data.decode: gpu` (file bytes + header + crop draw)": (
            n,
            lambda i: on_device[(0, i)],
        ),
        "reading the file's bytes only": (len(files), read),
    }


def measure(rows: dict, rounds: int) -> dict:
    """name -> list of (samples per CPU-second, samples per wall-second), one per round."""
    results = {name: [] for name in rows}
    for _ in range(rounds):
        for name, (n, make) in rows.items():
            cpu, wall = time.thread_time(), time.perf_counter()
            for i in range(n):
                make(i)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            results[name].append((n / max(cpu, 1e-9), n / max(wall, 1e-9)))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "jpegs", args.images)
        rows = ways(folder, args.size)
        for _, (_, make) in rows.items():  # warm up: imports, file cache, decoder set-up
            make(0)
        results = measure(rows, args.rounds)
    names = list(rows)
    package, reference = names[0], names[2]
    ratios = [a[0] / b[0] for a, b in zip(results[package], results[reference])]
    print(
        f"{args.images} JPEGs of 500x375, crop {args.size}, one thread, median of {args.rounds} interleaved rounds; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print("| way of producing a sample | images/s per core (CPU time) | images/s (wall) |")
    print("|---|---|---|")
    for name in names:
        cpu = statistics.median(r[0] for r in results[name])
        wall = statistics.median(r[1] for r in results[name])
        print(f"| {name} | {cpu:,.0f} | {wall:,.0f} |")
    print(f"\npackage / (PIL + v2, uint8) per core: {statistics.median(ratios):.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
