"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

    atomic_write_text(out / "summary.json", text)
    with atomic_path(out / "curves.png") as tmp:   # for writers that want a path (matplotlib)
        fig.savefig(tmp)

The content goes to a hidden temporary file in the same folder, is flushed to disk, and
`os.replace` puts it in place: a kill at any moment leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path


def unique_tag() -> str:
    """`<pid>-<random>-<host>`: two processes (two commands into one --out, or the ranks of one job on hosts
    that share a file system, where pids can repeat) never pick the same temporary name, and a leftover
    names its owner (`tag_owner`). Not the rank: only distributed.py reads the launcher's variables, and
    the pid and host already tell two ranks apart."""
    return f"{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"


def tag_owner(tag: str) -> tuple[int | None, str]:
    """(pid, host) of a `unique_tag`; pid None when the tag is not one."""
    pid, _, rest = tag.partition("-")
    host = rest.partition("-")[2]
    return (int(pid), host) if pid.isdigit() and host else (None, host)


def owner_is_gone(tag: str) -> bool:
    """Whether the process that made `tag` is known to be gone: made on this host by a pid that is not running.
    A tag from another host, or not a tag, is never taken for a dead one's."""
    pid, host = tag_owner(tag)
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def temporary_path(path) -> Path:
    """A hidden temporary name beside `path`, unique to this process: same folder (os.replace is atomic
    within a file system), same suffix (writers pick the format by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{unique_tag()}.tmp{path.suffix}")


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically; returns the path."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path to write to; moved onto `path` when the block ends without an error."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
