"""Every image decoded once before training: unreadable files are listed (or skipped) at start-up,
not found by a DataLoader worker hours into the run.

    splits = check_images(cfg, splits, output_dir)    # after load_splits, on every rank

The rows of each split are cut into one contiguous share per rank, and each rank decodes its
share with every CPU it may use (`check_workers`: a pool of forked processes, since Pillow holds
the GIL for much of a small image; the children read their rows from the split's Arrow table, so
only row numbers and bad images cross a pipe; JPEGs decode at 1/8 scale, which still reads every
byte), with a progress bar and its ETA on the main process when the check lasts more than 2 s.
On 2 cores it runs at 0.91-0.94 of linear scaling (benchmarks/image_check.py). The ranks gather
what they found, so they all drop the same rows.
The result is cached per split under the `datasets` cache, keyed by the split's fingerprint: for
an image folder that fingerprint changes when a file is added, removed or modified, so a restart
of the same data pays nothing and changed data is checked again. The main process reads the
cache and tells the others, so every rank takes the same path even without a shared cache.

`data.bad_images: error` (default) stops with one line: the count, the first few files and the
file holding the full list (`<output_dir>/bad_images.txt`). `skip` drops those rows and says so
in the start-up lines. A file that goes bad after the check is named by `images.read_row`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ddp_finetune import distributed as dist_utils
from ddp_finetune.data import result_cache
from ddp_finetune.data.images import image_problem, value_name
from ddp_finetune.data.sources import Splits
from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_write_text

CHECK_VERSION = 1  # bump when image_problem changes what it refuses: old cache entries no longer match
BAD_LIST = "bad_images.txt"
_CHUNK = 512  # at most this many rows read from the arrow table at a time
_POOL_ROWS = 256  # a share below this is decoded in the process itself (a pool's start costs ~25 ms)
_SHOWN = 3  # files named in the error line


@dataclasses.dataclass(frozen=True)
class BadImage:
    split: str  # "train" or the validation split's name
    row: int  # index in that split
    name: str  # the file, or "train row 5, column 'image'" for images stored as bytes
    reason: str


def check_images(cfg, splits: Splits, output_dir) -> Splits:
    """Raise a UserError listing unreadable images (`data.bad_images: error`), or return the splits
    without them and a note for the start-up lines (`skip`)."""
    kept, notes = check_parts(cfg, {"train": splits.train, splits.val_source: splits.val}, output_dir)
    return dataclasses.replace(splits, train=kept["train"], val=kept[splits.val_source], notes=[*splits.notes, *notes])


def check_split_images(cfg, ds, name: str, output_dir):
    """One split (`evaluate`'s): the same check as `check_images`; returns the split, without its unreadable
    images under `data.bad_images: skip` (listed in output_dir/bad_images.txt)."""
    return check_parts(cfg, {name: ds}, output_dir)[0][name]


def check_parts(cfg, parts: dict, output_dir) -> tuple[dict, list[str]]:
    """(the named splits without unreadable images, notes for the start-up lines); a UserError under
    `data.bad_images: error`."""
    columns = _columns(cfg, next(iter(parts.values())))
    if not columns:
        return parts, []
    start, scanned, bad = time.perf_counter(), 0, []
    for name, ds in parts.items():
        found, fresh = _check_split(name, ds, columns)
        scanned += len(ds) * len(columns) if fresh else 0
        bad += found
    notes = []
    if scanned:
        notes.append(
            f"data: decoded {scanned} images to find unreadable ones in {time.perf_counter() - start:.1f} s "
            f"on {dist_utils.world_size()} processes x {check_workers()} CPUs (cached: a restart on the same data skips this)"
        )
    listing = _write_list(output_dir, bad)
    if not bad:
        return parts, notes
    total = sum(len(ds) for ds in parts.values()) * len(columns)  # segmentation: images and masks
    if cfg.data.bad_images == "error":
        shown = ", ".join(f"{b.name} ({b.reason})" for b in bad[:_SHOWN])
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise UserError(
            f"{len(bad)} of {total} images cannot be read: {shown}{more}; full list in {listing}; "
            "replace or delete them, or set data.bad_images=skip to train without them"
        )
    kept = {name: _without(ds, {b.row for b in bad if b.split == name}) for name, ds in parts.items()}
    notes.append(f"data: skipped {len(bad)} unreadable images of {total} (data.bad_images=skip; list in {listing})")
    return kept, notes


def _columns(cfg, ds) -> list[tuple[str, bool]]:
    """(column, must become RGB) for the image column and, for segmentation, the mask column: those
    holding images (a `datasets.Image` feature) or paths to them."""
    import datasets

    wanted = [(cfg.data.image_column, True)]
    if cfg.task == "segmentation":
        wanted.append((cfg.data.mask_column, False))
    out = []
    for column, rgb in wanted:
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) == "string":
            out.append((column, rgb))
    return out


def _check_split(name: str, ds, columns) -> tuple[list[BadImage], bool]:
    """(bad images of one split, whether they were decoded now rather than read from the cache)."""
    if len(ds) == 0:  # nothing to decode
        return [], False
    cache = result_cache.cache_path("image_check", ds, CHECK_VERSION, columns)
    cached = dist_utils.broadcast_object(result_cache.read(cache) if dist_utils.is_main_process() else None)
    if cached is not None:
        return [BadImage(name, *row) for row in cached], False
    if dist_utils.is_main_process():
        print(f"data: checking that the {len(ds)} {name} images decode ...", flush=True)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    lo, hi = len(ds) * rank // world, len(ds) * (rank + 1) // world
    mine = _scan(name, ds, columns, lo, hi)
    found = sorted((b for share in dist_utils.gather_objects(mine) for b in share), key=lambda b: b.row)
    if dist_utils.is_main_process():
        result_cache.write(cache, [[b.row, b.name, b.reason] for b in found])
    return found, True


def check_workers() -> int:
    """Processes decoding one rank's share: every CPU the rank may use (the CPUs of `usable_cpus`
    shared by the ranks of the node: `data.num_workers: auto`'s count before it keeps any for training,
    which has not started yet)."""
    return max(1, dist_utils.usable_cpus()[0] // dist_utils.local_world_size())


# What the forked pool reads: the table of the split being checked (memory-mapped or in memory, shared
# with the children by `fork`, never pickled), its columns and name. Set only while a check runs.
_SHARED: tuple | None = None


def _check_rows(start: int, stop: int) -> list[BadImage]:
    """The bad images among rows [start, stop) of the shared table: the pool's task, and the whole
    check on one CPU. Only row numbers travel to a child and only bad images back."""
    table, columns, name = _SHARED
    chunk = table[start:stop]
    bad = []
    for column, rgb in columns:
        for offset, value in enumerate(chunk[column].to_pylist()):
            problem = image_problem(value, rgb)
            if problem:
                row = start + offset
                bad.append(BadImage(name, row, value_name(value, f"{name} row {row}, column {column!r}"), problem))
    return bad


def _pool(workers: int, rows: int):
    """A pool of processes (Pillow holds the GIL for most of a small image's decode: threads gave no
    gain on 32 px JPEGs), or None: one CPU, a share too small to pay for the start, or no `fork`."""
    import multiprocessing

    if workers < 2 or rows < _POOL_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return None
    from concurrent.futures import ProcessPoolExecutor

    # fork: the children only read the shared table and run Pillow (no CUDA, no process group); a fork
    # pool starts all its children at the first task, after `_SHARED` is set
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=_child_start, initargs=(os.getpid(),)
    )


def _child_start(parent: int) -> None:
    """In each pool child: leave Ctrl-C to the parent (which stops the pool), and die with it. A rank
    killed during the check (`kill`, a preemption's SIGTERM before the run's handler is installed)
    would otherwise leave its children waiting forever on a queue they hold both ends of, each
    holding the rank's memory (measured: 2 orphans of 380 MB after `kill` of the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux only: PR_SET_PDEATHSIG
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def _progress(name: str, rows: int):
    """A bar with an ETA on the main process once a check has run 2 s (each rank checks its share at
    the same pace, so the main process's share is the global progress)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=rows,
        desc=f"data: checking {name} images",
        unit="img",
        delay=2,
        mininterval=1,
        disable=not dist_utils.is_main_process(),
    )


def _scan(name: str, ds, columns, lo: int, hi: int) -> list[BadImage]:
    """The bad images of rows [lo, hi) of one split, in row order, decoded by `check_workers()` processes."""
    global _SHARED
    table = ds.select_columns([c for c, _ in columns]).with_format("arrow")
    workers = check_workers()
    size = max(1, min(_CHUNK, -(-(hi - lo) // (8 * workers))))  # >= 8 tasks per process: an even finish
    starts = range(lo, hi, size)
    stops = [min(s + size, hi) for s in starts]
    bad = []
    _SHARED = (table, columns, name)
    pool = _pool(workers, hi - lo)
    done = lo
    try:
        with _progress(name, (hi - lo) * len(columns)) as bar:
            results = map(_check_rows, starts, stops) if pool is None else pool.map(_check_rows, starts, stops)
            for start, stop, found in zip(starts, stops, results):
                bad += found
                done = stop
                bar.update((stop - start) * len(columns))
    except BrokenProcessPool:
        # a child killed (out of memory) or crashed (a decoder fault) takes its chunk with it: say where
        first = value_name(table[done : done + 1][columns[0][0]].to_pylist()[0], f"{name} row {done}")
        raise UserError(
            f"a process of the start-up image check died while the check of the {name} split was at row {done} "
            f"of {len(ds)} ({first}): the system killed it (out of memory?) or an image crashed its decoder, and the "
            "rows from there on are unchecked; free memory, or start with fewer CPUs (SLURM_CPUS_PER_TASK, taskset)"
        ) from None
    finally:
        _SHARED = None
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return bad


def _without(ds, rows: set[int]):
    return ds.select([i for i in range(len(ds)) if i not in rows]) if rows else ds


# --------------------------------------------------------------------------- cache and list


def _write_list(output_dir, bad: list[BadImage]) -> Path:
    """`<output_dir>/bad_images.txt`, one tab-separated line per image (split, row, file, reason);
    removed when nothing is bad, so a stale list never describes the current data."""
    path = Path(output_dir) / BAD_LIST
    if dist_utils.is_main_process():
        if bad:
            lines = "".join(f"{b.split}\t{b.row}\t{b.name}\t{b.reason}\n" for b in bad)
            atomic_write_text(path, "split\trow\tfile\treason\n" + lines)
        else:
            path.unlink(missing_ok=True)
    return path
