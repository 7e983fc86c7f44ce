"""Count the host syncs the training loop asks for, per optimizer step, on a CPU.

    python tests/scripts/sync_counter.py CONFIG OUT.json [key=value ...]    # or under accelerate launch

On a GPU a host sync is any call that needs a value computed on the device: `.item()`, `.tolist()`,
`bool(t)`, `float(t)`, `int(t)`, `.numpy()`, `.cpu()` (torch.cuda.set_sync_debug_mode("error")
catches them there). A CPU has no asynchronous device, so this script patches those Tensor methods
and records every call made from ddp_finetune's or Accelerate's code (calls from inside torch are
torch's own business; the GPU test sees those). The loop's named steps tell which optimizer step a
call belongs to: `optimizer_step` opens step s, and the checks that follow `count_step` belong to s.
Each rank writes OUT.json.rank<k> with {step: [where, ...]} and the steps that were check steps.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
WATCHED = ("/ddp_finetune/", "/accelerate/")


class SyncCounter:
    def __init__(self):
        self.step = 0
        self.calls: dict[int, list[str]] = defaultdict(list)
        self.check_steps: set[int] = set()
        self._saved = {}

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if "/torch/" not in name:
                if any(w in name for w in WATCHED):
                    return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
                return None
            frame = frame.f_back
        return None

    def install(self) -> None:
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                where = self._caller()
                if where is not None:
                    self.calls[self.step].append(f"{_name} at {where}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def instrument(counter: SyncCounter) -> None:
    """Wrap the loop's named steps so that calls are attributed to optimizer steps."""
    from ddp_finetune.training import loop as train

    optimizer_step, is_check_step = train.optimizer_step, train.is_check_step

    def counted_optimizer_step(run, *args, **kwargs):
        counter.step += 1
        return optimizer_step(run, *args, **kwargs)

    def counted_is_check_step(run, progress):
        check = is_check_step(run, progress)
        if check:
            counter.check_steps.add(progress.step)
        return check

    train.optimizer_step = counted_optimizer_step
    train.is_check_step = counted_is_check_step


def main(config: str, out: str, overrides: list[str]) -> None:
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import fit

    counter = SyncCounter()
    instrument(counter)
    counter.install()
    try:
        fit(load_config(config, overrides))
    finally:
        counter.uninstall()
    report = {"calls": {str(k): v for k, v in counter.calls.items()}, "check_steps": sorted(counter.check_steps)}
    Path(f"{out}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
