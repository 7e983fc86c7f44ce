"""A local image folder indexed by one directory walk, as torchvision's `ImageFolder` does, and handed
to `datasets` as an explicit table: the same splits, rows, order and labels as
`datasets.load_dataset("imagefolder", data_dir=path)`, without its data-file pattern resolution.

    raw = load_image_folder(path)        # DatasetDict: image (paths, decoded lazily) [+ label ClassLabel]

Why: `load_dataset` resolves its split patterns with ~46 recursive globs over the tree on every
start (~0.7 ms per image: 15 minutes for ImageNet, every requeue). Here the tree is walked once
with `os.scandir` (sorted, hidden files and `__` folders left out as `datasets` does) and the
same patterns (`datasets.data_files`' own tables) are matched in memory, once per directory for
the split-folder patterns. Class = the image's folder, names sorted, labelled only when every
image sits at the same depth and there are at least two classes: `datasets`' rules.

The walk records each image's size and modification time; their digest keys the index cached
under the `datasets` cache (one Arrow file per folder). A restart on an unchanged folder reads
the index instead of resolving it again, and a file added, removed or replaced (even in place,
which changes no directory's time) changes the digest, so the index is built again. The digest
is also the splits' fingerprint, so the image check's cache (image_check.py) follows the files.

Layouts this does not reproduce exactly (metadata files, zip archives, `datasets`' sharded
`data/<split>-00000-of-00001` names, links to folders, a split with no image) return None, and
the caller falls back to `load_dataset`: slower, never different.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ddp_finetune.files import unique_tag

INDEX_VERSION = 1  # bump when the walk or the split rules change: old cached indexes no longer match
_INDEX_DIR = "ddp_finetune_folder_index"


@dataclass
class Walk:
    """Every non-hidden file under the root, in the order `datasets`' glob returns them (sorted full path)."""

    files: list[str]  # relative posix paths, files of any kind (the split patterns see them all)
    images: list[str]  # the image files among them, same order
    digest: str  # sha256 of (path, size, mtime) of every image and the names of the other files
    links_to_folders: bool = False


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {e.lower() for e in ImageFolder.EXTENSIONS}


def _is_image(name: str, extensions: set[str]) -> bool:
    # `datasets` keeps a file whose last or second-to-last extension is an image one (x.jpg.gz too);
    # the common case first, without os.path.splitext (a walk calls this once per file)
    dot = name.rfind(".")
    if dot > 0 and name[dot:].lower() in extensions:
        return True
    root, ext = os.path.splitext(name)
    return bool(ext) and os.path.splitext(root)[1].lower() in extensions


def walk(root: Path) -> Walk:
    """One pass of `os.scandir` over `root`, each image stat'ed once (size and mtime for the digest)."""
    from datasets.data_files import FILES_TO_IGNORE

    extensions, ignore = _image_extensions(), set(FILES_TO_IGNORE)
    files, images, stamps = [], [], []
    links = False

    def visit(folder: str, prefix: str) -> None:
        nonlocal links
        dirs, plain = [], []
        with os.scandir(folder) as it:
            for e in it:
                name = e.name
                if name[0] == ".":
                    continue
                if e.is_dir():
                    links = links or e.is_symlink()
                    if not name.startswith("__"):  # `datasets` skips special folders (__pycache__)
                        dirs.append((name + "/", e))
                elif name not in ignore and e.is_file():
                    plain.append(name)
        plain.sort()
        if dirs:
            # a folder sorts as "name/": then visiting in this order yields the full paths sorted, as
            # a sort of the whole list would ("a/x" after "a-b/x", since "-" < "/")
            dirs.sort(key=lambda d: d[0])
            order = sorted([(n, None) for n in plain] + dirs, key=lambda k: k[0])
        else:
            order = None
        # the per-file loop is the walk's cost at a million files: kept lean (no calls but the stat)
        for name, entry in order if order is not None else ((n, None) for n in plain):
            rel = prefix + name
            if entry is not None:
                visit(entry.path, rel)
                continue
            files.append(rel)
            dot = name.rfind(".")
            if (dot > 0 and name[dot:].lower() in extensions) or _is_image(name, extensions):
                try:
                    st = os.stat(folder + "/" + name)
                except FileNotFoundError:  # removed since its folder was listed: not part of the data
                    files.pop()
                    continue
                images.append(rel)
                stamps.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
            else:
                stamps.append(f"{rel}\0-")

    visit(str(root), "")
    digest = hashlib.sha256(f"{INDEX_VERSION}|{root}\n".encode() + "\n".join(stamps).encode()).hexdigest()
    return Walk(files=files, images=images, digest=digest, links_to_folders=links)


