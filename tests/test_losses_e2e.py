"""Losses end to end: binary focal and multilabel Dice training, Dice on 2 ranks, a user loss.

The validation loss a run reports is checked against an independent computation on its final
weights (torchvision's sigmoid_focal_loss; Dice written out here), so a run that trained with
the wrong loss, the wrong mode or wrongly encoded labels fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datagen import make_image_folder
from helpers import (
    ROOT,
    fit_in_process,
    launch_2proc,
    load_weights,
    max_abs_diff,
    read_metrics,
    read_summary,
    run_cli,
    tiny_config,
)
from PIL import Image

TESTS = ROOT / "tests"
LABELS = ("red", "green", "blue")


def make_multilabel_disk(root, n=32, size=16, seed=0):
    """A saved dataset whose `label` column lists the colour channels lit in each image
    (`Sequence(ClassLabel)`, one to three of them): learnable in a few steps."""
    import datasets

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        present = [c for c in range(len(LABELS)) if rng.random() < 0.5] or [int(rng.integers(len(LABELS)))]
        centre = np.full(3, 40.0)
        centre[present] = 210.0
        pixels = np.clip(centre + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
        labels.append(present)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Sequence(datasets.ClassLabel(names=list(LABELS)))}
    )
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(root))
    return root


def val_outputs(config_path, run_dir):
    """(logits, targets) of the final weights on the run's validation split, computed here."""
    from helpers import datasets_of, model_input

    from ddp_finetune.config import load_config
    from ddp_finetune.models import build_model

    cfg = load_config(config_path)
    _, val, classes, splits = datasets_of(cfg)
    model, _, _ = build_model(cfg.model, classes.outputs)
    model.load_state_dict(load_weights(run_dir))
    model.eval()
    xs, ys = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        logits = model(model_input(xs))
    targets = torch.stack([torch.as_tensor(y, dtype=torch.float32) for y in ys])
    return logits, targets, splits


def val_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "val"]


def first_train_loss(run_dir) -> float:
    return next(r["loss"] for r in read_metrics(run_dir) if r["split"] == "train" and r["step"] == 1)


# --------------------------------------------------------------------------- multilabel Dice


@pytest.fixture(scope="module")
def dice_config(tmp_path_factory):
    base = tmp_path_factory.mktemp("dice")
    data = make_multilabel_disk(base / "multilabel")
    # freeze_bn + no augmentation: the same training at 1 and 2 processes (docs/pitfalls.md, 3)
    return tiny_config(
        base,
        data,
        task="multilabel",
        data={"source": "disk", "augment": False},
        model={"freeze_bn": True},
        loss={"name": "dice"},
        train={"epochs": 3, "batch_size": 8},
    )


@pytest.fixture(scope="module")
def dice_run(dice_config):
    fit_in_process(dice_config)
    return dice_config.parent / "run"


def test_multilabel_dice_trains(dice_config, dice_run):
    summary = read_summary(dice_run)
    assert summary["steps"] == 9  # 32 images, 8 held out -> 24 / 8 = 3 steps x 3 epochs
    assert {"loss", "accuracy", "exact_match"} <= set(summary["val"]) and summary["val"]["count"] == 8
    assert load_weights(dice_run)["fc.weight"].shape == (3, 512)
    losses = val_losses(dice_run)
    assert len(losses) == 3 and losses[-1] < losses[0]

    logits, targets, splits = val_outputs(dice_config, dice_run)
    assert splits.class_names == list(LABELS)
    expected_targets = torch.zeros(len(splits.val), 3)  # the label lists, multi-hot
    for i, present in enumerate(splits.val["label"]):
        expected_targets[i, present] = 1.0
    assert torch.equal(targets, expected_targets)
    # soft Dice per class over the whole split (smooth 1), averaged over classes
    p = torch.sigmoid(logits)
    dice = (2 * (p * targets).sum(0) + 1) / (p.sum(0) + targets.sum(0) + 1)
    assert summary["val"]["loss"] == pytest.approx((1 - dice).mean().item(), abs=1e-5)
    exact = ((logits > 0) == (targets > 0.5)).all(1).float().mean().item()
    assert summary["val"]["exact_match"] == pytest.approx(exact)


