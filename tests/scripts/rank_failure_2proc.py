"""A failure on the first rank of a node while the other rank waits for it (2 gloo ranks on CPU).

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/rank_failure_2proc.py OUT_DIR

Rank 0 (the first rank of the node) fails inside `first_on_each_node` with a UserError, then
stays alive (as a rank on another node would, which no launcher ends). Each rank writes
OUT_DIR/rank<k>.json: the process group's timeout, what it raised and how long that took. The
group's timeout is 1 minute: a rank left waiting in a barrier would fail only then, and not
with the failed rank's line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_finetune.distributed import destroy_process_group, first_on_each_node, make_accelerator
from ddp_finetune.errors import UserError


def main(out: Path) -> None:
    accelerator = make_accelerator(timeout_minutes=1)
    rank = accelerator.process_index
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    record = {"timeout_s": backend.options._timeout.total_seconds()}
    start = time.perf_counter()
    try:
        with first_on_each_node(accelerator):
            if rank == 0:
                raise UserError("data.path='/nowhere' does not exist; set data.path")
            record["ran_block"] = True
    except Exception as exc:  # noqa: BLE001 - the test reads which exception it was
        record["raised"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = time.perf_counter() - start
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
