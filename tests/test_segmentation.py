"""Semantic segmentation: mask data (folder layout and saved dataset), the three torchvision
segmenter families, the pixel metrics, training end to end, and 1 process vs 2 gloo ranks.

The data are synthetic shapes (tests/datagen.py): a yellow square of class 1 and a blue disc of
class 2 on a dark background 0, 32x32. LR-ASPP is the model that trains: the cheapest segmenter
here (3.2M parameters, ~0.08 s per step of 4 images on one core, against ~0.36 s for
fcn_resnet50) and the only one without dropout, so 1 and 2 processes train bit-comparably.
"""

from __future__ import annotations

import math
import os
import shutil
import urllib.error

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from datagen import make_mask_disk, make_mask_folder
from helpers import (
    datasets_of,
    fit_in_process,
    launch_2proc,
    load_weights,
    max_abs_diff,
    model_input,
    read_metrics,
    read_summary,
    tiny_config,
)
from PIL import Image

from ddp_finetune.config import ModelConfig, OptimConfig, config_from_dict, load_config
from ddp_finetune.data.datasets import build_datasets
from ddp_finetune.data.sources import decide_classes, load_splits
from ddp_finetune.data.transforms import eval_view
from ddp_finetune.errors import UserError
from ddp_finetune.models import build_model, split_outputs
from ddp_finetune.models.weights import cached_weights_path, resolve_enum
from ddp_finetune.training.metrics import confusion_matrices, segmentation_metrics, segmentation_sample_stats
from ddp_finetune.training.param_groups import build_param_groups

LRASPP = "lraspp_mobilenet_v3_large"
COLOURS = torch.tensor([(40, 40, 40), (230, 220, 60), (60, 120, 230)], dtype=torch.float32)  # datagen's classes


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory):
    return make_mask_folder(tmp_path_factory.mktemp("seg") / "shapes", n=16)


@pytest.fixture(scope="module")
def mask_disk(tmp_path_factory):
    # VOC-style: the pixels along every class boundary are 255, left out with loss.ignore_index=255
    return make_mask_disk(tmp_path_factory.mktemp("seg") / "saved", n=24, ignore_border=True)


def seg_cfg(path, *overrides, source="imagefolder"):
    values = {
        "task": "segmentation",
        "data": {"path": str(path), "source": source, "image_size": 32, "val_fraction": 0.25},
    }
    return config_from_dict(values, list(overrides))


def seg_config_file(tmp_path, data_path, data=None, model=None, **sections):
    return tiny_config(
        tmp_path,
        data_path,
        task="segmentation",
        data={"image_size": 32, "augment": True, **(data or {})},
        model={"name": LRASPP, "freeze_bn": True, **(model or {})},
        **sections,
    )


def one_line_error(fn, *match):
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for part in match:
        assert part in message, message
    return message


# --------------------------------------------------------------------------- metrics


def test_confusion_and_metrics_against_hand_computed_values():
    # sample 0 (valid pixels: (t, p) = (0,0) (0,1) (1,1) (2,2) (1,2); 255 ignored; 7 out of range)
    # sample 1: all background, all right (6 pixels)
    targets = torch.tensor([[[0, 0, 1], [2, 1, 255]], [[0, 0, 0], [0, 0, 0]]])
    preds = torch.tensor([[[0, 1, 1], [2, 2, 0]], [[0, 0, 0], [0, 0, 0]]])
    confusion, bad = confusion_matrices(preds, targets, 3, ignore_index=255)
    assert confusion.dtype == torch.int64 and confusion.shape == (2, 3, 3)
    assert confusion[0].tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert confusion[1].tolist() == [[6, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert bad.tolist() == [0, 0]

    m = segmentation_metrics(confusion[0])
    # TP = (1, 1, 1), FP = (0, 1, 1), FN = (1, 1, 0)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["mean_iou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert m["dice"] == pytest.approx((2 / 3 + 2 / 4 + 2 / 3) / 3)
    both = segmentation_metrics(confusion.sum(0))  # class 0: TP 7, FN 1 -> IoU 7/8, Dice 14/15
    assert both["pixel_accuracy"] == pytest.approx(9 / 11)
    assert both["mean_iou"] == pytest.approx((7 / 8 + 1 / 3 + 1 / 2) / 3)
    assert both["dice"] == pytest.approx((14 / 15 + 2 / 4 + 2 / 3) / 3)

    # a class absent from targets and predictions does not enter the means
    wider, _ = confusion_matrices(preds, targets, 5, ignore_index=255)
    assert segmentation_metrics(wider.sum(0)) == pytest.approx(both)
    # without ignore_index, 255 is a bad value; so is 7 with ignore_index set
    _, bad = confusion_matrices(preds, targets, 3)
    assert bad.tolist() == [1, 0]
    _, bad = confusion_matrices(preds, torch.where(targets == 255, 7, targets), 3, ignore_index=255)
    assert bad.tolist() == [1, 0]
    assert segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64)) == {}