def test_dice_on_two_processes_equals_one(dice_config, dice_run, tmp_path):
    out = tmp_path / "two"
    proc = launch_2proc("train", dice_config, f"output_dir={out}")
    assert "world size 2" in proc.stdout
    assert read_summary(out)["world_size"] == 2
    assert max_abs_diff(load_weights(dice_run), load_weights(out)) <= 1e-5
    # the logged training loss is the Dice of the global batch, not a mean of per-rank Dice
    one = [r["loss"] for r in read_metrics(dice_run) if r["split"] == "train"]
    two = [r["loss"] for r in read_metrics(out) if r["split"] == "train"]
    assert two == pytest.approx(one, abs=1e-5)
    assert read_summary(out)["val"] == pytest.approx(read_summary(dice_run)["val"], abs=1e-5)


# --------------------------------------------------------------------------- binary focal


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("binary") / "images", classes=("cat", "dog"), per_class=12, size=16
    )


def test_binary_focal_trains(tmp_path, two_classes):
    from torchvision.ops import sigmoid_focal_loss

    config = tiny_config(
        tmp_path, two_classes, task="binary", loss={"name": "focal"}, train={"epochs": 3}, optim={"lr": 0.05}
    )
    summary = fit_in_process(config)
    run = tmp_path / "run"
    assert summary["steps"] == 9 and {"loss", "accuracy"} <= set(summary["val"])
    assert load_weights(run)["fc.weight"].shape == (1, 512)  # one logit
    losses = val_losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0]

    logits, targets, _ = val_outputs(config, run)
    assert logits.shape == targets.shape == (6, 1) and set(targets.reshape(-1).tolist()) == {0.0, 1.0}
    logits, targets = logits.reshape(-1), targets.reshape(-1)
    assert summary["val"]["loss"] == pytest.approx(
        sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean").item(), abs=1e-6
    )
    assert summary["val"]["accuracy"] == pytest.approx(((logits > 0).float() == targets).float().mean().item())


# --------------------------------------------------------------------------- user losses


def test_user_loss_function_by_import_path(tmp_path, two_classes):
    """`package.module:function` called with loss.args: step 1 (same init, same batch) is
    3 x the built-in binary cross-entropy."""
    builtin = tiny_config(
        tmp_path / "builtin", two_classes, task="binary", loss={"name": "cross_entropy"}, train={"max_steps": 1}
    )
    user = tiny_config(
        tmp_path / "user",
        two_classes,
        task="binary",
        loss={"name": "helpers_userloss:scaled_bce", "args": {"scale": 3.0}},
        train={"max_steps": 1},
    )
    fit_in_process(builtin)
    fit_in_process(user)
    assert first_train_loss(tmp_path / "user" / "run") == pytest.approx(
        3 * first_train_loss(tmp_path / "builtin" / "run"), rel=1e-6
    )


def test_user_loss_class_in_a_child_process(tmp_path, image_folder, monkeypatch):
    """`package.module:Class` imported by a fresh `ddp-finetune train` process from PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    config = tiny_config(
        tmp_path,
        image_folder,
        loss={"name": "helpers_userloss:ScaledCrossEntropy", "args": {"scale": 2.0}},
        train={"epochs": 1},
    )
    proc = run_cli("train", config)
    assert "done: 3 steps" in proc.stdout
    run = tmp_path / "run"
    assert read_summary(run)["steps"] == 3 and np.isfinite(read_summary(run)["val"]["loss"])

    reference = tmp_path / "reference"
    fit_in_process(config, f"output_dir={reference}", "loss.name=cross_entropy", "loss.args={}", "train.max_steps=1")
    assert first_train_loss(run) == pytest.approx(2 * first_train_loss(reference), rel=1e-6)