# --------------------------------------------------------------------------- split patterns, in memory


def _matcher(pattern: str):
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern)).match


def _literals(pattern: str) -> list[str]:
    """The literal runs of a glob pattern (outside [] and *): a path without one of them cannot match."""
    return [part for part in re.split(r"\[[^\]]*\]|\*+|/", pattern) if part]


def _resolve(pattern: str, files: list[str], dirs: dict[str, list[int]], candidates: list[int]) -> list[str]:
    """The files `pattern` matches, in `files` order, as fsspec's glob over the folder would return them.
    `candidates`: the files holding some pattern's longest literal (the others cannot match a file pattern)."""
    if pattern == "**":
        return list(files)
    match = _matcher(pattern)
    literals = _literals(pattern)
    if pattern.endswith("/**"):
        # a folder pattern: whether a file matches depends on its folder only, so test one name per folder
        hits = []
        for folder, members in dirs.items():
            if folder and all(lit in folder for lit in literals) and match(folder + "/_"):
                hits.extend(members)
        return [files[i] for i in sorted(hits)]
    return [files[i] for i in candidates if match(files[i])]


def _patterns() -> list[tuple[str, dict[str, list[str]] | None]]:
    """`datasets`' default pattern tables in the order it tries them: (sharded pattern, None) first."""
    from datasets import data_files as df

    tables = [(p.replace("{split}", "*"), None) for p in df.ALL_SPLIT_PATTERNS]
    return tables + [("", table) for table in df.ALL_DEFAULT_PATTERNS]


def resolve_splits(files: list[str]) -> dict[str, list[str]] | None:
    """Split name -> files, by `datasets`' default patterns tried in its order (the first table that
    matches a file wins); None for the sharded `data/<split>-...` layout (not reproduced here)."""
    dirs: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        dirs.setdefault(f.rpartition("/")[0], []).append(i)
    tables = _patterns()
    every = [p for sharded, table in tables for p in ([sharded] if table is None else sum(table.values(), []))]
    # one search per file for any pattern's longest literal: a flat class folder has no candidate
    longest = {max(_literals(p), key=len) for p in every if p != "**" and not p.endswith("/**") and _literals(p)}
    anywhere = re.compile("|".join(re.escape(lit) for lit in sorted(longest, key=len, reverse=True)))
    candidates = [i for i, f in enumerate(files) if anywhere.search(f)]
    for sharded, table in tables:
        if table is None:
            if _resolve(sharded, files, dirs, candidates):
                return None
            continue
        found = {}
        for split, patterns in table.items():
            matched = []
            for pattern in patterns:
                matched.extend(_resolve(pattern, files, dirs, candidates))
            if matched:
                found[str(split)] = matched
        if found:
            return found
    return {}


# --------------------------------------------------------------------------- the index and its cache


@dataclass
class FolderIndex:
    """What `load_dataset("imagefolder")` would build: per split the image paths (relative to the
    root) and label indices (None: no label column), and the class names."""

    splits: dict[str, list[str]]
    labels: dict[str, list[int]] | None
    class_names: list[str]
    digest: str


def build_index(w: Walk) -> FolderIndex | None:
    """The index of a walked folder, by `datasets`' rules (folder_based_builder), or None where they
    take a path not reproduced here (metadata files, archives, links to folders, a split without images)."""
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder

    if w.links_to_folders:
        return None
    resolved = resolve_splits(w.files)
    if not resolved:
        return None
    extensions = _image_extensions()
    metadata_names = set(FolderBasedBuilder.METADATA_FILENAMES)
    splits = {}
    for split, files in resolved.items():
        if any(f.rpartition("/")[2] in metadata_names or f.lower().endswith(".zip") for f in files):
            return None
        splits[split] = [f for f in files if _is_image(f.rpartition("/")[2], extensions)]
        if not splits[split]:
            return None
    # labels: the image's folder name. `datasets` decides per split, on the names and depths seen so
    # far (splits in order), to add them when all images share one depth and there are >= 2 names;
    # the splits disagreeing (a few odd files) is left to it
    folder_of = {split: [f.rpartition("/")[0].rpartition("/")[2] for f in files] for split, files in splits.items()}
    seen_names, seen_depths, decisions = set(), set(), set()
    for split, files in splits.items():
        seen_names.update(folder_of[split])
        seen_depths.update(f.count("/") for f in files)
        decisions.add(len(seen_names) > 1 and len(seen_depths) == 1)
    if len(decisions) > 1:
        return None
    if decisions == {False}:
        return FolderIndex(splits, None, [], w.digest)
    names = sorted(seen_names)
    index = {n: i for i, n in enumerate(names)}
    labels = {split: [index[n] for n in folders] for split, folders in folder_of.items()}
    return FolderIndex(splits, labels, names, w.digest)


