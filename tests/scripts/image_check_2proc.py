"""2-rank check that the start-up image check, with a process pool inside each gloo rank, finds the
same bad rows as one process.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/image_check_2proc.py FOLDER OUT.json

Launched by tests/test_faults.py. The machine's CPU count is replaced by 4, so each of the 2 ranks
decodes its share with a pool of 2 forked processes (image_check._pool) while the process group is
up; the main process writes what the ranks gathered and the pools they made.
"""

from __future__ import annotations

import json
import os
import sys

from ddp_finetune import distributed as dist_utils
from ddp_finetune.config import config_from_dict
from ddp_finetune.data import image_check
from ddp_finetune.data.sources import load_splits
from ddp_finetune.distributed import make_accelerator


def main(folder: str, out_path: str) -> None:
    accelerator = make_accelerator()
    dist_utils.usable_cpus = lambda: (4, "test: 4 CPUs")
    pools = []
    real_pool = image_check._pool
    image_check._pool = lambda workers, rows: pools.append(workers) or real_pool(workers, rows)
    cfg = config_from_dict({"data": {"path": folder, "val_split": "train"}, "output_dir": os.path.dirname(out_path)})
    splits = load_splits(cfg.data, 0)
    columns = image_check._columns(cfg, splits.train)
    found, fresh = image_check._check_split("train", splits.train, columns)
    every_pool = dist_utils.gather_objects(pools)
    if dist_utils.is_main_process():
        result = {"bad": [b.name for b in found], "fresh": fresh, "pools": every_pool}
        with open(out_path, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)  # leave without interpreter shutdown, as the other 2-rank scripts do


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
