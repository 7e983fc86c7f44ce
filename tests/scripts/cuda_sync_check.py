"""Train on CUDA with `torch.cuda.set_sync_debug_mode("error")` on every ordinary optimizer step: any
call there that makes the host wait for the GPU raises (the GPU twin of sync_counter.py, which can
only count the Python-level reads on a CPU; this one also sees torch's and Accelerate's own syncs,
the data transfer included).

    python tests/scripts/cuda_sync_check.py CONFIG OUT.json [key=value ...]

The mode goes on where `optimizer_step` starts and stays on through the next batch's loading; it
goes off when `is_check_step` says the step is a check step (logging, checks, checkpoints,
evaluation may wait for the device), until the next `optimizer_step`. OUT.json lists the steps
that ran under the mode and the check steps, and whether the mode catches an `.item()` here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(config: str, out: str, overrides: list[str]) -> None:
    from ddp_finetune.config import load_config
    from ddp_finetune.training import loop as train

    optimizer_step, is_check_step = train.optimizer_step, train.is_check_step
    seen: dict[str, list[int]] = {"ordinary": [], "check": []}

    def guarded_optimizer_step(run, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        return optimizer_step(run, *args, **kwargs)

    def checked(run, progress):
        check = is_check_step(run, progress)
        seen["check" if check else "ordinary"].append(progress.step)
        if check:
            torch.cuda.set_sync_debug_mode(0)
        return check

    train.optimizer_step, train.is_check_step = guarded_optimizer_step, checked
    try:
        train.fit(load_config(config, overrides))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # the mode is not a no-op on this machine: a read of a device value raises under it
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ones(1, device="cuda").item()
        caught = False
    except RuntimeError as exc:
        caught = "synchroniz" in str(exc)  # "called a synchronizing CUDA operation"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    Path(out).write_text(json.dumps({**seen, "mode_catches_item": caught}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
