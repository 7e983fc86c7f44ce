"""One inference path: `evaluate` and `predict` share the setup (inference.start_inference), the saved-dataset
check, training's image decoding and the evaluation-batch check (random-init model folders, no training)."""

from __future__ import annotations

import datasets
import pytest
import torch
from datagen import make_jpeg_folder
from helpers import fresh_accelerate
from model_folders import make_model_folder

from ddp_finetune.config import config_from_dict
from ddp_finetune.data.datasets import eval_dataset
from ddp_finetune.data.loaders import eval_batch_size
from ddp_finetune.data.sources import Classes
from ddp_finetune.errors import UserError
from ddp_finetune.inference import evaluate as eval_report
from ddp_finetune.inference import predict
from ddp_finetune.inference.setup import is_saved_dataset, start_inference
from ddp_finetune.models.folder import load_model_folder


def test_start_inference_gives_the_model_on_its_device_and_training_input_step(tmp_path):
    folder = make_model_folder(tmp_path, class_names=("a", "b"))
    with fresh_accelerate():
        inf = start_inference(folder)
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            out = inf.model(inf.prepare(x))
    assert inf.card.class_names == ("a", "b") and inf.batch_size == 4 and not inf.model.training
    assert out.shape == (2, 2)


def test_one_saved_dataset_check_for_evaluate_and_predict(tmp_path):
    """Two checks used to disagree: dataset_info.json alone was a saved dataset for evaluate, not for predict."""
    whole = tmp_path / "whole"
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(whole))
    split = tmp_path / "split"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(split))
    only_info = tmp_path / "only_info"
    only_info.mkdir()
    (only_info / "dataset_info.json").write_text("{}")  # not something load_from_disk reads
    assert is_saved_dataset(whole) and is_saved_dataset(split) and not is_saved_dataset(only_info)
    assert [eval_report.data_source(str(p)) for p in (whole, split, only_info)] == ["disk", "disk", "imagefolder"]
    assert predict.is_saved_dataset is is_saved_dataset


def test_predict_sees_the_pixels_evaluation_sees(tmp_path):
    """predict decodes through images.py (training's check, then decode_rgb): its input of a JPEG is the
    evaluation dataset's, byte for byte."""
    jpegs = make_jpeg_folder(tmp_path / "jpegs", classes=("a", "b"), per_class=2, height=40, width=48)
    files = sorted(str(p) for p in jpegs.rglob("*.jpg"))
    folder = make_model_folder(tmp_path, class_names=("a", "b"))
    card = load_model_folder(folder).card
    images = predict.PredictImages(predict.list_inputs(files, "image"), predict.input_transform(card))
    cfg = config_from_dict({"data": {"path": str(jpegs), "image_size": card.image_size}})
    ds = datasets.Dataset.from_dict({"image": files, "label": [0] * len(files)})
    evaluation = eval_dataset(cfg, ds, Classes(names=("a", "b"), outputs=2, label_kind="index"), "test")
    for i in range(len(files)):
        index, x, size, problem = images[i]
        assert problem is None and size == (40, 48)
        assert torch.equal(x, evaluation[i][0])


def test_the_evaluation_batch_check_is_training_s(tmp_path):
    cfg = config_from_dict({"data": {"path": str(tmp_path)}, "train": {"batch_size": 6, "eval_batch_size": 5}})
    with pytest.raises(UserError, match=r"train.eval_batch_size=5 does not divide by 2 processes; use a multiple of 2"):
        eval_batch_size(cfg, 2)
    assert eval_batch_size(cfg, 1) == 5
    assert eval_batch_size(config_from_dict({"data": {"path": str(tmp_path)}, "train": {"batch_size": 6}}), 3) == 6
