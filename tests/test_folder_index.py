"""The image folder index (folder_index.py): the same splits, rows, order and labels as
`datasets.load_dataset("imagefolder", data_dir=...)`, from one directory walk, cached per folder
and built again when a file is added, removed or replaced."""

from __future__ import annotations

import shutil

import datasets
import pytest
from datagen import make_image_folder
from PIL import Image

from ddp_finetune.data import folder_index
from ddp_finetune.data.folder_index import load_image_folder


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A private `datasets` cache: the index cache and load_dataset's arrow files of one test stay in it."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def _paths(ds) -> list[str]:
    return [cell["path"] for cell in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def _same_as_datasets(root) -> datasets.DatasetDict:
    ours = load_image_folder(root)
    assert ours is not None, "the index reads this layout itself"
    theirs = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(root.parent / "hf-load"))
    assert list(ours) == list(theirs), "the same splits, in the same order"
    for split in theirs:
        assert ours[split].features == theirs[split].features, split  # class names and their order
        assert _paths(ours[split]) == _paths(theirs[split]), split  # rows and their order
        if "label" in theirs[split].features:
            assert ours[split]["label"] == theirs[split]["label"], split
    return ours


def _pixel(path, name):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path / name)


def test_flat_folder_with_names_that_sort_differently_by_folder_and_by_path(tmp_path):
    # "a" < "a-b" as names, but "a-b/0.png" < "a/0.png" as paths ("-" < "/"): datasets sorts by path
    root = make_image_folder(tmp_path / "flat", classes=("cat", "a", "a-b", "a.c", "B"), per_class=3)
    ours = _same_as_datasets(root)
    assert ours["train"].features["label"].names == ["B", "a", "a-b", "a.c", "cat"]


def test_split_folders(tmp_path):
    ours = _same_as_datasets(make_image_folder(tmp_path / "s", per_class=3, splits=["train", "validation", "test"]))
    assert {s: len(d) for s, d in ours.items()} == {"train": 9, "validation": 9, "test": 9}
    _same_as_datasets(make_image_folder(tmp_path / "s2", per_class=2, splits=["training", "val"]))


def test_nested_class_folders(tmp_path):
    # images at two depths: datasets adds no label column (load_splits then explains why)
    root = make_image_folder(tmp_path / "nested", per_class=2)
    make_image_folder(root / "cat" / "sub", classes=("x",), per_class=2)
    assert "label" not in _same_as_datasets(root)["train"].features
    # every image one level deeper, in folders of the same name: one class, no label either
    deep = make_image_folder(tmp_path / "deep", classes=("cat", "dog"), per_class=2)
    for c in ("cat", "dog"):
        (deep / c / "inner").mkdir()
        for f in list((deep / c).glob("*.png")):
            f.rename(deep / c / "inner" / f.name)
    assert "label" not in _same_as_datasets(deep)["train"].features


def test_mixed_extensions_hidden_files_and_non_images(tmp_path):
    root = make_image_folder(tmp_path / "mixed", per_class=3)
    for folder, name in (("cat", "x.JPG"), ("dog", "y.jpeg"), ("dog", "z.Png"), ("fox", "w.webp"), ("fox", "v.bmp")):
        _pixel(root / folder, name)
    shutil.copy(root / "cat" / "0.png", root / "cat" / ".hidden.png")
    make_image_folder(root / ".cache", per_class=1)  # a hidden folder of images
    (root / "__pycache__").mkdir()
    _pixel(root / "__pycache__", "a.png")
    (root / "notes.txt").write_text("not an image")
    (root / "dog" / "labels.csv").write_text("x")
    (root / "README.md").write_text("x")
    ours = _same_as_datasets(root)
    assert len(ours["train"]) == 9 + 5


def test_split_keywords_in_file_names(tmp_path):
    # datasets' file-name patterns ("train_1", "x-test") make splits when no folder is named like one
    root = make_image_folder(tmp_path / "names", per_class=2)
    _pixel(root / "cat", "train_1.png")
    _pixel(root / "dog", "train-2.png")
    _pixel(root / "dog", "x-test.png")
    _pixel(root / "fox", "y-test.png")
    ours = _same_as_datasets(root)
    assert {s: len(d) for s, d in ours.items()} == {"train": 2, "test": 2}


