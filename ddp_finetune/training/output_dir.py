"""The output folder: checked, locked and tidied before a run writes anything into it.

    with claim_output_dir(cfg.output_dir):      # train.fit, around the whole run
        ...
    check_free_space(cfg, model, kept)           # run.build_run, once the model's size is known

`claim_output_dir` (main process only; the other ranks pass through) refuses an output_dir that
is a file, cannot be created or is not writable; takes the run's lock; and removes what an
interrupted run left behind (`.tmp-*` folders of a save that never finished; an `.old-*` folder
is put back when the save that moved it aside never put its replacement in place).

The lock: a POSIX record lock (`fcntl.lockf`) on `<output_dir>/.lock`, held from the start of
the run to its end, whatever the end (exception, preemption). The kernel drops it when the
process dies, even by SIGKILL, so a lock left by a dead run cannot block the next one; the file
keeps the holder's pid, host, start time and SLURM job for the message a second run gets (exit
2). DataLoader workers do not inherit it (record locks belong to a process). On NFS the
server's lock manager holds it across nodes and frees a crashed client's locks when its lease
expires (NFSv4: 90 s by default; not measured here): a job requeued onto another node before
that is refused with exit 2 and can simply be started again. A preempted job exits before it
is requeued, so its lock is already free. A filesystem without locks (e.g. Lustre mounted
without `flock`) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ddp_finetune import distributed as dist_utils
from ddp_finetune.errors import UserError, first_line

LOCK_FILE = ".lock"
FULL_BELOW = 64 * 2**20  # a write that failed with less free space than this failed for lack of it
_LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def claim_output_dir(output_dir):
    """Check, lock and tidy `output_dir` for the duration of the block (main process only)."""
    if dist_utils.launched_rank() != 0:
        yield
        return
    out = prepare(output_dir)
    lock = OutputLock(out)
    lock.acquire()
    try:
        clean_leftovers(out)
        yield
    finally:
        lock.release()


def prepare(output_dir) -> Path:
    """Create `output_dir` and make sure a file can be written in it; one-line errors otherwise."""
    out = Path(output_dir)
    name = f"output_dir={str(output_dir)!r}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{name} is a file, not a folder; give a folder path (it is created when missing)")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{name} cannot be created: {blocker} is a file; choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{name} cannot be created ({_why(exc)}); choose a folder you can write to") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise UserError(f"{name} is not writable ({_why(exc)}); choose a folder you can write to") from None
    return out


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else first_line(exc)


class OutputLock:
    """The run's exclusive lock on its output folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)  # never close another descriptor of this file while holding: it drops the lock
            if exc.errno in _LOCKS_UNSUPPORTED:
                print(
                    f"ddp-finetune: warning: cannot lock {self.path} ({_why(exc)}); nothing stops a second run "
                    "from writing into this output_dir at the same time",
                    flush=True,
                )
                return
            raise UserError(
                f"output_dir={str(self.path.parent)!r} is in use by another run ({describe(holder)}); wait for it to "
                f"end, stop it (touch {self.path.parent / '.stop'}), or choose another output_dir"
            ) from None
        previous = _read_holder(fd)
        if previous:  # not released: that run was killed (the kernel freed its lock)
            print(
                f"ddp-finetune: the previous run in this output_dir ({describe(previous)}) ended without "
                "releasing it (killed?); taking it over",
                flush=True,
            )
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode() + b"\n", 0)
        self.fd = fd

    def release(self) -> None:
        """Empty the holder record (a clean end) and drop the lock. The file stays: deleting it
        would let a process that opened it before the deletion lock a file nobody else sees."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder not recorded yet"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}{job}"


def clean_leftovers(out: Path) -> None:
    """Remove `.tmp-*` folders of saves that never finished; put back an `.old-*` folder whose
    replacement never arrived (a crash between the two renames of `checkpoint._swap_into_place`)."""
    for parent in (out, out / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in sorted(parent.iterdir()):
            if p.name.startswith((".tmp-", ".write-test-")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                print(f"ddp-finetune: removed {p} (left by an interrupted save)", flush=True)
            elif p.name.startswith(".old-"):
                kept = p.with_name(p.name[len(".old-") :])
                if kept.exists():
                    shutil.rmtree(p)
                else:
                    os.replace(p, kept)
                    print(f"ddp-finetune: restored {kept} (moved aside by an interrupted save)", flush=True)


# --------------------------------------------------------------------------- a moved run folder


def follow_moved_run(config_path, cfg, overrides=()):
    """`train RUN/config.yaml` of a run folder that was moved (or copied) away from the output_dir its
    config names: the run continues where its folder now is, as the advice the package prints
    (`ddp-finetune train RUN/config.yaml checkpoint.resume=auto`) means, not in the old path. An
    `output_dir=` override wins. Returns the config, with output_dir replaced when it was followed."""
    import dataclasses

    if config_path is None or any(str(o).startswith("output_dir=") for o in overrides):
        return cfg
    path = Path(str(config_path))
    folder = path.parent
    is_run = path.name == "config.yaml" and any(
        (folder / m).exists() for m in ("checkpoints", "metrics.jsonl", "final")
    )
    if not is_run or Path(cfg.output_dir).resolve() == folder.resolve():
        return cfg
    if dist_utils.launched_rank() == 0:
        print(
            f"ddp-finetune: {path} is the config of the run folder {folder}, whose output_dir={cfg.output_dir!r} is "
            f"elsewhere (moved?): the run continues in {folder} (give output_dir=... to choose another)",
            flush=True,
        )
    return dataclasses.replace(cfg, output_dir=str(folder))


# --------------------------------------------------------------------------- space


def needed_bytes(cfg, model, existing_checkpoints: int) -> tuple[int, int]:
    """(bytes a run still needs in output_dir, bytes of one checkpoint), an upper bound.

    A checkpoint holds the weights plus the optimizer's state (SGD momentum: one copy of the
    weights, AdamW and the others: at most two); `keep_last` stay on disk plus the one being written before the oldest
    is pruned; `final/` takes the weights twice while a new one replaces an old one.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # SGD keeps one copy (momentum) or none; the others at most two (AdamW, RMSprop with momentum)
    copies = (1 if cfg.optim.momentum else 0) if cfg.optim.name.lower() == "sgd" else 2
    copies += 1 if cfg.train.ema_decay else 0  # the EMA's copy of the weights
    checkpoint = weights * (1 + copies)
    more = max(cfg.checkpoint.keep_last + 1 - existing_checkpoints, 1)
    finals = 4 if cfg.train.monitor else 2  # best/ is replaced as final/ is
    return more * checkpoint + finals * weights, checkpoint


