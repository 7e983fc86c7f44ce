"""Atomic checkpoints: written to a temporary folder, renamed into place, newest `keep_last` kept.

Layout: `<output_dir>/checkpoints/step_<N>/` holds what `accelerator.save_state` writes (model,
optimizer, scaler, RNG per rank, registered objects such as the schedule) plus
`trainer_state.json` (where in the run we are), `config.yaml` and, written last,
`manifest.json` (every file's size and checksum, see manifest.py). A folder named `step_<N>` is
complete by construction: `os.replace` of the temporary folder is the last thing that happens,
so a crash mid-save leaves the previous checkpoint intact and only a `.tmp-*` folder behind
(removed at the next start, see output_dir.py). A full disk during a save is a one-line error
on every rank, with the temporary folder removed. Resuming verifies the checkpoint against its
manifest: `auto` walks back to the newest one that verifies, saying which it skipped and why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ddp_finetune import distributed as dist_utils
from ddp_finetune.errors import UserError
from ddp_finetune.training.manifest import STATE_FILE, checkpoint_problem, folder_problem, has_manifest, write_manifest
from ddp_finetune.training.output_dir import is_disk_full
from ddp_finetune.training.param_groups import restore_fused
from ddp_finetune.training.resume_check import check_fits, load_failure

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
    """The checkpoint folder to resume from: None, the newest one that verifies (`auto`), or a
    given folder (which must verify). Every rank reads the same files and decides the same."""
    if resume is None:
        return None
    if resume == "auto":
        return _newest_intact(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE}); use auto or a checkpoints/step_<N> folder"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(
            f"checkpoint.resume={resume!r} is damaged: {problem}; use checkpoint.resume=auto for the newest intact "
            "checkpoint, or another checkpoints/step_<N> folder"
        )
    _note_unverified(path)
    return path


def _newest_intact(output_dir) -> Path | None:
    candidates = list_checkpoints(output_dir)
    skipped = []
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            _note_unverified(path)
            return path
        dist_utils.print0(f"checkpoint.resume=auto: skipping {path}: {problem}")
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        raise UserError(
            f"none of the {len(skipped)} checkpoints in {checkpoints_dir(output_dir)} is intact ({'; '.join(skipped)}); "
            f"move that folder away to start over in this output_dir"
        )
    return None


def _note_unverified(path: Path) -> None:
    if not has_manifest(path):
        dist_utils.print0(f"checkpoint {path} has no manifest (saved by an older version): resuming it unverified")


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
    device = accelerator.device
    # every rank writes its part (its RNG state); the first any_rank is also the barrier after which
    # the main process lists every rank's files in the manifest
    full = _disk_full_during(lambda: accelerator.save_state(str(tmp)), tmp)
    if not dist_utils.any_rank(full, device=device) and accelerator.is_main_process:
        full = _disk_full_during(lambda: _finish(tmp, trainer_state, config_text), tmp)
    if dist_utils.any_rank(full, device=device):
        _abandon_full_save(accelerator, tmp, output_dir, step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _swap_into_place(tmp, final)
        for stale in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _finish(tmp: Path, trainer_state: dict, config_text: str) -> None:
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    (tmp / "config.yaml").write_text(config_text)
    write_manifest(tmp)  # last: a folder with a manifest was complete when it was written


def _disk_full_during(write, folder: Path) -> bool:
    """Run `write`; True when the disk filled up (any other failure propagates: a crash, whose
    .tmp folder the next start removes)."""
    try:
        write()
    except Exception as exc:
        if not is_disk_full(exc, folder):
            raise
        return True
    return False


def _abandon_full_save(accelerator, tmp: Path, output_dir, step: int) -> None:
    """The disk filled up on some rank: remove the unfinished save and stop every rank with one line."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
    raise UserError(
        f"no space left on the device of output_dir={str(output_dir)!r} while saving checkpoint step_{step} "
        f"({shutil.disk_usage(output_dir).free // 2**20} MiB free); the unfinished save was removed and {kept}; "
        "free space, then run again with checkpoint.resume=auto"
    )