def test_sample_stats_cross_entropy_sum_and_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    targets = torch.randint(0, 3, (2, 4, 5))
    targets[0, 0, :3] = 255
    confusion, ce, bad = segmentation_sample_stats(logits, targets, ignore_index=255)
    assert ce.dtype == torch.float64 and ce.shape == (2, 2) and bad.tolist() == [0, 0]
    assert ce[:, 1].tolist() == [17.0, 20.0]  # non-ignored pixels per sample
    for i in range(2):
        expected = F.cross_entropy(logits[i : i + 1], targets[i : i + 1], ignore_index=255, reduction="sum")
        assert ce[i, 0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(confusion, confusion_matrices(logits.argmax(1), targets, 3, 255)[0])
    _, ce, _ = segmentation_sample_stats(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert ce[0].tolist() == pytest.approx([4 * math.log(3), 4])  # uniform logits: ln C per pixel


# --------------------------------------------------------------------------- data


def test_folder_layout_masks_matched_by_stem(mask_folder):
    cfg = seg_cfg(mask_folder)
    splits = load_splits(cfg.data, 0, "segmentation")
    assert splits.val_source == "val_fraction" and (len(splits.train), len(splits.val)) == (12, 4)
    row = splits.train[0]
    assert row["image"].mode == "RGB" and row["mask"].mode == "L"
    # the images are .jpg and the masks .png: each image found the mask of its own stem
    stems = [p.stem for p in sorted((mask_folder / "images").iterdir())]
    assert stems == [p.stem for p in sorted((mask_folder / "masks").iterdir())]
    again = load_splits(cfg.data, 0, "segmentation")
    assert np.array_equal(np.array(again.val[0]["mask"]), np.array(splits.val[0]["mask"])), "the split is seeded"

    classes = decide_classes(cfg, splits)
    assert (classes.outputs, classes.source) == (3, "the training masks' largest value + 1")
    assert classes.names == ("0", "1", "2")
    train, val = build_datasets(cfg, splits, classes)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8  # normalized on the device, in the step
    assert type(y) is torch.Tensor and y.dtype == torch.int64 and y.shape == (32, 32)
    assert set(y.unique().tolist()) <= {0, 1, 2}


def test_split_folders_and_saved_dataset(tmp_path, mask_disk):
    root = make_mask_folder(tmp_path / "split", n=3, splits=["train", "validation"], image_suffix=".png")
    s = load_splits(seg_cfg(root).data, 0, "segmentation")
    assert s.val_source == "validation" and (len(s.train), len(s.val)) == (3, 3)

    cfg = seg_cfg(mask_disk, "loss.ignore_index=255", source="disk")
    splits = load_splits(cfg.data, 0, "segmentation")
    assert (len(splits.train), len(splits.val)) == (18, 6)
    classes = decide_classes(cfg, splits)
    assert (classes.outputs, classes.source) == (
        3,
        "the training masks' largest value + 1, ignoring loss.ignore_index=255",
    )
    named = decide_classes(seg_cfg(mask_disk, "data.class_names=[bg, square, disc, other]", source="disk"), splits)
    assert named.outputs == 4 and named.names == ("bg", "square", "disc", "other")
    assert decide_classes(seg_cfg(mask_disk, "model.num_classes=5", source="disk"), splits).outputs == 5
    # 255 without ignore_index: the VOC convention is named, not 256 classes
    one_line_error(
        lambda: decide_classes(seg_cfg(mask_disk, source="disk"), load_splits(cfg.data, 0, "segmentation")),
        "255",
        "loss.ignore_index=255",
    )


def test_the_segmentation_folder_walk_keeps_the_layout_rules(tmp_path):
    """One scandir of images/ and of masks/: images sorted by name, hidden and non-image files left out,
    any case of suffix, each matched to masks/<stem>.png; two images of one stem, or no masks/ folder,
    are one line; the splits' fingerprint follows a mask replaced in place (the image check's cache)."""
    from ddp_finetune.data.sources import load_dataset_dict

    root = make_mask_folder(tmp_path / "seg", n=4, image_suffix=".png")
    (root / "images" / "003.png").rename(root / "images" / "003.PNG")
    (root / "images" / ".hidden.png").write_bytes(b"")
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / "sub").mkdir()
    cfg = seg_cfg(root)
    ds = load_dataset_dict(cfg.data, "segmentation")["train"]
    cells = ds.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    images, masks = [c["path"] for c in cells["image"]], [c["path"] for c in cells["mask"]]
    assert images == [f"{root}/images/{n}" for n in ("000.png", "001.png", "002.png", "003.PNG")]
    assert masks == [f"{root}/masks/{i:03d}.png" for i in range(4)]
    before = ds._fingerprint
    assert load_dataset_dict(cfg.data, "segmentation")["train"]._fingerprint == before, "unchanged files: same"
    mask = root / "masks" / "002.png"
    Image.fromarray(np.full((32, 32), 1, np.uint8), "L").save(mask)
    os.utime(mask, ns=(1, 1))  # another size and time
    assert load_dataset_dict(cfg.data, "segmentation")["train"]._fingerprint != before

    shutil.copy(root / "images" / "001.png", root / "images" / "001.jpg")
    one_line_error(lambda: load_dataset_dict(cfg.data, "segmentation"), "001.jpg", "001.png", "share the mask")
    (root / "images" / "001.jpg").unlink()
    shutil.rmtree(root / "masks")
    one_line_error(lambda: load_dataset_dict(cfg.data, "segmentation"), "masks/000.png is missing", "masks/<name>.png")


def test_the_mask_classes_are_read_once_per_data(tmp_path, monkeypatch):
    """Without model.num_classes / data.class_names every training mask is read to count the classes:
    on the first start only. A restart reads none (cached by the split's fingerprint), another
    ignore_index or a changed mask reads them again, a damaged cache entry is read past."""
    from ddp_finetune.data import sources

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    root = make_mask_folder(tmp_path / "seg", n=8, image_suffix=".png")
    reads = []
    real = sources.mask_array
    monkeypatch.setattr(sources, "mask_array", lambda *a: reads.append(1) or real(*a))

    def classes(*overrides):
        cfg = seg_cfg(root, *overrides)
        return decide_classes(cfg, load_splits(cfg.data, 0, "segmentation")).outputs

    assert classes() == 3 and len(reads) == 6  # the 6 training masks
    assert classes() == 3 and len(reads) == 6, "a restart reads no mask"
    assert classes("loss.ignore_index=2") == 2 and len(reads) == 12  # another question: read again
    for entry in (tmp_path / "hf-cache" / "ddp_finetune_mask_classes").iterdir():
        entry.write_text("{not json")
    assert classes() == 3 and len(reads) == 18
    for mask in (root / "masks").iterdir():  # class 4 appears: the files changed, so the count is read again
        Image.fromarray(np.full((32, 32), 4, np.uint8), "L").save(mask)
    assert classes() == 5 and len(reads) == 24


def test_joint_augmentation_moves_image_and_mask_together(mask_folder):
    cfg = seg_cfg(mask_folder, "data.augment=true")
    train, val, _, splits = datasets_of(cfg)
    flipped_or_cropped = 0
    for i in range(len(train)):
        x, y = train[i]
        assert set(y.unique().tolist()) <= {0, 1, 2}, "masks are resized with NEAREST: no blended class values"
        nearest = ((x.float().permute(1, 2, 0)[:, :, None, :] - COLOURS) ** 2).sum(-1).argmin(-1)
        assert (nearest == y).float().mean() > 0.9, f"sample {i}: the mask does not follow the image"
        flipped_or_cropped += not torch.equal(y, eval_view(_mask_of(splits.train[i]), 32, mask=True))
    assert flipped_or_cropped >= len(train) // 2, "augmentation must change the geometry"

    first = train[3]
    torch.manual_seed(123)  # the global RNG does not matter: seeded per (seed, epoch, index)
    assert all(torch.equal(a, b) for a, b in zip(train[3], first))
    train.epoch = 1
    assert not torch.equal(train[3][1], first[1]), "a new epoch draws a new crop"


def _mask_of(row):
    return torch.from_numpy(np.array(row["mask"]).astype(np.int64))


def test_bad_data_is_a_one_line_error(tmp_path, mask_folder, mask_disk):
    broken = tmp_path / "broken"
    shutil.copytree(mask_folder, broken)
    (broken / "masks" / "005.png").unlink()
    one_line_error(
        lambda: load_splits(seg_cfg(broken).data, 0, "segmentation"), str(broken / "masks" / "005.png"), "005.jpg"
    )
    one_line_error(
        lambda: load_splits(seg_cfg(tmp_path / "nowhere").data, 0, "segmentation"), "does not exist", "images/"
    )
    one_line_error(
        lambda: load_splits(seg_cfg(mask_disk, "data.mask_column=segmentation", source="disk").data, 0, "segmentation"),
        "data.mask_column='segmentation' is not a column",
        "mask",
    )

    rgb = tmp_path / "rgb"
    shutil.copytree(mask_folder, rgb)
    for mask in (rgb / "masks").iterdir():
        Image.open(mask).convert("RGB").save(mask)
    cfg = seg_cfg(rgb)
    splits = load_splits(cfg.data, 0, "segmentation")
    one_line_error(lambda: decide_classes(cfg, splits), "training row 0", "mode RGB image", "mode L or P")
    _, val, _, _ = datasets_of(seg_cfg(rgb, "model.num_classes=3"))
    one_line_error(lambda: val[0], "validation (val_fraction) row 0", "mode RGB image")


def test_config_checks():
    one_line_error(lambda: config_from_dict({"data": {"path": "x", "class_names": ["a", "b"]}}), "task=segmentation")
    one_line_error(
        lambda: config_from_dict(
            {"task": "segmentation", "data": {"path": "x", "class_names": ["a", "b"]}, "model": {"num_classes": 3}}
        ),
        "model.num_classes=3",
        "2 names",
    )


# --------------------------------------------------------------------------- models

FAMILIES = {
    # name: (head group = head_prefixes, swapped layers = head_layers)
    LRASPP: (["classifier"], ["classifier.low_classifier", "classifier.high_classifier"]),
    "fcn_resnet50": (["classifier", "aux_classifier"], ["classifier.4", "aux_classifier.4"]),
    "deeplabv3_mobilenet_v3_large": (["classifier", "aux_classifier"], ["classifier.4", "aux_classifier.4"]),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_head_swap_and_one_training_step(name):
    prefixes, layers = FAMILIES[name]
    torch.manual_seed(0)
    model, parts, report = build_model(ModelConfig(name=name), num_classes=4, task="segmentation")
    assert list(parts.head_prefixes) == prefixes and list(parts.head_layers) == layers == report.heads
    for layer in layers:
        conv = model.get_submodule(layer)
        assert conv.weight.shape[:1] == (4,) and conv.kernel_size == (1, 1)
    groups = build_param_groups(model, parts, OptimConfig())
    head = {id(p) for g in groups if g["role"] == "head" for p in g["params"]}
    expected = {id(p) for root in prefixes for p in model.get_submodule(root).parameters()}
    assert head == expected, "the head group is the whole decoder head, not only the swapped convs"

    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    out, aux = split_outputs(model(x))
    assert out.shape == (2, 4, 32, 32) and len(aux) == len(prefixes) - 1
    assert all(a.shape == out.shape for a in aux)
    assert parts.aux_weight == (0.5 if aux else 0.0)
    loss = F.cross_entropy(out, y) + sum(parts.aux_weight * F.cross_entropy(a, y) for a in aux)
    weights = [model.get_submodule(layer).weight for layer in layers]
    before = [w.detach().clone() for w in weights]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, w.detach()) for b, w in zip(before, weights)), "every new head layer trains"