def _cache_path(root: Path) -> Path:
    import datasets

    key = hashlib.sha256(str(root).encode()).hexdigest()[:24]
    return Path(datasets.config.HF_DATASETS_CACHE) / _INDEX_DIR / f"{key}.arrow"


def _save(path: Path, index: FolderIndex) -> None:
    """One Arrow file: rows (split, path, label), the digest and class names in its metadata. Atomic;
    a cache that cannot be written (read-only shared cache) only costs the next start."""
    import pyarrow as pa

    split_col, path_col, label_col = [], [], []
    for split, files in index.splits.items():
        split_col += [split] * len(files)
        path_col += files
        label_col += index.labels[split] if index.labels else [-1] * len(files)
    meta = {"digest": index.digest, "class_names": index.class_names, "labelled": index.labels is not None}
    table = pa.table({"split": split_col, "path": path_col, "label": pa.array(label_col, pa.int64())})
    table = table.replace_schema_metadata({"ddp_finetune": json.dumps(meta)})
    tmp = path.with_name(f".{path.name}.{unique_tag()}.tmp")  # ranks of nodes sharing the cache write it at once
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except (OSError, pa.ArrowException):  # read-only, full or not a folder: nothing half-written is left
        with contextlib.suppress(OSError):
            tmp.unlink()


def _load(path: Path, digest: str) -> FolderIndex | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = json.loads(table.schema.metadata[b"ddp_finetune"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    if meta.get("digest") != digest:
        return None
    splits, labels = {}, {} if meta["labelled"] else None
    rows = table.to_pydict()
    for split, rel, label in zip(rows["split"], rows["path"], rows["label"]):
        splits.setdefault(split, []).append(rel)
        if labels is not None:
            labels.setdefault(split, []).append(label)
    return FolderIndex(splits, labels, meta["class_names"], digest)


def folder_index(root) -> tuple[FolderIndex | None, bool]:
    """(the folder's index or None where `load_dataset` must do it, whether it came from the cache)."""
    root = Path(root).expanduser().resolve()
    w = walk(root)
    cache = _cache_path(root)
    cached = _load(cache, w.digest)
    if cached is not None:
        return cached, True
    index = build_index(w)
    if index is not None:
        _save(cache, index)
    return index, False


def load_image_folder(path):
    """`datasets.load_dataset("imagefolder", data_dir=path)`'s DatasetDict from the folder index; None
    where the layout needs `load_dataset` itself (see the module docstring)."""
    import datasets

    root = Path(path).expanduser().resolve()
    index, _ = folder_index(root)
    if index is None:
        return None
    import pyarrow as pa
    from datasets.table import InMemoryTable

    out = {}
    for split, files in index.splits.items():
        # the Arrow columns an Image feature stores ({bytes: null, path}), built whole: from_dict would
        # encode the paths one by one
        paths = pa.array([f"{root}/{f}" for f in files], pa.string())
        columns = {"image": pa.StructArray.from_arrays([pa.nulls(len(files), pa.binary()), paths], ["bytes", "path"])}
        features = {"image": datasets.Image()}
        if index.labels is not None:
            columns["label"] = pa.array(index.labels[split], pa.int64())
            features["label"] = datasets.ClassLabel(names=index.class_names)
        info = datasets.DatasetInfo(features=datasets.Features(features))
        # the fingerprint follows the files' sizes and times: the image check's cache sees a change
        fingerprint = hashlib.sha256(f"{index.digest}|{split}".encode()).hexdigest()[:16]
        out[split] = datasets.Dataset(InMemoryTable(pa.table(columns)), info=info, fingerprint=fingerprint)
    return datasets.DatasetDict(out)
