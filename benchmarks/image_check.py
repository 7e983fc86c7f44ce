"""Rate of the start-up image check, and how it scales with the CPUs a rank may use.

    python benchmarks/image_check.py [--photos 1500] [--small 40000] [--rounds 3] [--workers 1 2]

Writes two image folders (2 classes each) to a temporary folder: `--photos` JPEGs of 500x375
(smooth gradients plus noise, ~70 KiB each, a typical photo data set) and `--small` 32 px JPEGs
(the synthetic sets of `startup.py`), and packs each (`ddp-finetune pack`: the bytes inside Arrow).
Every file is read once first, so the page cache is warm. Then, in alternating rounds, the real
check (`image_check._scan` over the split `load_splits` returns, the forked pool included) runs
with `check_workers()` forced to each `--workers` count; the median of the rounds is reported,
with a full PIL decode on one process as the reference and, for each count k > 1, the scaling
`rate(k) / (k x rate(1))` (1.0 = linear). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n JPEGs of size (width, height) in two class folders."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    files = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1) / 10 + yy / 3) % 255, (yy + i) % 255, (xx + yy) / 4 % 255], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        files.append(cls / f"{i}.jpg")
        Image.fromarray(pixels).save(files[-1], quality=90)
    return files


def full_decode_rate(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.load()
    return len(files) / (time.perf_counter() - start)


def split_of(path: Path, source: str, out: Path):
    from ddp_finetune.config import load_config
    from ddp_finetune.data.sources import load_splits

    cfg = load_config(None, [f"data.path={path}", f"data.source={source}", f"output_dir={out}", "data.val_split=train"])
    return load_splits(cfg.data, 0, cfg.task).train


def check_rate(ds, workers: int) -> float:
    from ddp_finetune.data import image_check

    image_check.check_workers = lambda: workers  # the count `usable_cpus` would give a rank
    start = time.perf_counter()
    bad = image_check._scan("train", ds, [("image", True)], 0, len(ds))
    seconds = time.perf_counter() - start
    assert not bad, bad[:3]
    return len(ds) / seconds


def measure(name: str, files: list[Path], root: Path, work: Path, workers: list[int], rounds: int) -> list[str]:
    from ddp_finetune.data.pack import pack_folder

    for f in files:
        f.read_bytes()
    packed = work / f"{root.name}-packed"
    pack_folder(root, packed)
    rows = [f"| {name} | folder | full decode (PIL `load`), 1 process | {full_decode_rate(files[:2000]):.0f} | |"]
    for way, ds in (("folder", split_of(root, "imagefolder", work)), ("packed", split_of(packed, "disk", work))):
        rates = {k: [] for k in workers}
        for _ in range(rounds):
            for k in workers:
                rates[k].append(check_rate(ds, k))
        one = statistics.median(rates[workers[0]]) if workers[0] == 1 else None
        for k in workers:
            rate = statistics.median(rates[k])
            scaling = f"{rate / (k * one):.2f}" if one and k > 1 else ""
            rows.append(f"| {name} | {way} | check, {k} process{'es' if k > 1 else ''} | {rate:.0f} | {scaling} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=1500)
    p.add_argument("--small", type=int, default=40000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-cache")  # before `datasets` is imported
        for name, n, size in (("500x375 JPEG", args.photos, (500, 375)), ("32 px JPEG", args.small, (32, 32))):
            if n:
                root = work / name.split()[0]
                t = time.perf_counter()
                files = make_jpegs(root, n, size)
                print(f"{n} {name} images written in {time.perf_counter() - t:.0f} s", flush=True)
                rows += measure(name, files, root, work, args.workers, args.rounds)
    print(f"\nimages/s, median of {args.rounds} alternating rounds; scaling = rate(k) / (k x rate(1 process))\n")
    print("| images | way | what | images/s | scaling |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