def test_layouts_it_does_not_reproduce_are_left_to_datasets(tmp_path):
    # class folders named like splits: datasets makes them splits and labels them differently per
    # split; the index declines, and load_splits then takes load_dataset's path
    root = make_image_folder(tmp_path / "odd", classes=("my_val", "train2", "other"), per_class=2)
    assert load_image_folder(root) is None
    meta = make_image_folder(tmp_path / "meta", per_class=2)
    (meta / "metadata.csv").write_text("file_name,text\ncat/0.png,x\n")
    assert load_image_folder(meta) is None


def test_the_index_is_cached_and_rebuilt_when_a_file_is_added_removed_or_replaced(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "images", per_class=3)
    built = []
    real = folder_index.build_index
    monkeypatch.setattr(folder_index, "build_index", lambda w: built.append(1) or real(w))

    def load():
        ds = load_image_folder(root)["train"]
        return _paths(ds), ds._fingerprint

    paths, fingerprint = load()
    assert len(built) == 1 and len(paths) == 9
    assert load() == (paths, fingerprint) and len(built) == 1, "an unchanged folder reuses its index"

    _pixel(root / "dog", "new.png")  # added
    added, fp_added = load()
    assert len(built) == 2 and str(root / "dog" / "new.png") in added and fp_added != fingerprint

    (root / "cat" / "1.png").unlink()  # removed
    removed, fp_removed = load()
    assert len(built) == 3 and str(root / "cat" / "1.png") not in removed and fp_removed != fp_added

    # replaced in place: no folder's time changes, the file's size and time do
    (root / "fox" / "0.png").write_bytes((root / "cat" / "0.png").read_bytes() + b"\0")
    replaced, fp_replaced = load()
    assert len(built) == 4 and replaced == removed and fp_replaced != fp_removed
    assert load()[1] == fp_replaced and len(built) == 4