def test_layer_decay_blocks_of_a_segmenter_backbone():
    _, parts, _ = build_model(ModelConfig(name="fcn_resnet50"), 3, "segmentation", meta=True)
    assert [b for b, _ in parts.blocks] == [
        "stem",
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
    ]


def test_model_kind_must_fit_the_task():
    one_line_error(lambda: build_model(ModelConfig(name=LRASPP), 3, "classification"), LRASPP, "task=segmentation")
    one_line_error(
        lambda: build_model(ModelConfig(name="resnet18"), 3, "segmentation"), "resnet18", "classifier", LRASPP
    )
    one_line_error(lambda: build_model(ModelConfig(name="fcn_resnet5"), 3, "segmentation"), "did you mean fcn_resnet50")
    build_model(ModelConfig(name=LRASPP), 3)  # no task given: either kind


@pytest.mark.parametrize("name", [LRASPP, "deeplabv3_mobilenet_v3_large"])
def test_enum_weights_from_the_torch_home_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = resolve_enum(name, "DEFAULT")
    cached = cached_weights_path(enum)
    assert cached.name == enum.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)  # stands in for the download: 21 VOC classes, with the aux head where torchvision has one
    extra = {} if name == LRASPP else {"aux_loss": True}
    reference = torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra)
    torch.save(reference.state_dict(), cached)
    model, parts, _ = build_model(ModelConfig(name=name, weights="DEFAULT"), num_classes=3, task="segmentation")
    assert torch.equal(model.backbone["0"][0].weight, reference.backbone["0"][0].weight)
    root = FAMILIES[name][0][0]
    first = next(iter(model.get_submodule(root).parameters()))
    assert torch.equal(first, next(iter(reference.get_submodule(root).parameters()))), (
        "the pretrained decoder head is kept"
    )
    assert all(model.get_submodule(layer).weight.shape[0] == 3 for layer in FAMILIES[name][1])
    assert parts.std == (0.229, 0.224, 0.225) and parts.input_size == 520


