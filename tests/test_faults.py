"""Bad input and faults: each ends in a one-line error that names the file or value and the fix,
or in a documented recovery that loses nothing (README, "Failure behaviour").

Data (unreadable, 16-bit and exotic images; empty, single-class folders; labels), the output
folder (not a folder, read-only, too small, full during a save, used by another run, leftovers),
checkpoints (damaged, of another model) and metrics.jsonl after kills and resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from datagen import make_image_folder
from helpers import (
    SMALL_MODEL,
    child_env,
    datasets_of,
    fit_in_process,
    launch_2proc,
    load_weights,
    max_abs_diff,
    read_metrics,
    tiny_config,
)
from PIL import Image

from ddp_finetune.config import config_from_dict
from ddp_finetune.data.images import open_rgb
from ddp_finetune.data.sources import decide_classes, load_splits
from ddp_finetune.errors import UserError

# modules this battery introduced are imported inside the tests that call them directly, so
# that every other test also runs (and fails) on the code from before them


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private `datasets` cache: the image check's cache entries of one test stay in it."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def _break_images(folder: Path) -> list[Path]:
    """A corrupt JPEG (random bytes), a truncated PNG and a 0-byte image among the good ones."""
    corrupt, truncated, empty = (
        folder / "cat" / "corrupt.jpg",
        folder / "dog" / "truncated.png",
        folder / "fox" / "empty.png",
    )
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    good = (folder / "dog" / "0.png").read_bytes()
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: len(good) // 2 + 200])
    empty.write_bytes(b"")
    return [corrupt, truncated, empty]


# --------------------------------------------------------------------------- data


def test_unreadable_images_are_listed_before_training(tmp_path, image_folder, hf_cache):
    bad = _break_images(image_folder)
    with pytest.raises(UserError) as exc:
        fit_in_process(tiny_config(tmp_path, image_folder))
    text = _one_line(exc)
    assert text.startswith("3 of 27 images cannot be read") and "data.bad_images=skip" in text
    assert all(str(p) in text for p in bad), text
    listing = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert len(listing) == 4 and {line.split("\t")[2] for line in listing[1:]} == {str(p) for p in bad}
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "nothing trained"


def test_skip_trains_without_unreadable_images_and_says_so(tmp_path, image_folder, hf_cache, capsys):
    _break_images(image_folder)
    summary = fit_in_process(tiny_config(tmp_path, image_folder, data={"bad_images": "skip"}, train={"epochs": 1}))
    out = capsys.readouterr().out
    assert "data: skipped 3 unreadable images of 27 (data.bad_images=skip" in out
    # the split is made first (seeded, as without bad images); the bad rows then leave their part
    train, val = map(int, re.search(r"data: (\d+) train images, (\d+) validation", out).groups())
    assert train + val == 24 and summary["steps"] == train // 6


def test_the_image_check_is_cached_per_dataset(tmp_path, image_folder, hf_cache, monkeypatch):
    from ddp_finetune.data import image_check

    calls = []
    real = image_check.image_problem
    monkeypatch.setattr(image_check, "image_problem", lambda *a: calls.append(1) or real(*a))
    cfg = config_from_dict({"data": {"path": str(image_folder), "val_fraction": 0.25}, "output_dir": str(tmp_path)})
    check = lambda: image_check.check_images(cfg, load_splits(cfg.data, 0), tmp_path)  # noqa: E731
    assert check().notes and len(calls) == 24
    assert not check().notes and len(calls) == 24, "a restart on the same data decodes nothing"
    (image_folder / "cat" / "0.png").write_bytes(b"")  # the data changed: checked again
    with pytest.raises(UserError, match=r"1 of 24 images cannot be read: .*cat/0.png \(empty file"):
        check()
    assert len(calls) > 24


@pytest.mark.parametrize("source", ["imagefolder", "disk"])
def test_the_image_check_decodes_on_every_cpu_of_the_rank(tmp_path, hf_cache, monkeypatch, source):
    """A share of 256 rows or more goes to a pool of `usable_cpus` processes, which read the rows
    from the split's own table (paths of a folder, bytes of packed data): the same bad rows, in the
    same order, as one process finds."""
    from ddp_finetune import distributed as dist_utils
    from ddp_finetune.data import image_check
    from ddp_finetune.data.pack import pack_folder

    root = make_image_folder(tmp_path / "many", classes=("a", "b"), per_class=300, size=4)
    broken = [root / "a" / "7.png", root / "b" / "250.png"]
    for f in broken:
        f.write_bytes(b"")
    path = root if source == "imagefolder" else pack_folder(root, tmp_path / "packed").out
    cfg = config_from_dict(
        {"data": {"path": str(path), "source": source, "val_split": "train"}, "output_dir": str(tmp_path)}
    )
    splits = load_splits(cfg.data, 0)
    pools = []
    real_pool = image_check._pool
    monkeypatch.setattr(image_check, "_pool", lambda w, rows: pools.append(w) or real_pool(w, rows))
    monkeypatch.setattr(dist_utils, "usable_cpus", lambda: (2, "test"))
    assert image_check.check_workers() == 2
    found, fresh = image_check._check_split("train", splits.train, image_check._columns(cfg, splits.train))
    assert fresh and pools == [2] and image_check._SHARED is None
    folder_ds = load_splits(config_from_dict({"data": {"path": str(root), "val_split": "train"}}).data, 0).train
    paths = [v["path"] for v in folder_ds.select_columns(["image"]).with_format("arrow")["image"].to_pylist()]
    assert [b.row for b in found] == sorted(paths.index(str(f)) for f in broken)  # packing keeps the rows
    if source == "imagefolder":
        assert [b.name for b in found] == [str(f) for f in broken] and all("empty file" in b.reason for b in found)
    else:  # the bytes are stored with the file's name
        assert [b.name for b in found] == [f.name for f in broken]
    monkeypatch.setattr(dist_utils, "usable_cpus", lambda: (1, "test"))
    one = image_check._scan("train", splits.train, image_check._columns(cfg, splits.train), 0, len(splits.train))
    assert one == found and image_check._pool(1, len(splits.train)) is None


def test_segmentation_masks_are_checked_too(tmp_path, hf_cache):
    from datagen import make_mask_folder

    from ddp_finetune.data import image_check

    root = make_mask_folder(tmp_path / "shapes", n=8, size=16)
    (root / "masks" / "003.png").write_bytes(b"")
    cfg = config_from_dict({"task": "segmentation", "data": {"path": str(root)}, "output_dir": str(tmp_path)})
    with pytest.raises(UserError, match=r"1 of 16 images cannot be read: .*masks/003.png \(empty file"):
        image_check.check_images(cfg, load_splits(cfg.data, 0, "segmentation"), tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_goes_bad_during_training_is_one_line(tmp_path, image_folder, hf_cache, monkeypatch, workers):
    from ddp_finetune.data import image_check
    from ddp_finetune.training import run as run_module

    def check_then_break(cfg, splits, out):
        splits = image_check.check_images(cfg, splits, out)
        for f in (image_folder / "cat").iterdir():
            f.write_bytes(b"\x89PNG garbage")  # every cat breaks after the check: the first batch meets one
        return splits

    monkeypatch.setattr(run_module, "check_images", check_then_break)
    with pytest.raises(UserError) as exc:
        fit_in_process(tiny_config(tmp_path, image_folder, data={"num_workers": workers}))
    text = _one_line(exc)
    assert text.startswith(f"image {image_folder / 'cat'}") and "cannot be read (not an image file" in text


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    dark = np.random.default_rng(0).integers(0, 11850, (32, 32)).astype(np.uint16)  # mean ~5925 of 65535
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert Image.open(tmp_path / "dark.png").mode == "I;16"
    rgb = np.asarray(open_rgb(tmp_path / "dark.png"))
    assert rgb.shape == (32, 32, 3) and abs(rgb.mean() - dark.mean() * 255 / 65535) < 0.5


def test_a_sixteen_bit_folder_trains_on_the_same_pixels_as_its_eight_bit_twin(tmp_path):
    eight = make_image_folder(tmp_path / "eight", per_class=4, mode="L")
    sixteen = tmp_path / "sixteen"
    for f in eight.rglob("*.png"):
        target = sixteen / f.relative_to(eight)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(f)).astype(np.uint16) * 257).save(target)  # 255 -> 65535
    sets = [datasets_of(config_from_dict({"data": {"path": str(p), "image_size": 16}}))[1] for p in (eight, sixteen)]
    assert len(sets[0]) == len(sets[1]) > 0
    for i in range(len(sets[0])):
        assert (sets[0][i][0] == sets[1][i][0]).all()


def test_other_modes_are_converted_or_refused_in_one_line():
    gray = np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)
    source = Image.fromarray(gray)
    converted = {mode: source.convert(mode) for mode in ("LA", "PA", "CMYK", "P", "1")}
    converted["I"] = Image.fromarray(gray.astype(np.int32) * 257)  # 16-bit data, as older Pillow opens a 16-bit PNG
    converted["I;16B"] = Image.frombytes("I;16B", (8, 8), (gray.astype(">u2") * 257).tobytes())  # big-endian TIFF
    for mode, image in converted.items():
        assert image.mode == mode
        rgb = open_rgb(image)
        assert rgb.mode == "RGB", mode
        if mode in ("LA", "I", "I;16B"):
            assert np.abs(np.asarray(rgb)[..., 0].astype(int) - gray).max() <= 1, mode
    refused = {
        "mode F .* has no white level": Image.fromarray(np.full((4, 4), 0.5, np.float32)),
        "mode I .* outside 16-bit range": Image.fromarray(np.full((4, 4), 70000, np.int32)),
    }
    for match, image in refused.items():
        with pytest.raises(UserError, match=match) as exc:
            open_rgb(image)
        _one_line(exc)


def test_the_start_up_check_lists_images_that_cannot_become_rgb(tmp_path):
    from ddp_finetune.data.images import image_problem

    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    assert image_problem(str(tmp_path / "float.tif")).startswith("mode F (floating point) has no white level")
    assert image_problem({"bytes": (tmp_path / "float.tif").read_bytes(), "path": None}, rgb=False) is None


def _cfg(path, **data):
    return config_from_dict({"data": {"path": str(path), "image_size": 16, **data}, "train": {"batch_size": 4}})


def test_empty_data_folder_is_one_line(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds no images .*one folder per class") as exc:
        load_splits(_cfg(tmp_path / "empty").data, 0)
    _one_line(exc)


def test_a_single_class_folder_is_one_line_with_the_real_fix(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("cat",), per_class=4)
    (root / "dog").mkdir()
    with pytest.raises(UserError, match=r"single class folder 'cat' \(the folders 'dog' hold no images\).*at least 2"):
        load_splits(_cfg(root).data, 0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (root / "cat").iterdir():
        shutil.copy(f, flat / f.name)
    with pytest.raises(UserError, match=r"holds images but no class folders; put each class's images in its own"):
        load_splits(_cfg(flat).data, 0)


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path):
    root = make_image_folder(tmp_path / "three", per_class=4)
    (root / "wolf").mkdir()
    splits = load_splits(_cfg(root).data, 0)
    assert splits.class_names == ["cat", "dog", "fox"]
    assert any("warning: the folders 'wolf' of data.path hold no images" in n for n in splits.notes), splits.notes


def _saved(tmp_path, labels, features, val=None):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    feats = datasets.Features({"image": datasets.Image(), "label": features})
    parts = {"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)}
    if val is not None:
        parts["validation"] = datasets.Dataset.from_dict({"image": images[: len(val)], "label": val}, features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    return _cfg(tmp_path / "saved", source="disk")


@pytest.mark.parametrize(
    "labels, feature, val, match",
    [
        (
            [0, 1] * 4,
            datasets.ClassLabel(names=["a", "b"]),
            [0, -1, 1],
            r"1 labels of the validation .* e\.g\. -1 \(-1 marks",
        ),
        (["x", "y"] * 4, datasets.Value("string"), ["x", "z"], r"validation \(validation\) split has labels 'z'"),
        ([0] * 8, datasets.Value("int64"), None, r"have 1 class \(0\); a classifier needs at least 2"),
    ],
)
def test_labels_the_model_cannot_take_are_refused_up_front(tmp_path, labels, feature, val, match):
    cfg = _saved(tmp_path, labels, feature, val)
    with pytest.raises(UserError, match=match) as exc:
        decide_classes(cfg, load_splits(cfg.data, 0))
    _one_line(exc)


@pytest.mark.slow
def test_two_ranks_share_the_image_check_and_skip_the_same_rows(tmp_path, image_folder):
    _break_images(image_folder)
    config = tiny_config(tmp_path, image_folder, data={"bad_images": "skip"}, train={"epochs": 1})
    proc = launch_2proc("train", config)
    assert proc.stdout.count("data: skipped 3 unreadable images of 27") == 1, proc.stdout
    assert "done: 3 steps" in proc.stdout


@pytest.mark.slow
def test_two_ranks_check_their_shares_with_process_pools(tmp_path):
    """Each gloo rank forks its own pool (4 CPUs faked: 2 per rank): the same bad rows as one process."""
    import json

    from helpers import run_script_2proc

    root = make_image_folder(tmp_path / "many", classes=("a", "b"), per_class=1100, size=4)
    broken = [root / "a" / "3.png", root / "b" / "1000.png"]
    for f in broken:
        f.write_bytes(b"")
    out = tmp_path / "result.json"
    run_script_2proc(Path(__file__).parent / "scripts" / "image_check_2proc.py", root, out)
    result = json.loads(out.read_text())
    assert result["fresh"] and result["pools"] == [[2], [2]], result  # one pool of 2 per rank
    assert result["bad"] == [str(f) for f in broken]


# --------------------------------------------------------------------------- output folder


def test_output_dir_that_is_a_file_or_under_a_file_is_one_line(tmp_path, image_folder):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder") as exc:
        fit_in_process(tiny_config(tmp_path, image_folder), f"output_dir={tmp_path / 'taken'}")
    _one_line(exc)
    with pytest.raises(UserError, match=r"cannot be created: .*taken is a file"):
        fit_in_process(tiny_config(tmp_path, image_folder), f"output_dir={tmp_path / 'taken' / 'run'}")


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/ddp-faults-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root (the simulated twin runs)")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("how", ["simulated", pytest.param("tmpfs", marks=needs_mount)])
def test_read_only_output_dir_is_one_line(tmp_path, image_folder, monkeypatch, how):
    ro = tmp_path / "ro"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            stack.enter_context(_tmpfs(ro, "1m", read_only=True))
        else:
            ro.mkdir()

            def refuse(self, data):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

            monkeypatch.setattr(Path, "write_bytes", refuse)
        with pytest.raises(UserError, match=r"is not writable \(Read-only file system\)") as exc:
            fit_in_process(tiny_config(tmp_path, image_folder), f"output_dir={ro}")
        _one_line(exc)


@pytest.mark.parametrize("how", ["simulated", pytest.param("tmpfs", marks=needs_mount)])
def test_too_little_free_space_is_refused_at_start(tmp_path, image_folder, monkeypatch, how):
    small = tmp_path / "small"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            stack.enter_context(_tmpfs(small, "20m"))
        else:
            usage = shutil.disk_usage(tmp_path)
            monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=20 * 2**20))
        with pytest.raises(UserError, match=r"has 0\.0\d GiB free, less than the 0\.\d+ GiB this run may need") as exc:
            fit_in_process(tiny_config(tmp_path, image_folder), f"output_dir={small}")
        _one_line(exc)


def test_a_second_run_into_a_locked_output_dir_is_refused_then_a_dead_holder_is_taken_over(
    tmp_path, image_folder, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    code = "import sys,time; from pathlib import Path; from ddp_finetune.training.output_dir import OutputLock; "
    code += "OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tiny_config(tmp_path, image_folder, train={"epochs": 1})
        with pytest.raises(
            UserError, match=rf"is in use by another run \(pid {holder.pid} on host {socket.gethostname()}"
        ):
            fit_in_process(config)
        with pytest.raises(UserError, match="in use by another run"):
            fit_in_process(config, "checkpoint.resume=auto")  # the resume that died on a pruned checkpoint
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert fit_in_process(config)["steps"] == 3
    assert f"previous run in this output_dir (pid {holder.pid}" in capsys.readouterr().out
    assert (out / ".lock").read_text() == "", "released at the end"


class _DiskFull:
    """Make the Nth checkpoint save hit a full disk after writing part of its files."""

    def __init__(self, monkeypatch, on_call: int):
        from accelerate import Accelerator
        from safetensors import SafetensorError

        real, self.calls = Accelerator.save_state, 0

        def save_state(acc, output_dir=None, **kwargs):
            self.calls += 1
            real(acc, output_dir, **kwargs)
            if self.calls == on_call:
                # what safetensors raises (not an OSError) when the device is full
                raise SafetensorError(
                    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
                )

        monkeypatch.setattr(Accelerator, "save_state", save_state)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["simulated", pytest.param("tmpfs", marks=needs_mount)])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(
    tmp_path, image_folder, monkeypatch, how
):
    sections = dict(checkpoint={"every_n_steps": 2, "every_epoch": False, "keep_last": 1})
    fit_in_process(tiny_config(tmp_path / "whole", image_folder, **sections))
    config = tiny_config(tmp_path, image_folder, **sections)
    out = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":  # room for config, metrics and one checkpoint of ~90 MB, not for two
            stack.enter_context(_tmpfs(out, "150m"))
            monkeypatch.setattr("ddp_finetune.training.run.check_free_space", lambda *args: None)
        else:
            _DiskFull(monkeypatch, on_call=2)
        with pytest.raises(UserError) as exc:
            fit_in_process(config)
        text = _one_line(exc)
        assert "no space left on the device" in text and "previous checkpoint step_2 is intact" in text, text
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_2"], "the unfinished save removed"
        if how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=400m", str(out)], check=True)
        else:
            monkeypatch.undo()
        summary = fit_in_process(config, "checkpoint.resume=auto")
        assert summary["resumed_from"].endswith("step_2") and summary["steps"] == 6
        assert max_abs_diff(load_weights(out), load_weights(tmp_path / "whole" / "run")) == 0.0


def test_disk_full_while_writing_the_final_weights_keeps_the_last_checkpoint(tmp_path, image_folder, monkeypatch):
    from accelerate import Accelerator

    config = tiny_config(tmp_path, image_folder, train={"epochs": 1}, checkpoint={"every_n_steps": 3})
    real = Accelerator.save_model

    def full(self, model, save_directory, **kwargs):
        real(self, model, save_directory, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_model", full)
    with pytest.raises(UserError, match=r"while writing final/; the last checkpoint step_3 is intact") as exc:
        fit_in_process(config)
    _one_line(exc)
    assert not (tmp_path / "run" / ".tmp-final").exists() and not (tmp_path / "run" / "final").exists()
    monkeypatch.undo()
    assert fit_in_process(config, "checkpoint.resume=auto")["resumed_from"].endswith("step_3")
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- checkpoints and resume


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (6 steps) with checkpoints step_2, step_4, step_6 and its final weights.

    The small model (helpers.SMALL_MODEL): each test copies the run, 10 MB of it instead of resnet18's 300 MB."""
    root = tmp_path_factory.mktemp("finished")
    folder = make_image_folder(root / "images", per_class=8, size=16)
    config = tiny_config(
        root,
        folder,
        model={"name": SMALL_MODEL},
        checkpoint={"every_n_steps": 2, "every_epoch": False, "keep_last": 3},
    )
    fit_in_process(config)
    return root


