"""`ddp-finetune pack FOLDER OUT` (pack.py): the packed dataset trains exactly as the folder it came
from (same rows, order, split, crops, resume), and at every world size as on one process."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from datagen import make_image_folder, make_mask_folder
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, run_cli, tiny_config

from ddp_finetune.data.pack import pack_folder
from ddp_finetune.errors import UserError


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    folder = make_image_folder(root / "images", per_class=8, size=32)
    report = pack_folder(folder, root / "packed", max_shard_size="4KB")  # several shards, as a big set has
    return folder, report


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def _classification(tmp_path, path, source, **train):
    return tiny_config(
        tmp_path,
        path,
        data={"source": source, "augment": True, "image_size": 24},
        model={"name": "mobilenet_v3_small", "freeze_bn": True},  # dropout: a random stream to resume too
        train={"epochs": 2, "batch_size": 6, **train},
    )


def test_pack_writes_every_image_byte_for_byte_in_shards(packed):
    folder, report = packed
    ds = datasets.load_from_disk(str(report.out))
    assert report.rows == {"train": 24} and list(ds) == ["train"]
    assert len(list((report.out / "train").glob("data-*.arrow"))) > 1, "sharded"
    source = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    assert ds["train"].features == source.features
    assert ds["train"]["label"] == source["label"]
    cells = ds["train"].cast_column("image", datasets.Image(decode=False))["image"]
    files = [c["path"] for c in source.cast_column("image", datasets.Image(decode=False))["image"]]
    assert [c["bytes"] for c in cells] == [open(f, "rb").read() for f in files]


def test_packed_data_trains_bit_identical_to_its_folder_and_resumes_exactly(tmp_path, packed):
    folder, report = packed
    fit_in_process(_classification(tmp_path / "folder", folder, "imagefolder"))
    fit_in_process(_classification(tmp_path / "disk", report.out, "disk"))
    a, b = tmp_path / "folder" / "run", tmp_path / "disk" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _losses(a) == _losses(b)
    parts = _classification(tmp_path / "parts", report.out, "disk")
    fit_in_process(parts, "train.max_steps=4", "checkpoint.every_n_steps=4")  # stops mid-epoch 2
    fit_in_process(parts, "checkpoint.resume=auto")
    assert max_abs_diff(load_weights(a), load_weights(tmp_path / "parts" / "run")) == 0.0
    assert _losses(tmp_path / "parts" / "run") == _losses(a)


def test_packed_segmentation_trains_bit_identical_to_its_folder(tmp_path):
    folder = make_mask_folder(tmp_path / "shapes", n=12, size=32)
    report = pack_folder(folder, tmp_path / "shapes.packed", task="segmentation")
    ds = datasets.load_from_disk(str(report.out))["train"]
    assert ds.features["mask"] == datasets.Image() and len(ds) == 12
    runs = {}
    for source, path in (("imagefolder", folder), ("disk", report.out)):
        config = tiny_config(
            tmp_path / source,
            path,
            task="segmentation",
            data={"source": source, "image_size": 32, "augment": True, "val_fraction": 2 / 12},
            model={"name": "lraspp_mobilenet_v3_large", "freeze_bn": True},
            train={"epochs": 1, "batch_size": 5},
            loss={"name": "dice"},
        )
        fit_in_process(config)
        runs[source] = tmp_path / source / "run"
    assert max_abs_diff(load_weights(runs["imagefolder"]), load_weights(runs["disk"])) == 0.0
    assert _losses(runs["imagefolder"]) == _losses(runs["disk"])


@pytest.mark.slow
def test_two_processes_on_packed_data_train_what_one_process_at_grad_accum_2_trains(tmp_path, packed):
    _, report = packed
    one = _classification(tmp_path / "one", report.out, "disk", grad_accum=2)
    two = _classification(tmp_path / "two", report.out, "disk")
    fit_in_process(one, "model.name=resnet18")
    launch_2proc("train", two, "model.name=resnet18")
    a, b = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) <= 1e-6
    assert [s for s, _ in _losses(a)] == [s for s, _ in _losses(b)]
    assert [v for _, v in _losses(b)] == pytest.approx([v for _, v in _losses(a)], abs=1e-6)


def test_pack_command_refuses_an_existing_out_and_overrides(tmp_path, packed):
    folder, report = packed
    with pytest.raises(UserError, match="exists; pack never overwrites"):
        pack_folder(folder, report.out)
    proc = run_cli("pack", folder, report.out, check=False)
    assert proc.returncode == 2 and "pack never overwrites" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("pack", folder, tmp_path / "new", "train.epochs=2", check=False)
    assert proc.returncode == 2 and "pack takes no key=value overrides" in proc.stderr
    proc = run_cli("pack", folder, tmp_path / "new")
    assert "packed 24 train images" in proc.stdout and "data.source=disk" in proc.stdout
    assert datasets.load_from_disk(str(tmp_path / "new"))["train"].num_rows == 24
    assert not list(tmp_path.glob(".new.partial-*")), "no temporary folder left"


def test_pack_refuses_an_out_inside_the_folder_and_a_bad_shard_size_before_reading_an_image(tmp_path, monkeypatch):
    """OUT inside FOLDER would make the packed copy part of the image folder (the next start would read
    its `train/` as a split); both refusals come before any image is read, as one line with exit 2."""
    from ddp_finetune.data import sources

    folder = make_image_folder(tmp_path / "images", per_class=2, size=8)
    read = []
    monkeypatch.setattr(sources, "load_dataset_dict", lambda *a, **k: read.append(a))
    with pytest.raises(UserError, match=r"OUT .*packed is inside FOLDER .*images: .*give an OUT outside it"):
        pack_folder(folder, folder / "packed")
    with pytest.raises(UserError, match=r"OUT .* is inside FOLDER"):
        pack_folder(folder, folder / "cat" / "deeper" / "packed")
    for size in ("12QB", "0", "-5MB", "lots"):
        with pytest.raises(UserError, match=rf"--max-shard-size '{size}' is not a size; give a positive size"):
            pack_folder(folder, tmp_path / "out", max_shard_size=size)
    assert not read and not (folder / "packed").exists() and not (tmp_path / "out").exists()
    for args in ((folder, folder / "packed"), (folder, tmp_path / "out", "--max-shard-size", "12QB")):
        proc = run_cli("pack", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_folder_holding_a_packed_copy_is_one_line_not_a_traceback(tmp_path, packed):
    """A packed copy moved into the image folder (its `train/` folder is a split by `datasets`' rules, one
    without images): training from the folder stops with one line that says what to move."""
    import shutil

    folder, report = packed
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copytree(report.out, mixed / "packed")
    proc = run_cli("train", tiny_config(tmp_path, mixed), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"data.path={str(mixed)!r} cannot be read as an image folder" in proc.stderr
    assert "move other data (a packed copy, notes) out of the folder" in proc.stderr


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "the saved dataset cannot be read (Expected to be able to read"),
        ("delete", "is a saved dataset with a file missing ("),
        ("state", "the saved dataset cannot be read ("),
    ],
)
def test_a_damaged_packed_dataset_is_one_line(tmp_path, packed, damage, message):
    """A shard cut short (a copy interrupted), a shard gone, a broken state.json: one line naming the data and
    the fix at start, not a pyarrow traceback."""
    import shutil

    _, report = packed
    copy = tmp_path / "copy"
    shutil.copytree(report.out, copy)
    shard = sorted((copy / "train").glob("*.arrow"))[1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "delete":
        shard.unlink()
    else:
        (copy / "train" / "state.json").write_text("{")
    proc = run_cli("train", _classification(tmp_path, copy, "disk"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"ddp-finetune: error: data.path={str(copy)!r}") and message in proc.stderr
    assert "again from its source" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_killed_pack_leaves_its_temporary_folder_to_the_next_pack_to_remove(tmp_path, packed):
    """kill -9 during a pack leaves `.OUT.partial-<pid>-<random>-<host>` beside OUT: the next pack into the
    same OUT removes it when that process is gone; a live pack's (or another host's) is left alone."""
    import os
    import socket
    import subprocess

    folder, _ = packed
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that ran on this host and is gone
    host = socket.gethostname()
    killed = tmp_path / f".new.partial-{dead.pid}-deadbeef-{host}"
    live = tmp_path / f".new.partial-{os.getpid()}-cafef00d-{host}"
    other = tmp_path / f".new.partial-{dead.pid}-0badf00d-another-host"
    for leftover in (killed, live, other):
        (leftover / "dataset").mkdir(parents=True)
    pack_folder(folder, tmp_path / "new")
    assert not killed.exists() and live.exists() and other.exists()
    assert datasets.load_from_disk(str(tmp_path / "new"))["train"].num_rows == 24


def test_pack_into_a_path_under_a_file_or_raced_by_another_pack_is_one_line(tmp_path, packed, monkeypatch):
    """OUT under a file: one line before any image is read. Two packs into one OUT at once: the one that
    finishes second stops with one line and leaves the first one's dataset as it is."""
    import os

    from ddp_finetune.data import pack as pack_mod

    folder, _ = packed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("pack", folder, blocker / "out", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"OUT {str(blocker / 'out')!r}: its folder {str(blocker)!r} is a file" in proc.stderr

    out = tmp_path / "out"
    real_replace = os.replace

    def other_pack_first(src, dst):  # the other pack renames its dataset into OUT just before this one
        if Path(dst) == out:
            out.mkdir()
            (out / "theirs").write_text("kept")
        return real_replace(src, dst)

    monkeypatch.setattr(pack_mod.os, "replace", other_pack_first)
    with pytest.raises(UserError, match=rf"{out} was written by another pack while this one ran; it was kept"):
        pack_folder(folder, out)
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".out.partial-*")), "this pack's temporary folder is removed"