def test_a_corrupt_index_cache_is_rebuilt(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    first = _paths(load_image_folder(root)["train"])
    cache = folder_index._cache_path(root.resolve())
    cache.write_bytes(b"not arrow")
    assert _paths(load_image_folder(root)["train"]) == first


@pytest.mark.parametrize("fraction, seed", [(0.1, 0), (0.25, 3), (0.5, 7)])
def test_the_seeded_split_is_datasets_stratified_split(tmp_path, fraction, seed):
    """data._stratified_split reads the labels as one array (datasets reads them row by row: ~0.3 ms
    per image on every start) and must give datasets' own rows, or resumed runs would change split."""
    from ddp_finetune.data.sources import _stratified_split

    ds = load_image_folder(make_image_folder(tmp_path / "images", per_class=9, size=4))["train"]
    ours = _stratified_split(ds, "label", fraction, seed)
    theirs = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    for part in ("train", "test"):
        assert _paths(ours[part]) == _paths(theirs[part]), part
    tiny = ds.select([0, 9, 18])  # one image per class: datasets refuses to stratify, and so does this
    assert _stratified_split(tiny, "label", 0.34, seed) is None


def test_a_column_is_read_in_one_arrow_take_and_equals_datasets_own_read(tmp_path):
    """checks.column_array reads a label column through the dataset's indices mapping itself (datasets'
    own read turns the mapping into a Python list: 0.6 s at 270k images, every start); it must give
    datasets' values in datasets' order for every way a split is made, or labels would go to the wrong
    images. A `datasets` whose internals change shape falls back to its own read."""
    from ddp_finetune.data.checks import column_array, column_values

    ds = load_image_folder(make_image_folder(tmp_path / "images", per_class=7, size=4))["train"]
    made = {
        "plain": ds,
        "select": ds.select([20, 3, 3, 0, 11]),
        "shuffle": ds.shuffle(seed=5),
        "split": ds.train_test_split(test_size=0.3, seed=1)["test"],
        "filter": ds.shuffle(seed=2).filter(lambda row: row["label"] != 1),
        "select of a select": ds.shuffle(seed=3).select(range(4, 15)),
        "flattened": ds.shuffle(seed=4).flatten_indices(),
        "empty": ds.select([]),
    }
    for how, part in made.items():
        theirs = part.select_columns(["label"]).with_format("arrow")[:]["label"].to_pylist()
        assert column_values(part, "label") == theirs == [row["label"] for row in part], how
        assert column_array(part, "label").to_pylist() == theirs, how


@pytest.mark.parametrize(
    "labels, error",
    [
        ([0, 1, 2, 1], None),
        ([0, 3, 1, 2], r"\d+ labels of the training split are outside the model.s 3 classes 0..2, e.g. 3"),
        ([-1, 0, 1, 2], "-1 marks an unlabelled row"),
    ],
)
def test_the_label_range_check_in_arrow_finds_what_the_row_by_row_check_finds(tmp_path, labels, error):
    from ddp_finetune.data.checks import check_labels
    from ddp_finetune.data.sources import Classes, Splits
    from ddp_finetune.errors import UserError

    ds = datasets.Dataset.from_dict({"label": labels * 5}).shuffle(seed=0).select(range(3, 18))
    splits = Splits(
        train=ds, val=ds.select([0, 1]), val_source="train", class_names=["a", "b", "c"], label_kind="index"
    )
    classes = Classes(names=("a", "b", "c"), outputs=3, label_kind="index")
    if error is None:
        check_labels("classification", splits, classes, "label")
    else:
        with pytest.raises(UserError, match=error):
            check_labels("classification", splits, classes, "label")


def test_an_index_cache_that_cannot_be_written_costs_only_the_next_start(tmp_path, hf_cache, monkeypatch):
    """A full disk in the middle of the cache write (or a read-only cache): the index is still used, no
    half-written or temporary file is left, and the next start walks and indexes the folder again."""
    import pyarrow as pa

    root = make_image_folder(tmp_path / "images", per_class=3)
    real = pa.ipc.new_file

    class Full:
        def __init__(self, sink, schema):
            self.writer = real(sink, schema)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.writer.close()

        def write_table(self, table):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(pa.ipc, "new_file", Full)
    first = load_image_folder(root)
    assert _paths(first["train"]) and first["train"]["label"]
    cache_dir = hf_cache / folder_index._INDEX_DIR
    assert list(cache_dir.iterdir()) == [], "no temporary or partial index file left"
    monkeypatch.setattr(pa.ipc, "new_file", real)
    assert folder_index.folder_index(root)[1] is False, "nothing cached: built again"
    assert folder_index.folder_index(root)[1] is True


def test_a_file_removed_during_the_walk_is_not_data_and_an_unreadable_folder_is_one_line(tmp_path, monkeypatch):
    """A file deleted between its folder's listing and its stat (data still being synced) is left out, not
    a FileNotFoundError traceback; a folder that cannot be listed is one line naming it (tests run as
    root, where permissions do not stop a listing: the error is injected)."""
    import os

    from ddp_finetune.config import config_from_dict
    from ddp_finetune.data.sources import load_splits
    from ddp_finetune.errors import UserError

    root = make_image_folder(tmp_path / "images", per_class=3)
    gone = str(root / "dog" / "1.png")
    real_stat = os.stat

    def stat_after_delete(path, *a, **k):
        if str(path) == gone and os.path.lexists(gone):
            os.unlink(gone)  # the sync removed it just now
        return real_stat(path, *a, **k)

    monkeypatch.setattr(folder_index.os, "stat", stat_after_delete)
    ds = load_image_folder(root)["train"]
    assert gone not in _paths(ds) and len(ds) == 8
    monkeypatch.setattr(folder_index.os, "stat", real_stat)

    real_scandir = os.scandir

    def refuse(path):
        if str(path).endswith("/cat"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder_index.os, "scandir", refuse)
    cfg = config_from_dict({"data": {"path": str(root)}, "output_dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match=rf"data.path='{root}' cannot be read \({root}/cat\): Permission denied; fix"):
        load_splits(cfg.data, 0)


def test_an_unusable_datasets_cache_costs_only_speed(tmp_path, monkeypatch):
    """HF_DATASETS_CACHE under a file (or read-only, or full): the folder index, the image check and the
    segmentation class count are computed every start, and the start goes on."""
    from datagen import make_mask_folder

    from ddp_finetune.config import config_from_dict
    from ddp_finetune.data.image_check import check_images
    from ddp_finetune.data.sources import decide_classes, load_splits

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(blocker / "cache"))
    root = make_image_folder(tmp_path / "images", per_class=4)
    cfg = config_from_dict({"data": {"path": str(root)}, "output_dir": str(tmp_path / "run")})
    for _ in range(2):
        assert folder_index.folder_index(root)[1] is False, "nothing cached, nothing raised"
        splits = check_images(cfg, load_splits(cfg.data, 0), tmp_path)
        assert any("decoded 12 images" in n for n in splits.notes)
    seg = make_mask_folder(tmp_path / "seg", n=4, image_suffix=".png")
    cfg = config_from_dict({"task": "segmentation", "data": {"path": str(seg)}, "output_dir": str(tmp_path / "r2")})
    assert decide_classes(cfg, load_splits(cfg.data, 0, "segmentation")).outputs == 3