def test_enum_weights_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    message = one_line_error(lambda: build_model(ModelConfig(name=LRASPP, weights="DEFAULT"), 3, "segmentation"))
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in message and str(tmp_path / "torch") in message


def test_local_weights_keep_the_decoder_and_swap_the_class_convs(tmp_path):
    torch.manual_seed(1)
    src = torchvision.models.get_model(LRASPP, weights=None, weights_backbone=None)  # 21 classes
    torch.save(src.state_dict(), tmp_path / "voc.pth")
    model, _, report = build_model(ModelConfig(name=LRASPP, weights=str(tmp_path / "voc.pth")), 3, "segmentation")
    assert sorted(report.skipped_head_keys) == [
        "classifier.high_classifier.bias",
        "classifier.high_classifier.weight",
        "classifier.low_classifier.bias",
        "classifier.low_classifier.weight",
    ]
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(model.classifier.cbr[0].weight, src.classifier.cbr[0].weight)
    assert model.classifier.high_classifier.weight.shape == (3, 128, 1, 1)


@pytest.mark.parametrize("name", ["cross_entropy", "dice", "dice_bce", "iou", "focal", "tversky"])
def test_every_builtin_loss_takes_pixel_logits(name):
    """train.py builds segmentation losses in the classification (multiclass) mode."""
    from ddp_finetune.config import LossConfig
    from ddp_finetune.losses import build_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    targets = torch.randint(0, 3, (2, 8, 8))
    targets[:, 0] = 255
    loss = build_loss(
        LossConfig(name=name, ignore_index=255, alpha=0.3 if name == "tversky" else 0.25), "classification", 3
    )(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[:, :, 1:].abs().sum() > 0
    assert logits.grad[:, :, 0].abs().max() == 0, "ignored pixels get no gradient"


# --------------------------------------------------------------------------- training


def _val_reference(config_path, run_dir):
    """Pixel cross-entropy and accuracy of the final weights on the run's validation split, here."""
    cfg = load_config(config_path)
    _, val, classes, _ = datasets_of(cfg)
    model, _, _ = build_model(cfg.model, classes.outputs, cfg.task)
    model.load_state_dict(load_weights(run_dir))
    model.eval()
    xs, ys = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        logits = model(model_input(xs))["out"]
    targets = torch.stack(ys)
    ignore = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else -100
    keep = targets != ignore
    ce = F.cross_entropy(logits, targets, ignore_index=ignore, reduction="sum") / keep.sum()
    accuracy = (logits.argmax(1) == targets)[keep].float().mean()
    return ce.item(), accuracy.item()


@pytest.mark.slow
def test_dice_training_end_to_end(tmp_path, mask_folder, capsys):
    config = seg_config_file(
        tmp_path, mask_folder, loss={"name": "dice"}, train={"epochs": 2, "batch_size": 4}, optim={"lr": 0.05}
    )
    summary = fit_in_process(config)
    assert "3 classes (from the training masks' largest value + 1)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert summary["steps"] == 6 and summary["world_size"] == 1  # 12 training images / 4 x 2 epochs
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]
    val = summary["val"]
    assert set(val) == {"loss", "pixel_accuracy", "mean_iou", "dice", "count"} and val["count"] == 4
    assert 0 <= val["mean_iou"] <= val["dice"] <= 1 and 0 < val["pixel_accuracy"] <= 1
    weights = load_weights(run)
    assert weights["classifier.high_classifier.weight"].shape == (3, 128, 1, 1)

    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 6 and all(0 < loss < 1 for loss in train_losses)  # a soft Dice loss
    # the reported validation loss is the mean pixel cross-entropy, whatever the training loss
    ce, accuracy = _val_reference(config, run)
    assert val["loss"] == pytest.approx(ce, abs=1e-5)
    assert val["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_segmenter(tmp_path, mask_disk):
    # 24 images: 19 train / 5 val; eval batch 4 leaves a last batch of 1, padded for 2 ranks;
    # augmentation on (seeded per sample); cross-entropy with the 255 borders ignored
    sections = dict(
        data={"source": "disk", "val_fraction": 0.2},
        loss={"ignore_index": 255},
        train={"epochs": 2, "batch_size": 4, "eval_batch_size": 4},
        optim={"lr": 0.05},
    )
    one = seg_config_file(tmp_path / "one", mask_disk, **sections)
    two = seg_config_file(tmp_path / "two", mask_disk, **sections)
    fit_in_process(one)
    proc = launch_2proc("train", two)
    assert "world size 2" in proc.stdout and "ignoring loss.ignore_index=255" in proc.stdout

    s1, s2 = read_summary(tmp_path / "one" / "run"), read_summary(tmp_path / "two" / "run")
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["steps"] == s2["steps"] == 8
    assert max_abs_diff(load_weights(tmp_path / "one" / "run"), load_weights(tmp_path / "two" / "run")) <= 1e-5
    assert s1["val"]["count"] == s2["val"]["count"] == 5
    for key in ("pixel_accuracy", "mean_iou", "dice"):
        assert s2["val"][key] == s1["val"][key], key
    assert s2["val"]["loss"] == pytest.approx(s1["val"]["loss"], abs=1e-5)
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "run") if r["split"] == "train"]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "run") if r["split"] == "train"]
    assert l2 == pytest.approx(l1, abs=1e-5)
    ce, accuracy = _val_reference(one, tmp_path / "one" / "run")
    assert s1["val"]["loss"] == pytest.approx(ce, abs=1e-5) and s1["val"]["pixel_accuracy"] == pytest.approx(
        accuracy, abs=1e-6
    )


