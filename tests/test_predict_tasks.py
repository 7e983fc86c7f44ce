"""evaluate / predict for every task and for timm models, on model folders of random-init models (no
training needed): binary and multilabel CSVs, segmentation masks at the original size, segmentation
evaluation from confusion matrices, and a timm model rebuilt from its folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datagen import make_mask_folder
from helpers import cli, normalized_by_hand
from model_folders import make_model_folder
from PIL import Image

from ddp_finetune.inference.predict import input_transform
from ddp_finetune.inference.predict_outputs import palette
from ddp_finetune.models.folder import load_model_folder

SHAPES = ("background", "square", "disc")


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _images(folder, sizes) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").save(paths[-1])
    return paths


def _logits(folder, paths) -> torch.Tensor:
    loaded = load_model_folder(folder)
    transform = input_transform(loaded.card)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        out = loaded.model(normalized_by_hand(x, loaded.card.mean, loaded.card.std))
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.parametrize("task, names", [("binary", ("no", "yes")), ("multilabel", ("a", "b", "c"))])
def test_sigmoid_tasks_write_every_probability_and_the_threshold(tmp_path, task, names):
    folder = make_model_folder(tmp_path, "resnet18", task, names)
    paths = _images(tmp_path / "in", [(32, 32)] * 5)
    assert cli("predict", folder, tmp_path / "in", "--out", tmp_path / "p.csv", "--threshold", "0.45") == 0
    rows = _rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "predicted", *[f"prob_{n}" for n in names], "threshold"]
    probs = _logits(folder, paths).sigmoid()
    for row, p in zip(rows, probs):
        assert row["threshold"] == "0.45"
        if task == "binary":
            q = p.item()
            assert float(row["prob_yes"]) == pytest.approx(q, abs=2e-6) and row["predicted"] == names[int(q > 0.45)]
            assert float(row["prob_no"]) == pytest.approx(1 - q, abs=2e-6)
        else:
            assert [float(row[f"prob_{n}"]) for n in names] == pytest.approx(p.tolist(), abs=2e-6)
            assert row["predicted"] == ";".join(n for n, v in zip(names, p.tolist()) if v > 0.45)


def test_segmentation_masks_have_the_original_size_and_the_models_classes(tmp_path):
    folder = make_model_folder(tmp_path, "lraspp_mobilenet_v3_large", "segmentation", SHAPES)
    paths = _images(tmp_path / "in" / "sub", [(40, 24), (32, 32), (17, 29)])
    out = tmp_path / "masks"
    assert cli("predict", folder, tmp_path / "in", "--out", out, "--overlay") == 0
    logits = None
    for path in paths:
        mask = Image.open(out / "sub" / f"{path.stem}.png")
        original = Image.open(path)
        assert mask.mode == "P" and mask.size == original.size
        assert mask.getpalette()[:9] == [v for rgb in palette(3) for v in rgb]
        logits = _logits(folder, [path])
        expected = F.interpolate(logits, size=original.size[::-1], mode="bilinear", align_corners=False).argmax(1)[0]
        assert np.array_equal(np.array(mask), expected.numpy())
        assert Image.open(out / "overlays" / "sub" / f"{path.stem}.jpg").size == original.size
    legend = (out / "classes.csv").read_text().splitlines()
    assert legend[0] == "index,name,red,green,blue" and legend[2].startswith("1,square,")
    assert not (out / ".partial-predict").exists()


def test_two_inputs_writing_the_same_mask_are_refused(tmp_path, capsys):
    folder = make_model_folder(tmp_path, "lraspp_mobilenet_v3_large", "segmentation", SHAPES)
    (a,) = _images(tmp_path / "x", [(16, 16)])
    (b,) = _images(tmp_path / "y", [(16, 16)])
    assert cli("predict", folder, a, b, "--out", tmp_path / "masks") == 2
    assert "would both write the mask img0.png" in capsys.readouterr().err


def test_segmentation_evaluate_reports_iou_per_class_from_the_confusion_matrix(tmp_path, capsys):
    folder = make_model_folder(tmp_path, "lraspp_mobilenet_v3_large", "segmentation", SHAPES)
    data = make_mask_folder(tmp_path / "shapes", n=5, size=32)
    assert cli("evaluate", folder, "--data", data, "--out", tmp_path / "eval", "train.eval_batch_size=2") == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    confusion = torch.tensor(report["confusion_matrix"], dtype=torch.float64)
    assert confusion.sum() == 5 * 32 * 32 and report["metrics"]["count"] == 5
    for i, row in enumerate(report["per_class"]):
        tp, fp, fn = confusion[i, i], confusion[:, i].sum() - confusion[i, i], confusion[i].sum() - confusion[i, i]
        assert row["class"] == SHAPES[i] and row["support"] == confusion[i].sum()
        assert row["iou"] == (None if tp + fp + fn == 0 else pytest.approx((tp / (tp + fp + fn)).item()))
    assert report["metrics"]["pixel_accuracy"] == pytest.approx((confusion.trace() / confusion.sum()).item())
    assert "disc" in capsys.readouterr().out


def test_a_timm_model_is_rebuilt_from_its_folder(tmp_path):
    pytest.importorskip("timm")
    from ddp_finetune.config import ModelConfig
    from ddp_finetune.models import build_model

    folder = make_model_folder(tmp_path, "timm/convnext_atto", "classification", ("a", "b", "c"), seed=3)
    card = json.loads((folder / "model.json").read_text())
    assert card["source"] == "timm" and card["model_name"] == "timm/convnext_atto"
    torch.manual_seed(3)  # the same random init make_model_folder saved
    original, _, _ = build_model(ModelConfig(name="timm/convnext_atto"), 3, "classification", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model_folder(folder).model(x), original.eval()(x))
