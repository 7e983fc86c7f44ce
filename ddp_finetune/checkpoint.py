"""Atomic checkpoints: written to a temporary folder, renamed into place, newest `keep_last` kept.

Layout: `<output_dir>/checkpoints/step_<N>/` holds what `accelerator.save_state` writes (model,
optimizer, scaler, RNG per rank, registered objects such as the schedule) plus
`trainer_state.json` (where in the run we are) and `config.yaml`. A folder named `step_<N>`
is complete by construction: `os.replace` of the temporary folder is the last thing that happens,
so a crash mid-save leaves the previous checkpoint intact and only a `.tmp-*` folder behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import UserError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """The checkpoint folder to resume from: None, the newest one (`auto`), or a given folder."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE}); use auto or a checkpoints/step_<N> folder"
        )
    return path


def save_checkpoint(accelerator, output_dir, step: int, trainer_state: dict, config_text: str, keep_last: int) -> Path:
    """Every rank calls this (each writes its own RNG state); the main process renames and prunes."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        (tmp / "config.yaml").write_text(config_text)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _swap_into_place(tmp, final)
        for stale in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore everything `save_checkpoint` saved; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


def save_final_weights(accelerator, model, output_dir) -> Path:
    """The unwrapped state dict as `<output_dir>/final/model.safetensors`, atomically."""
    out = Path(output_dir)
    final, tmp = out / "final", out / ".tmp-final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.compile's wrapper would prefix every key with `_orig_mod.`: save the model it wraps
        accelerator.save_model(getattr(model, "_orig_mod", model), str(tmp), safe_serialization=True)
        _swap_into_place(tmp, final)
    accelerator.wait_for_everyone()
    return final / "model.safetensors"


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step saved again) is moved aside
    first and deleted only once the new one is in place."""
    old = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