def test_segmenter_with_a_classification_task_fails_before_loading_data(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "no-data-here", model={"name": LRASPP})
    one_line_error(
        lambda: fit_in_process(config),
        "model.name='lraspp_mobilenet_v3_large' is a segmentation model",
        "task=segmentation",
    )


def test_lr_plot_simulates_a_segmenter_offline(tmp_path):
    from ddp_finetune.commands.lr_plot import simulate_lrs
    from ddp_finetune.config import config_from_dict

    cfg = config_from_dict(
        {
            "task": "segmentation",
            "data": {"path": "x"},
            "model": {"name": "deeplabv3_resnet50", "num_classes": 3},
            "optim": {"lr": 0.01, "head_lr": 0.1},
            "train": {"epochs": 2},
        }
    )
    series = simulate_lrs(cfg, steps_per_epoch=3)
    assert series["lr/head"] == [0.1] * 6 and series["lr/backbone"] == [0.01] * 6


@pytest.mark.slow
def test_frozen_backbone_keeps_backbone_bn_statistics_and_trains_the_head_bn(tmp_path, mask_folder):
    """freeze_backbone fixes the backbone's BatchNorm statistics only: LR-ASPP's head has a
    BatchNorm of its own (`classifier.cbr.1`) that trains with the head."""
    from accelerate.utils import set_seed

    config = seg_config_file(
        tmp_path, mask_folder, model={"freeze_bn": False, "freeze_backbone": True}, train={"epochs": 1, "batch_size": 4}
    )
    fit_in_process(config)
    set_seed(0)  # what the run does before building the model: its initial weights
    initial, _, _ = build_model(ModelConfig(name=LRASPP), 3, "segmentation")
    start, end = initial.state_dict(), load_weights(tmp_path / "run")
    backbone_bn = [k for k in start if k.startswith("backbone.") and k.endswith("running_mean")]
    assert backbone_bn and all(torch.equal(start[k], end[k]) for k in backbone_bn)
    assert not torch.equal(start["classifier.cbr.1.running_mean"], end["classifier.cbr.1.running_mean"])
    assert end["classifier.cbr.1.num_batches_tracked"] == 3


