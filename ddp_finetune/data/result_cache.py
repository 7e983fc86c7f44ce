"""Results computed once per data set and reused by every later start: a JSON value per key under
the `datasets` cache, keyed by the dataset's fingerprint (which, for an image folder, follows every
file's size and time: changed data is computed again).

    path = cache_path("image_check", ds, version, columns)   # None: the dataset has no fingerprint
    value = read(path)                                          # None: nothing (or nothing readable) cached
    write(path, value)                                          # atomic; a cache that cannot be written is skipped

Used by the start-up image check (data/image_check.py) and the segmentation class count
(data/sources.py). The main process reads and writes; it tells the other ranks what it read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from ddp_finetune.files import atomic_write_text


def cache_path(kind: str, ds, *key) -> Path | None:
    """`<HF_DATASETS_CACHE>/ddp_finetune_<kind>/<hash of the fingerprint and key>.json`."""
    fingerprint = getattr(ds, "_fingerprint", None)
    if not fingerprint:
        return None
    import datasets

    name = hashlib.sha256("|".join(map(str, (*key, fingerprint))).encode()).hexdigest()[:24]
    return Path(datasets.config.HF_DATASETS_CACHE) / f"ddp_finetune_{kind}" / f"{name}.json"


def read(path: Path | None):
    """The cached value, or None (no path, no entry, a damaged entry)."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(path: Path | None, value) -> None:
    """Atomically; a cache that cannot be written (read-only, full, not a folder) only costs the next start."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"value": value}))
