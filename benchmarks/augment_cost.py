"""Per-core cost of one training sample under each augmentation setting (issue 20's recipe elements).

    python benchmarks/augment_cost.py                  # 60 JPEGs of 500x375, crop 224, 5 rounds
    python benchmarks/augment_cost.py --images 120 --rounds 7

One thread, one process; every row reads the same generated JPEGs through the package's own
training dataset (`datasets.build_datasets`), rows interleaved per round so a busy machine slows
them alike. A row's figure is the median over rounds of samples per CPU-second of this thread
(`time.thread_time`). Mixup / CutMix decode and augment the partner too, so they cost about twice
the plain sample. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS = {
    "crop + flip (default)": {},
    "+ randaugment": {"policy": "randaugment"},
    "+ trivialaugment": {"policy": "trivialaugment"},
    "+ augmix": {"policy": "augmix"},
    "+ colour jitter 0.4": {"color_jitter": 0.4},
    "+ random erasing 0.25": {"random_erasing": 0.25},
    "+ Mixup 0.2 / CutMix 1.0": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from samples import make_jpegs

    from ddp_finetune.config import config_from_dict
    from ddp_finetune.data.datasets import build_datasets
    from ddp_finetune.data.sources import decide_classes, load_splits

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "jpegs", args.images)
        sets = {}
        for name, extra in ROWS.items():
            cfg = config_from_dict({"data": {"path": str(folder), "image_size": 224, **extra}})
            splits = load_splits(cfg.data, cfg.seed, cfg.task)
            sets[name] = build_datasets(cfg, splits, decide_classes(cfg, splits))[0]
        rates: dict[str, list[float]] = {name: [] for name in ROWS}
        for r in range(args.rounds):
            for name, ds in sets.items():
                n = len(ds)
                start = time.thread_time()
                for i in range(n):
                    ds[(r, i, 0, (i + 1) % n, 0)]  # every sample mixed where mixing is on
                rates[name].append(n / (time.thread_time() - start))
    base = statistics.median(rates["crop + flip (default)"])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, 500x375 JPEG -> 224")
    print("| setting | samples / CPU-second | relative |\n|---|---|---|")
    for name, values in rates.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.0f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