def _copy(finished, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(finished / "run", tmp_path / "run")
    return finished / "config.yaml", tmp_path / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(path.stat().st_size // 2, 1)])


@pytest.mark.parametrize(
    "damaged",
    ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "trainer_state.json", "random_states_0.pkl"],
)
def test_resume_auto_walks_back_past_a_damaged_checkpoint(finished, tmp_path, capsys, damaged):
    config, run = _copy(finished, tmp_path)
    _truncate(run / "checkpoints" / "step_6" / damaged)
    summary = fit_in_process(config, f"output_dir={run}", "checkpoint.resume=auto")
    out = capsys.readouterr().out
    assert f"checkpoint.resume=auto: skipping {run / 'checkpoints' / 'step_6'}: {damaged} has" in out, out
    assert summary["resumed_from"].endswith("step_4") and summary["steps"] == 6
    assert max_abs_diff(load_weights(run), load_weights(finished / "run")) == 0.0


def test_leftovers_of_interrupted_saves_are_cleaned_at_start(finished, tmp_path, capsys):
    config, run = _copy(finished, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "step_6").rename(checkpoints / ".old-step_6")  # killed between the two renames of a save
    (checkpoints / ".old-step_4").mkdir()  # killed after the new step_4 was in place
    (checkpoints / ".tmp-step_8" / "x").mkdir(parents=True)  # killed while writing
    (run / ".tmp-final").mkdir()
    summary = fit_in_process(config, f"output_dir={run}", "checkpoint.resume=auto", "optim.lr=0.02")
    assert summary["resumed_from"].endswith("step_6"), "the checkpoint moved aside is put back"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4", "step_6"]
    assert not (run / ".tmp-final").exists()
    out = capsys.readouterr().out
    assert f"removed {checkpoints / '.tmp-step_8'}" in out
    assert "resuming with a config that differs from the checkpoint's in optim.lr: 0.01 there, 0.02 here" in out


def test_an_explicit_damaged_checkpoint_is_one_line(finished, tmp_path):
    config, run = _copy(finished, tmp_path)
    _truncate(run / "checkpoints" / "step_4" / "random_states_0.pkl")
    with pytest.raises(UserError, match=r"step_4' is damaged: random_states_0\.pkl has \d+ bytes, \d+ when saved"):
        fit_in_process(config, f"output_dir={run}", f"checkpoint.resume={run / 'checkpoints' / 'step_4'}")
    for step in (2, 6):
        _truncate(run / "checkpoints" / f"step_{step}" / "optimizer.bin")
    with pytest.raises(UserError, match=r"none of the 3 checkpoints .* is intact \(step_6: optimizer.bin has"):
        fit_in_process(config, f"output_dir={run}", "checkpoint.resume=auto")


def test_resuming_with_another_model_names_the_difference_in_one_line(finished, tmp_path):
    config, run = _copy(finished, tmp_path)
    with pytest.raises(UserError) as exc:
        fit_in_process(config, f"output_dir={run}", "checkpoint.resume=auto", "model.name=resnet18")
    text = _one_line(exc)
    assert "holds a different model" in text and f"model.name: '{SMALL_MODEL}' there, 'resnet18' here" in text
    assert len(text) < 800 and "Missing key(s)" not in text


def _files(run) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("resume", [None, "auto"])
def test_a_fresh_run_into_a_finished_run_without_checkpoints_is_refused(finished, tmp_path, resume):
    """A finished run that kept no checkpoint is the user's result: another seed into it (resume null, or
    auto with nothing to resume) is one line and changes no file; checkpoint.overwrite_finished=true opts in."""
    config, run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = _files(run)
    args = [f"output_dir={run}", "seed=1", *([f"checkpoint.resume={resume}"] if resume else [])]
    with pytest.raises(UserError) as exc:
        fit_in_process(config, *args)
    text = _one_line(exc)
    assert "holds a finished run" in text and "checkpoint.overwrite_finished=true" in text
    assert _files(run) == before
    fit_in_process(config, *args, "checkpoint.overwrite_finished=true", "train.max_steps=1")
    assert (run / "final" / "model.safetensors").read_bytes() != before[Path("final/model.safetensors")]


def _renamed_class(finished, tmp_path, old: str, new: str | None) -> Path:
    """The finished run's images with class folder `old` renamed `new` (None: a class `new_class` added)."""
    images = tmp_path / "images"
    shutil.copytree(finished / "images", images)
    if new is None:
        shutil.copytree(images / old, images / "new_class")
    else:
        (images / old).rename(images / new)
    return images


@pytest.mark.parametrize("new", ["gnu", None], ids=["replaced-same-count", "added"])
def test_resuming_after_the_classes_changed_names_them_and_keeps_the_run_config(finished, tmp_path, new):
    config, run = _copy(finished, tmp_path)
    images = _renamed_class(finished, tmp_path, "fox", new)
    before = (run / "config.yaml").read_text()
    with pytest.raises(UserError) as exc:
        fit_in_process(config, f"output_dir={run}", "checkpoint.resume=auto", f"data.path={images}")
    text = _one_line(exc)
    assert "(cat, dog, fox)" in text, text
    assert ("gone: fox; new: gnu" if new else "new: new_class") in text and "fc." not in text
    assert (run / "config.yaml").read_text() == before, "a refused run leaves the run's config.yaml as it was"


def test_a_moved_run_folder_resumes_where_it_now_is(finished, tmp_path, capsys):
    """`train MOVED/config.yaml checkpoint.resume=auto`, as evaluate advises: the run continues in MOVED,
    the path its config names is not re-created."""
    from helpers import fresh_accelerate

    from ddp_finetune.commands.cli import main

    _, run = _copy(finished, tmp_path)
    old = tmp_path / "old_place" / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "output_dir": str(old)}, sort_keys=False))
    shutil.rmtree(run / "final")  # killed before the end: only checkpoints
    (run / "summary.json").unlink()
    with fresh_accelerate():
        assert main(["train", str(run / "config.yaml"), "checkpoint.resume=auto"]) == 0
    assert not old.parent.exists()
    assert (run / "final" / "model.safetensors").is_file()
    assert f"the run continues in {run}" in capsys.readouterr().out


