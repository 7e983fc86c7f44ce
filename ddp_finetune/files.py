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
    """The host, the pid and a random part: two processes (two commands into one --out, or the ranks of
    one job on hosts that share a file system, where pids can repeat) never pick the same temporary name.
    (Not the rank: only distributed.py reads the launcher's variables, and the host + pid already tell
    two ranks apart.)"""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


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
