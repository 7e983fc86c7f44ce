"""Faults after training: every `--out` (evaluate, predict, plot, lr-plot, init), every file a command reads
back (model.json, metrics.jsonl), a checkpoint given as a model, data of too few classes. Each ends in one
line and exit 2, or does what the README says; nothing half-written is left. Model folders of random-init
models (tests/model_folders.py): no training needed."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from datagen import make_image_folder
from helpers import cli, one_error_line
from model_folders import make_model_folder

from ddp_finetune.inference.predict_outputs import Options, Writer
from ddp_finetune.models.folder import load_model_folder

CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"), class_names=CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "images", classes=CLASSES, per_class=3)


@pytest.fixture
def run(tmp_path):
    """A run folder holding only what plot reads: metrics.jsonl."""
    r = tmp_path / "run"
    r.mkdir()
    records = [{"step": s, "epoch": 0, "split": "train", "loss": 1.0 / s, "lr/head": 0.01} for s in (1, 2, 3)]
    records.append({"step": 3, "epoch": 0, "split": "val", "loss": 0.5, "accuracy": 0.5})
    (r / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    return r


def _leftovers(path) -> list[str]:
    """Hidden temporary files or staging folders a command left (anywhere below `path`)."""
    return sorted(str(p) for p in path.rglob(".*") if "write-test" in p.name or ".tmp" in p.name or "partial" in p.name)


# --------------------------------------------------------------------------- every --out


def _commands(folder, images, run, out) -> dict[str, list]:
    return {
        "evaluate": ["evaluate", folder, "--data", images, "--out", out],
        "predict": ["predict", folder, images, "--out", out],
        "plot": ["plot", run, "--out", out],
        "init": ["init", "--out", out],
    }


@pytest.mark.parametrize("command", ["evaluate", "predict", "plot", "init"])
def test_out_below_a_file_is_one_line_before_the_work(command, folder, images, run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_error_line(capsys, *_commands(folder, images, run, blocker / "sub" / "out.png")[command])
    assert "a_file" in line and "is a file" in line
    assert blocker.read_text() == "x"


def test_a_file_where_a_folder_is_needed_is_one_line(folder, images, tmp_path, capsys):
    report = tmp_path / "report"
    report.write_text("keep")
    line = one_error_line(capsys, "evaluate", folder, "--data", images, "--out", report)
    assert "is a file" in line and report.read_text() == "keep"
    line = one_error_line(capsys, "demo", "--out", report)  # the demo's folder of data, runs and results
    assert "is a file" in line and report.read_text() == "keep"


@pytest.mark.parametrize(
    "command, name", [("predict", "predictions.csv"), ("plot", "curves.png"), ("init", "my_run.yaml")]
)
def test_out_ending_in_a_slash_or_naming_a_folder_means_that_folder(command, name, folder, images, run, tmp_path):
    new = tmp_path / "newdir"
    assert cli(*_commands(folder, images, run, f"{new}/")[command]) == 0
    assert (new / name).is_file() and not new.with_name("newdir").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli(*_commands(folder, images, run, existing)[command]) == 0
    assert (existing / name).is_file()
    assert _leftovers(tmp_path) == []


def test_plot_out_of_a_format_it_cannot_write_is_one_line(run, tmp_path, capsys):
    line = one_error_line(capsys, "plot", run, "--out", tmp_path / "curves")
    assert "curves" in line and ".png" in line
    assert not (tmp_path / "curves").exists()


def test_lr_plot_out_is_checked_before_the_dataset_is_read(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "r"), "data": {"path": str(tmp_path / "none")}}))
    (tmp_path / "f").write_text("x")
    line = one_error_line(capsys, "lr-plot", config, "--out", tmp_path / "f" / "lr.png")
    assert "is a file" in line  # not "data.path does not exist": the --out came first


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["evaluate", "predict", "plot", "init"])
def test_a_location_that_cannot_be_created_is_one_line(command, folder, images, run, capsys):
    """/proc takes no new folders, even from root (the read-only test below needs a non-root user)."""
    line = one_error_line(capsys, *_commands(folder, images, run, "/proc/ddp-finetune-test/out.png")[command])
    assert "/proc/ddp-finetune-test" in line and "cannot be created" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["evaluate", "predict", "plot", "init"])
def test_read_only_location_is_one_line(command, folder, images, run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_error_line(capsys, *_commands(folder, images, run, locked / "out.png")[command])
    finally:
        locked.chmod(0o700)
    assert "locked" in line and list(locked.iterdir()) == []


@pytest.mark.parametrize("command", ["evaluate", "predict", "plot", "init"])
def test_a_write_that_fails_after_the_checks_is_one_line(command, folder, images, run, tmp_path, capsys, monkeypatch):
    """The disk fills (or permissions change) between the check and the write: one line, nothing replaced."""
    import ddp_finetune.files
    import ddp_finetune.inference.predict_outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for module in (ddp_finetune.files.os, ddp_finetune.inference.predict_outputs.os):
        monkeypatch.setattr(module, "replace", full)
    monkeypatch.setattr("ddp_finetune.commands.init.os.link", full)
    out = tmp_path / "out" / ("x.yaml" if command == "init" else "x.png" if command == "plot" else "x.csv")
    line = one_error_line(capsys, *_commands(folder, images, run, out)[command])
    assert "No space left on device" in line
    assert _leftovers(tmp_path / "out") == []


def test_two_predict_writers_into_one_out_never_share_a_temporary_file(folder, tmp_path):
    """Two predict runs into one --out: each writes its own temporary file, the rename puts one whole CSV in
    place (before: one `.predictions.csv.partial` for both, the CSV a mix of the two)."""
    card = load_model_folder(folder).card
    out = tmp_path / "p.csv"
    items_a, items_b = ([type("I", (), {"name": f"{who}{i}"})() for i in range(3)] for who in "ab")
    a, b = Writer(out, card, Options(), items_a), Writer(out, card, Options(), items_b)
    assert a.partial != b.partial
    for i in range(3):
        a.add([(i, ["cat", "0.6", "dog", "0.4"])])
        b.add([(i, ["dog", "0.7", "cat", "0.3"])])
    a.finish()
    first = out.read_text()
    b.finish()
    rows = list(csv.reader(out.open()))
    assert [r[0] for r in rows[1:]] == ["b0", "b1", "b2"] and first != out.read_text()
    assert _leftovers(tmp_path) == []


def test_segmentation_staging_is_per_run(tmp_path):
    seg = make_model_folder(tmp_path / "seg", "lraspp_mobilenet_v3_large", "segmentation", ("bg", "a"), image_size=32)
    card = load_model_folder(seg).card
    host = socket.gethostname()
    dead = tmp_path / "masks" / f".partial-predict-999999999-abcd-{host}"  # a killed run's (no such pid)
    elsewhere = tmp_path / "masks" / ".partial-predict-999999999-abcd-another-host"  # unknown: kept
    (dead / "x").mkdir(parents=True)
    (elsewhere / "x").mkdir(parents=True)
    a, b = Writer(tmp_path / "masks", card, Options(), []), Writer(tmp_path / "masks", card, Options(), [])
    assert a.staging != b.staging and a.staging.is_dir() and b.staging.is_dir()  # b did not delete a's
    assert not dead.exists() and elsewhere.exists()
    a.abandon()
    b.abandon()


# --------------------------------------------------------------------------- model folders read back


def _damaged(folder, tmp_path, edit) -> object:
    copy = tmp_path / "copy" / "final"
    shutil.copytree(folder, copy)
    card = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps(edit(card)))
    return copy


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: [], "not a JSON object"),
        (lambda c: {**c, "image_size": "32"}, "image_size"),
        (lambda c: {**c, "image_size": 0}, "image_size"),
        (lambda c: {**c, "class_names": "cat"}, "class_names"),
        (lambda c: {**c, "class_names": ["cat", "dog", "fox"]}, "class_names"),
        (lambda c: {**c, "model_name": "resnet34"}, "model_name"),
        (lambda c: {**c, "outputs": "2"}, "outputs"),
    ],
    ids=["list", "size-string", "size-zero", "names-string", "more-names-than-outputs", "other-model", "outputs"],
)
def test_model_folder_is_validated_as_a_whole(edit, field, folder, images, tmp_path, capsys):
    copy = _damaged(folder, tmp_path, edit)
    for command in (["evaluate", copy, "--data", images], ["predict", copy, images, "--out", tmp_path / "p.csv"]):
        line = one_error_line(capsys, *command)
        assert field in line and "model.json" in line
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- a list\n"], ids=["yaml", "list"])
def test_a_damaged_config_yaml_in_the_model_folder_is_one_line(text, folder, images, tmp_path, capsys):
    copy = tmp_path / "copy" / "final"
    shutil.copytree(folder, copy)
    (copy / "config.yaml").write_text(text)
    line = one_error_line(capsys, "predict", copy, images, "--out", tmp_path / "p.csv")
    assert "config.yaml is damaged" in line


def test_a_damaged_shard_index_is_one_line(folder, images, tmp_path, capsys):
    copy = tmp_path / "copy" / "final"
    shutil.copytree(folder, copy)
    (copy / "model.safetensors").rename(copy / "model-00001.safetensors")
    (copy / "model.safetensors.index.json").write_text("[1]")
    line = one_error_line(capsys, "predict", copy, images, "--out", tmp_path / "p.csv")
    assert "model.safetensors.index.json is damaged" in line


def test_a_checkpoint_given_as_a_model_says_so(folder, images, tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_4"
    shutil.copytree(folder, step)
    (step / "model.json").unlink()
    (step / "trainer_state.json").write_text("{}")
    line = one_error_line(capsys, "predict", step, images, "--out", tmp_path / "p.csv")
    assert "is a training checkpoint" in line and "checkpoint.resume=auto" in line and "older ddp-finetune" not in line


# --------------------------------------------------------------------------- metrics.jsonl read back


def test_plot_skips_lines_that_are_not_records_with_a_warning(run, tmp_path, capsys):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damaged = [lines[0], b"42\n", b"\xff\xfe not utf-8\n", b'"text"\n', b'{"step": "x", "loss": 1}\n', *lines[1:]]
    (run / "metrics.jsonl").write_bytes(b"".join(damaged))
    assert cli("plot", run, "--out", tmp_path / "c.png") == 0
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and "line 4" in err and "Traceback" not in err
    assert (tmp_path / "c.png").stat().st_size > 0


# --------------------------------------------------------------------------- messages


def test_evaluate_data_of_one_class_names_both_class_lists(folder, tmp_path, capsys):
    one = make_image_folder(tmp_path / "one", classes=("cat",), per_class=3)
    line = one_error_line(capsys, "evaluate", folder, "--data", one)
    assert "cat, dog" in line and "(cat)" in line and "at least 2 classes" not in line
