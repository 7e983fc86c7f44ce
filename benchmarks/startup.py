"""Time to the first optimizer step as the data grows: the package on a folder and on its packed
copy (cold and warm), against torchvision's `ImageFolder` + a `DataLoader` (the anchor), in one run.

    python benchmarks/startup.py [--sizes 20000 100000] [--large]   # --large adds 300000
    python benchmarks/startup.py --sizes 2000 --keep /tmp/startup-data   # quick look, data kept

For each N: N 32 px JPEGs in 10 class folders are written (once, reused with --keep), then each
way runs in a fresh Python process until its first optimizer step (resnet18, batch 32, 32 px,
no data workers), and the parent times the whole process. The package's runs also report their
phases: imports, `load_splits` (the folder index or `load_from_disk`), the image check and the
rest (model build, loaders, the step). "cold": an empty `datasets` cache (no folder index, no
image-check cache); "warm": the same command again. The files are in the page cache in every run
(they were just written), so "cold" is the package's own work, not the disk's. Packing time is
reported once per N. The table's slope is the warm data phase (`load_splits` + check) per image
between the smallest and largest N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10


def make_folder(root: Path, n: int) -> Path:
    """N tiny JPEGs (32x32, smooth noise per class), `root/c<k>/<i>.jpg`; reused when complete."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (256, 32, 32, 3)).astype(np.int16)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        pixels = np.clip(base[i % 256] // 2 + c * 12, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=85)
    done.write_text(str(n))
    return root


# --------------------------------------------------------------------------- the children


def child_package(config: str) -> None:
    """`ddp-finetune train CONFIG` in this process, timed by phase, ended at the first optimizer step."""
    t0 = time.perf_counter()
    import datasets  # noqa: F401  (imported lazily by the package: counted with the imports, not the data)

    from ddp_finetune.config import load_config
    from ddp_finetune.training import loop as train_module
    from ddp_finetune.training import run as run_module

    phases = {"imports": time.perf_counter() - t0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    run_module.load_splits = timed("load_splits", run_module.load_splits)
    run_module.check_images = timed("image_check", run_module.check_images)
    real_count = train_module.count_step

    def first_step(*args, **kwargs):
        real_count(*args, **kwargs)
        phases["to_first_step"] = time.perf_counter() - t0
        print("STARTUP " + json.dumps(phases), flush=True)
        os._exit(0)  # nothing after the first step is measured

    train_module.count_step = first_step
    train_module.fit(load_config(config, []))


def child_torchvision(folder: str) -> None:
    """The anchor: ImageFolder (one scandir walk, no check) + DataLoader + one SGD step of resnet18."""
    t0 = time.perf_counter()
    import torch
    import torchvision
    from torchvision.transforms import v2

    phases = {"imports": time.perf_counter() - t0}
    start = time.perf_counter()
    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(32, antialias=True), v2.ToDtype(torch.float32)])
    ds = torchvision.datasets.ImageFolder(folder, transform=transform)
    phases["index"] = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=0)
    model = torchvision.models.resnet18(num_classes=len(ds.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    phases["to_first_step"] = time.perf_counter() - t0
    print("STARTUP " + json.dumps(phases), flush=True)


# --------------------------------------------------------------------------- the parent


def _run(args: list[str], cache: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")), None)
    if line is None:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"wall": wall, **json.loads(line[len("STARTUP ") :])}


def _config(work: Path, data: Path, source: str) -> Path:
    import yaml

    cfg = {
        "output_dir": str(work / f"run-{source}"),
        "data": {"source": source, "path": str(data), "image_size": 32, "num_workers": 0},
        "model": {"name": "resnet18"},
        "train": {"epochs": 1, "batch_size": 32},
        "log": {"progress_bar": False},
    }
    path = work / f"{source}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(n: int, keep: Path | None) -> list[dict]:
    base = keep or Path(tempfile.mkdtemp(prefix="startup-bench-"))
    work = Path(tempfile.mkdtemp(prefix="startup-work-"))
    rows = []
    try:
        t = time.perf_counter()
        folder = make_folder(base / f"n{n}", n)
        print(f"N={n}: images ready in {time.perf_counter() - t:.0f} s", flush=True)
        cache = work / "hf-cache"
        folder_cfg = _config(work, folder, "imagefolder")
        for state in ("cold", "warm"):
            shutil.rmtree(work / "run-imagefolder", ignore_errors=True)
            rows.append(
                {"n": n, "way": "package, folder", "state": state, **_run(["--package", str(folder_cfg)], cache)}
            )
            print(rows[-1], flush=True)
        packed = work / "packed"
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ddp_finetune", "pack", str(folder), str(packed)],
            check=True,
            capture_output=True,
            env=dict(os.environ, HF_DATASETS_CACHE=str(cache), PYTHONPATH=str(ROOT)),
        )
        pack_s = time.perf_counter() - t
        disk_cfg = _config(work, packed, "disk")
        cache2 = work / "hf-cache-2"  # a cache that has not seen the packed data: the image check runs
        for state in ("cold", "warm"):
            shutil.rmtree(work / "run-disk", ignore_errors=True)
            row = {"n": n, "way": "package, packed", "state": state, **_run(["--package", str(disk_cfg)], cache2)}
            row["pack_s"] = pack_s
            rows.append(row)
            print(rows[-1], flush=True)
        for state in ("cold", "warm"):  # no cache: both are the same work, run twice for the spread
            rows.append(
                {"n": n, "way": "torchvision ImageFolder", "state": state, **_run(["--tv", str(folder)], cache)}
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| N | way | state | to first step (s, whole process) | imports | index / load_splits | image check | rest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        index = r.get("load_splits", r.get("index", 0.0))
        check = r.get("image_check")
        rest = r["to_first_step"] - r["imports"] - index - (check or 0.0)
        out.append(
            f"| {r['n']:,} | {r['way']} | {r['state']} | {r['wall']:.1f} | {r['imports']:.1f} | {index:.2f} | "
            f"{'-' if check is None else f'{check:.2f}'} | {rest:.1f} |"
        )
    packs = {r["n"]: r["pack_s"] for r in rows if "pack_s" in r}
    out.append("")
    out.append("Packing (`ddp-finetune pack`, once): " + ", ".join(f"N={n:,}: {s:.1f} s" for n, s in packs.items()))
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for way in ("package, folder", "package, packed"):
            for state in ("warm", "cold"):

                def data(n, way=way, state=state):
                    r = next(x for x in rows if x["n"] == n and x["way"] == way and x["state"] == state)
                    return r.get("load_splits", 0.0) + r.get("image_check", 0.0)

                slope = (data(hi) - data(lo)) / (hi - lo) * 1e6
                out.append(f"- {way}, {state}: data phase (load_splits + image check) {slope:.1f} µs per image")
        tv = [next(x for x in rows if x["n"] == n and x["way"] == "torchvision ImageFolder") for n in (lo, hi)]
        out.append(
            f"- torchvision ImageFolder index: {(tv[1]['index'] - tv[0]['index']) / (hi - lo) * 1e6:.1f} µs per image"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--large", action="store_true", help="also N=300,000 (~1.2 GB of files, minutes)")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the generated folders here")
    parser.add_argument("--package", help=argparse.SUPPRESS)
    parser.add_argument("--tv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.package:
        return child_package(args.package)
    if args.tv:
        return child_torchvision(args.tv)
    sizes = args.sizes + ([300_000] if args.large else [])
    rows = []
    for n in sizes:
        rows += measure(n, args.keep)
    print(
        f"\n{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, `python benchmarks/startup.py {' '.join(sys.argv[1:])}`\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