def check_free_space(cfg, model, checkpoints_kept: int = 0) -> None:
    """Refuse to start when output_dir's filesystem cannot hold the run's checkpoints (every rank
    raises the same error: the main process measures). `checkpoints_kept`: how many the folder
    holds already (checkpoint.list_checkpoints; counted by the caller, so this module, which
    checkpoint.py uses, does not import it back)."""
    existing = min(checkpoints_kept, cfg.checkpoint.keep_last)
    need, checkpoint = needed_bytes(cfg, model, existing)
    free = dist_utils.broadcast_object(shutil.disk_usage(cfg.output_dir).free if dist_utils.is_main_process() else None)
    if free < need:
        gib = 2**30
        raise UserError(
            f"output_dir={cfg.output_dir!r} has {free / gib:.2f} GiB free, less than the {need / gib:.2f} GiB this run "
            f"may need (checkpoints of {checkpoint / gib:.2f} GiB: checkpoint.keep_last={cfg.checkpoint.keep_last} "
            "kept plus one being written, and final/); free space, lower checkpoint.keep_last, or choose another output_dir"
        )


def is_disk_full(exc: BaseException, folder=None) -> bool:
    """Did a write fail because the filesystem is full? ENOSPC / EDQUOT, also when a library reports
    it only as text (safetensors' SafetensorError) or not at all (torch.save: "unexpected pos"):
    then the free space left in `folder` decides."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(s in text for s in ("No space left on device", "Disk quota exceeded", "StorageFull")):
        return True
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False
