"""What a checkpoint should hold, written last, and the check that it still holds it.

    write_manifest(tmp_folder)          # the last file of a save, before the folder is renamed into place
    problem = checkpoint_problem(path)  # None, or why this checkpoint cannot be resumed

`manifest.json` lists every file of the checkpoint with its size and SHA-256
(`sha256sum`-compatible, so `jq` + `sha256sum -c` can check a checkpoint by hand). A folder
`step_<N>` is renamed into place only after its manifest is written, so a checkpoint that
disagrees with its manifest was damaged afterwards (a full disk that truncated a file before
the error surfaced, a copy cut short, a power loss before the data reached the disk). A
checkpoint without a manifest was saved by an older version: it is accepted unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
_BLOCK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1) + "\n")


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def folder_problem(folder: Path) -> str | None:
    """Why a folder written with a manifest (`best/`) no longer holds what was saved, or None."""
    folder = Path(folder)
    if not has_manifest(folder):
        return f"has no {MANIFEST}"
    return _manifest_problem(folder)


def _manifest_problem(folder: Path) -> str | None:
    """The first file of the folder's manifest that is missing, cut short or changed, or None."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, expected in files.items():
        problem = _file_problem(folder / name, expected)
        if problem:
            return f"{name} {problem}"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed (a file missing, truncated or changed), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    if has_manifest(folder):
        problem = _manifest_problem(folder)
        if problem:
            return problem
    try:
        json.loads((folder / STATE_FILE).read_text())["step"]
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is damaged"
    return None


def _file_problem(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return (
            f"has {size} bytes, {expected['size']} when saved (truncated)"
            if size < expected["size"]
            else (f"has {size} bytes, {expected['size']} when saved")
        )
    if sha256_of(path) != expected["sha256"]:
        return "differs from what was saved (checksum mismatch)"
    return None
