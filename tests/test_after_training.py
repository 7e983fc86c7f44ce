"""After training: the self-describing final/ folder, `evaluate` (1 vs 2 processes), `predict` (CSV in input
order, unreadable images, 1 vs 2 processes) and `plot`, on one tiny trained run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from datagen import make_image_folder
from helpers import (
    cli,
    fit_in_process,
    launch_2proc,
    normalized_by_hand,
    one_error_line,
    read_summary,
    tiny_config,
)
from PIL import Image

from ddp_finetune.models.folder import load_model_folder, read_weights

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A resnet18 trained for 2 epochs on 16 px images of 3 classes (6 validation images)."""
    root = tmp_path_factory.mktemp("after")
    images = make_image_folder(root / "images", classes=CLASSES, per_class=8, size=16)
    fit_in_process(tiny_config(root, images))
    return root / "run"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """9 other images of the same classes: with an evaluation batch of 4 on 2 ranks the last batch is padded."""
    return make_image_folder(tmp_path_factory.mktemp("held_out") / "images", classes=CLASSES, per_class=3, seed=7)


# --------------------------------------------------------------------------- the model folder


def test_final_describes_the_model_and_rebuilds_it(run):
    card = json.loads((run / "final" / "model.json").read_text())
    assert card["model_name"] == "resnet18" and card["source"] == "torchvision" and card["task"] == "classification"
    assert card["class_names"] == list(CLASSES) and card["outputs"] == 3 and card["image_size"] == 16
    assert card["mean"] == [0.485, 0.456, 0.406] and card["std"] == [0.229, 0.224, 0.225]
    assert (run / "final" / "config.yaml").read_text() == (run / "config.yaml").read_text()
    saved = read_weights(run / "final")
    for path in (run, run / "final"):
        loaded = load_model_folder(path)
        assert loaded.folder == run / "final" and loaded.run_dir == run
        state = loaded.model.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        assert not loaded.model.training


def test_model_folder_errors_are_one_line(run, tmp_path, capsys):
    assert "does not exist" in one_error_line(capsys, "evaluate", tmp_path / "nowhere")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    assert "has no final/ model folder yet" in one_error_line(capsys, "evaluate", unfinished)
    old = tmp_path / "old" / "final"
    shutil.copytree(run / "final", old)
    (old / "model.json").unlink()
    assert "has no model.json" in one_error_line(capsys, "predict", old, tmp_path, "--out", tmp_path / "p.csv")
    line = one_error_line(capsys, "evaluate", run, "model.name=resnet34")
    assert "model.* and task describe the saved model" in line


# --------------------------------------------------------------------------- evaluate