def load_checkpoint(accelerator, path: Path, config_text: str | None = None) -> dict:
    """Restore everything `save_checkpoint` saved; returns the trainer state. With `config_text`
    (the resuming run's config), a checkpoint of another model is a one-line error naming the
    differing keys, not a `load_state_dict` traceback."""
    if config_text is not None:
        check_fits(accelerator, path, config_text)
    # a run that was not fp16 saved no GradScaler: resumed under fp16, the scaler starts afresh
    # (Accelerate would otherwise fail on the missing scaler.pt with a traceback)
    scaler = getattr(accelerator, "scaler", None)
    fresh_scaler = scaler is not None and not (Path(path) / "scaler.pt").is_file()
    if fresh_scaler:
        accelerator.scaler = None
        dist_utils.print0(f"checkpoint {path} was not saved under fp16: the loss scale starts from its initial value")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError) as exc:
        if config_text is None:
            raise
        raise load_failure(path, exc, config_text) from None
    finally:
        if fresh_scaler:
            accelerator.scaler = scaler
    for optimizer in getattr(accelerator, "_optimizers", []):
        # a checkpoint of another train.mixed_precision holds the other `fused` setting
        restore_fused(getattr(optimizer, "optimizer", optimizer))
    return json.loads((Path(path) / STATE_FILE).read_text())


def save_final_weights(
    accelerator, model, output_dir, files: dict[str, str] | None = None, name: str = "final", manifest: bool = False
) -> Path:
    """The unwrapped state dict as `<output_dir>/<name>/model.safetensors`, atomically, with `files`
    (name -> text: the model card and config of model_folder.py) in the same folder; with `manifest`,
    a manifest.json written last (as in a checkpoint), so `promote_best` can verify the folder."""
    out = Path(output_dir)
    final, tmp = out / name, out / f".tmp-{name}"
    accelerator.wait_for_everyone()
    full = False
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # torch.compile's wrapper would prefix every key with `_orig_mod.`: save the model it wraps
            accelerator.save_model(getattr(model, "_orig_mod", model), str(tmp), safe_serialization=True)
            for file_name, text in (files or {}).items():
                (tmp / file_name).write_text(text)
            if manifest:
                write_manifest(tmp)
        except Exception as exc:
            if not is_disk_full(exc, out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            full = True
        else:
            _swap_into_place(tmp, final)
    if dist_utils.any_rank(full, device=accelerator.device):
        kept = latest_checkpoint(output_dir)
        raise UserError(
            f"no space left on the device of output_dir={str(output_dir)!r} while writing {name}/; "
            f"{f'the last checkpoint {kept.name} is intact' if kept else 'no checkpoint was kept'}; "
            "free space, then run again with checkpoint.resume=auto to write final/"
        )
    accelerator.wait_for_everyone()
    return final / "model.safetensors"


BEST = "best"


def promote_best(accelerator, output_dir, best_step: int) -> Path:
    """final/ becomes a copy of best/ (the model kept by `train.monitor`), after best/ verifies against
    its manifest and its model card names `best_step`, the step the run's own state calls the best."""
    out = Path(output_dir)
    best, final, tmp = out / BEST, out / "final", out / ".tmp-final"
    problem = folder_problem(best) if best.is_dir() else "is missing"
    if problem is None:
        selected = (json.loads((best / "model.json").read_text()).get("selected") or {}).get("step")
        if selected != best_step:
            problem = f"holds the model of step {selected}, the run's best is step {best_step}"
    if problem:  # every rank reads the same files and raises the same line
        raise UserError(
            f"{best} {problem}; final/ was not written: run again with checkpoint.resume=auto from a checkpoint "
            f"before step {best_step}, or without train.monitor"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best, tmp)
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
