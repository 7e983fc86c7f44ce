"""Where a command writes (`--out` of evaluate, predict, plot, lr-plot and init): checked before the
work, written atomically, one line when it cannot be.

    path = file_out(args.out, "--out", default_name="curves.png", suffixes=PICTURES)   # before the work
    folder = folder_out(args.out, "--out")                                              # before the work
    with writing(path, "--out"):          # an OSError during the write becomes one UserError line
        atomic_write_text(path, text)     # files.py: a unique temporary name, then os.replace

The rules, the same for every command:
- a folder output (evaluate's report folder, predict's masks) must not be an existing file; it is
  created, and a file is written and removed in it to prove it writable;
- a file output given an existing folder, or a path ending in `/` (`--out newdir/`), means that
  folder: the command's default file name is written inside it;
- a file output must have a suffix the writer knows (matplotlib picks the format by it);
- the folder around a file output is created and proved writable the same way.
The checks run on every rank, so every rank stops with the same line before any work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ddp_finetune.errors import UserError, first_line
from ddp_finetune.files import temporary_path

PICTURES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what the plotting commands can write (matplotlib)


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else first_line(exc)


def _means_folder(text: str) -> bool:
    return text.endswith(("/", os.sep))


def folder_out(out, flag: str = "--out", what: str = "a folder") -> Path:
    """`out` as an output folder: created, proved writable; one line when it cannot be."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {str(out)!r} is a file; this command writes {what} there: give a folder path")
    blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{flag} {str(out)!r} cannot be created: {blocker} is a file; give another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{flag} {str(out)!r} cannot be created ({_why(exc)}); give a folder you can write to"
        ) from None
    probe = temporary_path(p / "write-test")
    try:
        probe.write_bytes(b"ok")
    except OSError as exc:
        raise UserError(f"{flag} {str(out)!r} is not writable ({_why(exc)}); give a folder you can write to") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return p


def file_out(out, flag: str = "--out", default_name: str | None = None, suffixes: tuple[str, ...] = ()) -> Path:
    """`out` as an output file (a folder or `dir/` means `default_name` inside it); its folder created and
    proved writable; one line when it cannot be."""
    text = str(out)
    p = Path(out)
    if _means_folder(text) or p.is_dir():
        if default_name is None:
            raise UserError(f"{flag} {text!r} is a folder; this command writes one file: give a file path")
        p = p / default_name
        if p.is_dir():
            raise UserError(f"{flag} {text!r}: {p} is a folder; give a file path")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {text!r} has no suffix this command writes ({', '.join(suffixes)}); "
            f"give e.g. {p.with_suffix(suffixes[0]).name}"
        )
    folder_out(p.parent, flag=f"{flag} {text!r}: the folder", what=f"the file {p.name}")
    return p


@contextlib.contextmanager
def writing(path, flag: str = "--out") -> Iterator[None]:
    """The write itself: a failure after the checks (disk full, permissions changed) as one line."""
    try:
        yield
    except OSError as exc:
        raise UserError(
            f"{flag} {str(path)!r} could not be written ({_why(exc)}); nothing was replaced: free space or "
            "give another path"
        ) from None