# --------------------------------------------------------------------------- metrics.jsonl


def _keys(run) -> list[tuple]:
    return [(r["split"], r["step"]) for r in read_metrics(run)]


class _KilledAfter(Exception):
    pass


def test_metrics_hold_each_record_once_after_a_kill_between_validation_and_checkpoint(
    tmp_path, image_folder, monkeypatch
):
    from ddp_finetune.training.tracking import MetricsLog

    sections = dict(checkpoint={"every_n_steps": 3, "every_epoch": False})  # step_3: the epoch's last step, before val
    fit_in_process(tiny_config(tmp_path / "whole", image_folder, **sections))
    config = tiny_config(tmp_path, image_folder, **sections)
    real_log = MetricsLog.log

    def killed_after_first_validation(self, record):
        real_log(self, record)
        if record["split"] == "val":
            with self.path.open("a") as f:
                f.write('{"step": 4, "spl')  # and a line cut short by the kill
            raise _KilledAfter()

    monkeypatch.setattr(MetricsLog, "log", killed_after_first_validation)
    with pytest.raises(_KilledAfter):
        fit_in_process(config)
    monkeypatch.undo()
    fit_in_process(config, "checkpoint.resume=auto")
    fit_in_process(config, "checkpoint.resume=auto")  # a finished run resumed: its step_6 re-evaluates
    expected = _keys(tmp_path / "whole" / "run")
    assert _keys(tmp_path / "run") == expected and len(set(expected)) == len(expected)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == sorted(
        r["step"] for r in read_metrics(tmp_path / "run")
    )