@pytest.mark.slow
def test_two_ranks_share_the_mask_scan_and_stop_alike_on_a_bad_mask(tmp_path):
    """On a first start each rank reads its half of the training masks: the class count is the
    global one, and a bad mask in the second rank's half stops both ranks with its one line."""
    root = make_mask_folder(tmp_path / "seg", n=12, image_suffix=".png")
    good = seg_config_file(tmp_path / "good", root, train={"epochs": 1, "batch_size": 4, "max_steps": 1})
    proc = launch_2proc("train", good)
    assert "world size 2" in proc.stdout and "3 classes (from the training masks' largest value + 1)" in proc.stdout
    for mask in (root / "masks").iterdir():  # every mask RGB: the first one met on each rank is refused
        Image.open(mask).convert("RGB").save(mask)
    bad = seg_config_file(tmp_path / "bad", root, train={"epochs": 1, "batch_size": 4, "max_steps": 1})
    proc = launch_2proc("train", bad, check=False)
    # each rank ends on the same one line (rank 1 with the mask rank 0 met); the launcher then reports the exit
    assert proc.returncode != 0, proc.stderr[-3000:]
    line = "mask of training row 0 is a mode RGB image"
    assert f"ddp-finetune: error: {line}" in proc.stderr and f"ddp-finetune: error: [rank 1] {line}" in proc.stderr
    assert 'File "/' not in proc.stderr.split("exitcode")[0], "no traceback from a rank"
