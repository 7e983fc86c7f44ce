"""GPU throughput, side by side in one process: a raw loop's ceiling against the package on the same card.

    python benchmarks/gpu.py                                   # ResNet-50, batch 256, on the GPU it finds
    python benchmarks/gpu.py --model resnet18 --budget-s 200
    python benchmarks/gpu.py --device cpu --model resnet18 --batch 8 --size 32 --steps 5 --warmup 0 --images 64 --no-compile

Rows (each measured as the median images/s of 5-step windows after warm-up, every window ending
on a host sync; the package's windows are its own `images_per_second` log records):
- raw: synthetic normalized tensors already on the device, channels_last model, SGD, autocast
  (fp16 with GradScaler, bf16), eager and `torch.compile`d: the ceiling of the card.
- package, synthetic: `ddp_finetune.training.loop.fit` with its datasets swapped for an in-memory uint8
  one: the loop's own overhead (target: package / raw eager >= 0.97).
- package, JPEG: a generated folder of 500x375 JPEGs, `data.decode: cpu` (the workers decode)
  and `gpu` (nvJPEG): end to end (target >= 0.90 x raw eager; compiled bf16 ResNet-50 >= 6,900
  img/s on an H200, 0.95 x the compiled ceiling measured there).
- peak memory of the raw loop, fp16 against fp32 (target <= 0.45).
Rows that do not fit in `--budget-s` are reported as skipped; the table is printed last and
written to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
WINDOW = 5  # steps per timed window (and the package's log.every_n_steps)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the raw loop


def raw_loop(args, device, precision: str, compiled: bool) -> dict:
    """images/s of a bare training step on device-resident synthetic data; peak memory in GiB."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    step_model = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "no"):
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for _ in range(args.steps // WINDOW):
        start = time.perf_counter()
        for _ in range(WINDOW):
            step()
        sync(device)
        windows.append(WINDOW * args.batch / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_second": statistics.median(windows), "peak_gib": peak}


# --------------------------------------------------------------------------- the package


class SyntheticImages(torch.utils.data.Dataset):
    """In-memory uint8 samples (a few distinct ones, repeated): data loading costs next to nothing."""

    def __init__(self, length: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=g)
        self.length, self.classes, self.epoch = length, classes, 0

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        return self.images[index % 16], index % self.classes


def _photo(args):
    from datagen import photo_like
    from PIL import Image

    path, seed = args
    Image.fromarray(photo_like(np.random.default_rng(seed), 375, 500)).save(path, quality=90)


def make_jpegs(root: Path, count: int, classes: int = 10) -> Path:
    """`count` photo-like 500x375 JPEGs in `classes` class folders, written by all cores."""
    jobs = []
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.jpg", i))
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_photo, jobs, chunksize=16)
    return root


def package_run(args, tmp: Path, name: str, data: Path, overrides: list[str], synthetic: bool) -> dict:
    """`fit` in this process; images/s = median of its logged windows after the first two."""
    from helpers import fresh_accelerate

    from ddp_finetune.config import config_from_dict
    from ddp_finetune.training.loop import fit

    steps = args.warmup + args.steps
    values = {
        "output_dir": str(tmp / name),
        "data": {"path": str(data), "image_size": args.size, "val_fraction": 0.02},
        "model": {"name": args.model},
        "train": {"epochs": 1000, "batch_size": args.batch, "max_steps": steps},
        "checkpoint": {"every_epoch": False},
        "log": {"progress_bar": False, "every_n_steps": WINDOW},
    }
    cfg = config_from_dict(values, overrides)
    given = {}
    if synthetic:  # the same run on in-memory datasets, through fit's own seam for datasets
        length, classes = args.batch * (steps + 1), 10
        given = dict(
            train_data=SyntheticImages(length, args.size, classes),
            val_data=SyntheticImages(args.batch, args.size, classes),
            class_names=[f"c{i}" for i in range(classes)],
        )
    log = tmp / f"{name}.log"
    with contextlib.ExitStack() as stack:
        stack.enter_context(fresh_accelerate())
        out = stack.enter_context(open(log, "w"))
        stack.enter_context(contextlib.redirect_stdout(out))
        fit(cfg, **given)
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    # each logged window covers the WINDOW steps before its record; the warm-up's are left out
    windows = [r["images_per_second"] for r in records if r["split"] == "train" and r["step"] - WINDOW >= args.warmup]
    return {"images_per_second": statistics.median(windows) if windows else float("nan"), "notes": _notes(log)}


def _notes(log: Path) -> str:
    """Workers per rank and where the images were decoded, from the run's start-up line."""
    line = next((x for x in log.read_text().splitlines() if x.startswith("data loading")), "")
    workers = re.search(r"(\d+) workers? per rank", line)
    decoded = line.split("; images ", 1)[-1].split(", normalized")[0] if "; images " in line else ""
    return f"{workers.group(1) if workers else 0} workers/rank; {decoded}"


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Row:
    what: str
    precision: str
    run: object  # () -> dict
    result: dict | None = None
    note: str = ""


def rows_for(args, device, tmp: Path, jpegs: Path, small: Path) -> list[Row]:
    from ddp_finetune.config import TrainConfig

    compile_option = "compile" in {f.name for f in dataclasses.fields(TrainConfig)}
    half = "fp16" if device.type == "cuda" else "bf16"  # fp16 needs CUDA (the package refuses it on CPU)
    pkg = lambda name, data, over, synth=False: lambda: package_run(args, tmp, name, data, over, synth)  # noqa: E731
    rows = [
        Row("raw, eager", "bf16", lambda: raw_loop(args, device, "bf16", False)),
        Row("package, synthetic uint8 in memory", "bf16", pkg("syn_bf16", small, ["train.mixed_precision=bf16"], True)),
        Row(
            "package, JPEG, decode gpu",
            "bf16",
            pkg("gpu_bf16", jpegs, ["train.mixed_precision=bf16", "data.decode=gpu"]),
        ),
        Row(
            "package, JPEG, decode cpu",
            "bf16",
            pkg("cpu_bf16", jpegs, ["train.mixed_precision=bf16", "data.decode=cpu"]),
        ),
        Row("raw, eager", half, lambda: raw_loop(args, device, half, False)),
        Row("raw, eager (peak memory reference)", "no", lambda: raw_loop(args, device, "no", False)),
        Row(
            "package, synthetic uint8 in memory", half, pkg("syn_half", small, [f"train.mixed_precision={half}"], True)
        ),
        Row(
            "package, JPEG, decode gpu",
            half,
            pkg("gpu_half", jpegs, [f"train.mixed_precision={half}", "data.decode=gpu"]),
        ),
    ]
    seen = set()  # on CPU the second precision is bf16 again: keep each row once
    rows = [r for r in rows if (r.what, r.precision) not in seen and not seen.add((r.what, r.precision))]
    if not args.no_compile:
        rows.append(Row("raw, compiled", "bf16", lambda: raw_loop(args, device, "bf16", True)))
        if compile_option:
            over = ["train.mixed_precision=bf16", "data.decode=gpu", "train.compile=true"]
            rows.append(Row("package, JPEG, decode gpu, compiled", "bf16", pkg("gpu_bf16_compiled", jpegs, over)))
        rows.append(Row("raw, compiled", half, lambda: raw_loop(args, device, half, True)))
    return rows


def _ratio(ips: float, reference: dict | None) -> str:
    return f"{ips / reference['images_per_second']:.3f}" if reference else ""


def table(args, device, rows: list[Row], elapsed: float) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    raw = {(r.what, r.precision): r.result for r in rows if r.what.startswith("raw") and r.result}
    lines = [
        f"{card}; torch {torch.__version__}; {args.model}, batch {args.batch}, {args.size}px; "
        f"{args.warmup} warm-up steps, median of {WINDOW}-step windows over {args.steps} steps; {elapsed:.0f} s in all",
        "",
        "| what | precision | images/s | / raw eager | / raw compiled | peak GiB | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.result is None:
            lines.append(f"| {r.what} | {r.precision} | {r.note or 'skipped'} | | | | |")
            continue
        ips = r.result["images_per_second"]
        eager, compiled = raw.get(("raw, eager", r.precision)), raw.get(("raw, compiled", r.precision))
        peak = r.result.get("peak_gib")
        peak = f"{peak:.1f}" if peak is not None and peak == peak else ""
        lines.append(
            f"| {r.what} | {r.precision} | {ips:,.0f} | {_ratio(ips, eager)} | {_ratio(ips, compiled)} | {peak} "
            f"| {r.result.get('notes', r.note)} |"
        )
    fp32 = raw.get(("raw, eager (peak memory reference)", "no"))
    fp16 = raw.get(("raw, eager", "fp16"))
    if fp32 and fp16 and fp32["peak_gib"] == fp32["peak_gib"]:
        lines += [
            "",
            f"peak memory fp16 / fp32 (raw eager): {fp16['peak_gib'] / fp32['peak_gib']:.2f} (target <= 0.45)",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--images", type=int, default=4096, help="JPEG files generated for the end-to-end rows")
    p.add_argument("--budget-s", type=float, default=330, help="start no row after this many seconds")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the table (and per-row logs beside it) here")
    args = p.parse_args()
    # whole windows: the package logs every WINDOW steps, so warm-up and timed steps are multiples of it
    args.warmup, args.steps = (-(-n // WINDOW) * WINDOW for n in (args.warmup, max(args.steps, WINDOW)))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    device = torch.device(args.device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    from datagen import make_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jpegs = make_jpegs(tmp / "jpegs", args.images)
        small = make_image_folder(tmp / "small", per_class=4, size=16)  # the synthetic runs' config needs a folder
        rows = rows_for(args, device, tmp, jpegs, small)
        for r in rows:
            if time.perf_counter() - start > args.budget_s:
                r.note = "skipped (time budget)"
                continue
            try:
                r.result = r.run()
            except Exception as exc:  # one failing row must not lose the others
                r.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            print(f"[{time.perf_counter() - start:5.0f} s] {r.what} {r.precision}: {r.result or r.note}", flush=True)
            if args.out:  # after every row: a run cut off by its time limit still leaves what it measured
                Path(args.out).write_text(table(args, device, rows, time.perf_counter() - start) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.out:  # the package runs' own output (start-up lines, errors), one file beside the table
            logs = [f"== {log.stem}\n{log.read_text()[-8000:]}" for log in sorted(tmp.glob("*.log"))]
            Path(args.out).with_suffix(".runs.log").write_text("\n".join(logs))
    text = table(args, device, rows, time.perf_counter() - start)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