def test_a_check_process_that_dies_is_one_line_naming_where_the_check_was(tmp_path, hf_cache, monkeypatch):
    """A pool child killed by the system (out of memory) or crashed by a decoder fault breaks the pool:
    one line naming the split, the row and the file the check had reached, not a BrokenProcessPool
    traceback; nothing is cached, so the next start checks again."""
    import os

    from ddp_finetune import distributed as dist_utils
    from ddp_finetune.data import image_check

    root = make_image_folder(tmp_path / "many", classes=("a", "b"), per_class=200, size=4)
    cfg = config_from_dict({"data": {"path": str(root), "val_split": "train"}, "output_dir": str(tmp_path)})
    splits = load_splits(cfg.data, 0)
    real = image_check.image_problem
    crash = str(root / "b" / "150.png")
    # the children are forked: they run this, and the one that meets the file dies at once
    monkeypatch.setattr(
        image_check, "image_problem", lambda v, rgb: os._exit(9) if v["path"] == crash else real(v, rgb)
    )
    monkeypatch.setattr(dist_utils, "usable_cpus", lambda: (2, "test"))
    with pytest.raises(
        UserError,
        match=r"a process of the start-up image check died while the check of the train "
        r"split was at row \d+ of 400 \(.*many/[ab]/\d+\.png\): the system killed it .*fewer CPUs",
    ):
        image_check.check_images(cfg, splits, tmp_path)
    assert image_check._SHARED is None
    monkeypatch.setattr(image_check, "image_problem", real)
    assert image_check.check_images(cfg, splits, tmp_path).notes, "not cached: checked again, and passes"