def test_evaluate_scores_the_validation_split_as_training_did(run, capsys):
    assert cli("evaluate", run) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "val_fraction" / "eval.json").read_text())
    val = read_summary(run)["val"]
    assert {k: report["metrics"][k] for k in val} == val  # the same split, the same numbers
    rows = report["per_class"]
    assert [r["class"] for r in rows] == list(CLASSES) and sum(r["support"] for r in rows) == val["count"]
    confusion = torch.tensor(report["confusion_matrix"])
    assert confusion.sum() == val["count"] and confusion.diagonal().sum() / val["count"] == val["top1"]
    png = run / "eval" / "val_fraction" / report["confusion_matrix_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "split val_fraction: 6 images, 1 processes" in out and "  fox " in out


def test_evaluate_without_matplotlib_writes_the_report_and_says_why_no_picture(run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli("evaluate", run, "--out", tmp_path / "eval") == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["confusion_matrix_png"] is None and report["metrics"]["count"] == read_summary(run)["val"]["count"]
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert "no confusion-matrix picture: install matplotlib" in capsys.readouterr().out


def test_evaluate_on_one_and_two_processes_gives_the_same_report(run, held_out, tmp_path):
    args = ["evaluate", run, "--data", held_out, "train.eval_batch_size=4"]
    assert cli(*args, "--out", tmp_path / "one") == 0
    launch_2proc(*args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", "two"))
    assert one["metrics"]["count"] == 9 and (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("metrics", "per_class", "confusion_matrix", "data"):
        assert one[key] == two[key], key


def test_evaluate_refuses_data_of_other_classes(run, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog", "owl"), per_class=2)
    assert "are not the model's (cat, dog, fox)" in one_error_line(capsys, "evaluate", run, "--data", other)
    assert "--split 'test' is not a split" in one_error_line(capsys, "evaluate", run, "--split", "test")


# --------------------------------------------------------------------------- predict


def _inputs(run, held_out, tmp_path):
    """A folder, a file, an unreadable file and a saved dataset (2 rows)."""
    import datasets

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = sorted((held_out / "dog").glob("*.png"))
    saved = tmp_path / "saved"
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [str(f) for f in files[:2]]}, features=features).save_to_disk(str(saved))
    expected = [str(p) for c in CLASSES for p in sorted((held_out / c).glob("*.png"))]
    expected += [str(files[0]), f"{saved}#0", f"{saved}#1"]
    return [held_out, files[0], bad, saved], expected, [files[0], files[1]]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_top_k_in_input_order_and_skips_unreadable_images(run, held_out, tmp_path, capsys):
    inputs, expected, saved_files = _inputs(run, held_out, tmp_path)
    assert cli("predict", run, *inputs, "--out", tmp_path / "p.csv", "--top-k", "2") == 0
    captured = capsys.readouterr()
    rows = _rows(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == expected
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert f"predict: skipped {tmp_path / 'broken.png'}: " in captured.err
    assert "12 images on 1 processes, skipped 1 unreadable" in captured.out
    # the probabilities are the model's softmax on evaluation's view of each image
    from ddp_finetune.inference.predict import input_transform

    loaded = load_model_folder(run)
    transform = input_transform(loaded.card)
    originals = [*expected[:10], *map(str, saved_files)]
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in originals])
    x = normalized_by_hand(x, loaded.card.mean, loaded.card.std)
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)
    top = probs.topk(2, dim=1)
    for row, p, i in zip(rows, top.values, top.indices):
        assert [row["class_1"], row["class_2"]] == [CLASSES[int(j)] for j in i]
        assert [float(row["prob_1"]), float(row["prob_2"])] == pytest.approx(p.tolist(), abs=2e-6)


def test_predict_on_two_processes_writes_the_same_csv(run, held_out, tmp_path):
    inputs, expected, _ = _inputs(run, held_out, tmp_path)
    # 4 per batch: 2 per rank, so the 13 inputs take 4 rounds and the unreadable one sits in the middle
    args = ["predict", run, *inputs, "train.eval_batch_size=4"]
    assert cli(*args, "--out", tmp_path / "one.csv") == 0
    proc = launch_2proc(*args, "--out", tmp_path / "two.csv")
    assert "12 images on 2 processes, skipped 1 unreadable" in proc.stdout
    one, two = _rows(tmp_path / "one.csv"), _rows(tmp_path / "two.csv")
    assert [r["path"] for r in two] == expected
    for a, b in zip(one, two):
        assert [a["class_1"], a["class_2"]] == [b["class_1"], b["class_2"]]
        assert float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=2e-6)


def test_predict_strict_stops_at_an_unreadable_image_and_writes_nothing(run, held_out, tmp_path, capsys):
    inputs, _, _ = _inputs(run, held_out, tmp_path)
    line = one_error_line(capsys, "predict", run, *inputs, "--out", tmp_path / "p.csv", "--strict")
    assert f"--strict: image {tmp_path / 'broken.png'} cannot be read" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "saved"]


def test_predict_input_that_does_not_exist(run, tmp_path, capsys):
    line = one_error_line(capsys, "predict", run, tmp_path / "missing.jpg", "--out", tmp_path / "p.csv")
    assert "missing.jpg' does not exist" in line


# --------------------------------------------------------------------------- plot


def test_plot_overlays_runs_named_by_folder(run, tmp_path, capsys):
    from ddp_finetune.commands.plot import read_curves, run_names

    for parent in ("a", "b"):
        (tmp_path / parent / "run").mkdir(parents=True)
        shutil.copy(run / "metrics.jsonl", tmp_path / parent / "run")
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    assert run_names(runs) == ["a/run", "b/run"]
    curves = read_curves(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert curves.train["loss"] == ([r["step"] for r in train], [r["loss"] for r in train])
    assert {"lr/head", "lr/backbone", "images_per_second"} <= set(curves.train) and "top1" in curves.val
    assert cli("plot", *runs, "--out", tmp_path / "curves.png") == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "has no metrics.jsonl" in one_error_line(capsys, "plot", run, tmp_path, "--out", tmp_path / "c.png")


def test_overrides_of_the_saved_config_apply(run, tmp_path):
    # the saved config is the base, key=value changes how it is evaluated, never what the model is
    loaded = load_model_folder(run, ["train.eval_batch_size=3", "data.num_workers=1"])
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert (loaded.cfg.train.eval_batch_size, loaded.cfg.data.num_workers) == (3, 1)
    assert loaded.cfg.train.batch_size == saved["train"]["batch_size"]
