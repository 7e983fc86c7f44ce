"""Cost of the start-up image check (`images.image_problem`) against a full decode.

    python benchmarks/image_check.py [--images 1000] [--threads 1 2]

Writes `--images` JPEGs of 500x375 (smooth gradients plus noise, ~70 KiB each) to a temporary
folder, reads them once to warm the page cache, then times a full PIL decode on one thread and
the check (JPEG decoded at 1/8 scale, every byte still read) on each thread count. Prints a
Markdown table of images/s for one process; the check runs this on every rank at once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ddp_finetune.data.images import image_problem


def make_jpegs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:375, :500]
    files = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1) / 10 + yy / 3) % 255, (yy + i) % 255, (xx + yy) / 4 % 255], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        files.append(folder / f"{i}.jpg")
        Image.fromarray(pixels).save(files[-1], quality=90)
    return files


def full_decode(path) -> None:
    with Image.open(path) as image:
        image.load()


def rate(fn, files, threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, files))
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), args.images)
        for f in files:
            f.read_bytes()
        print("| what | threads | images/s |\n|---|---|---|")
        print(f"| full decode (PIL `load`) | 1 | {rate(full_decode, files, 1):.0f} |")
        for t in args.threads:
            print(f"| start-up check (`image_problem`) | {t} | {rate(image_problem, files, t):.0f} |")


if __name__ == "__main__":
    main()