_SLOW_CHECK = """
import sys, time
import datasets
from ddp_finetune import distributed as dist_utils
from ddp_finetune.data import image_check
dist_utils.usable_cpus = lambda: (2, "test")
image_check.image_problem = lambda value, rgb: time.sleep(0.01)  # 4000 rows: ~20 s on 2 processes
ds = datasets.Dataset.from_dict({"image": [f"/nowhere/{i}.png" for i in range(4000)]})
image_check._scan("train", ds, [("image", True)], 0, len(ds))
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_rank_killed_during_the_image_check_leaves_no_checking_process(tmp_path):
    """`kill` of a rank while its pool decodes (a preemption's SIGTERM comes before the run's handler is
    installed): the pool's children die with it. They used to wait forever on a queue whose both ends
    they hold, each with the rank's memory."""
    import signal
    import time

    from helpers import child_env

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHECK], env=child_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while len(kids) < 2 and time.monotonic() < deadline:  # the pool starts after the imports
            time.sleep(0.05)
            pgrep = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            kids = [int(p) for p in pgrep.stdout.split()]
        assert len(kids) == 2, f"the pool did not start: {kids}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 10  # the kernel's SIGKILL to the children is asynchronous to this process
        while any(_running(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if _running(k)], "pool children outlived their rank"
    finally:
        proc.kill()
