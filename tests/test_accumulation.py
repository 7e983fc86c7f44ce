"""The objective does not depend on train.grad_accum: 1 process x grad_accum 1 = 1 process x
grad_accum 4 = 2 processes x grad_accum 2 for the region losses (and cross-entropy / focal whose
means count ignored pixels), through the whole training loop (loss.accumulation: exact).

BatchNorm is frozen here (model.freeze_bn): in train mode it normalizes each micro-batch by its own
statistics, so no accumulation scheme can make different micro-batch sizes equal (README)."""

import pytest
import torch
from datagen import make_image_folder, make_mask_disk
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, tiny_config
from safetensors.torch import load_file

LRASPP = "lraspp_mobilenet_v3_large"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("accumulation")
    images = make_image_folder(root / "images", classes=("a", "b", "c"), per_class=11, size=16)
    binary = make_image_folder(root / "binary", classes=("no", "yes"), per_class=16, size=16)
    masks = make_mask_disk(root / "masks", n=22, size=32, ignore_border=True)
    data = {"images": images, "binary": binary, "masks": masks}
    data["multilabel"] = _multilabel(root, data)
    return data


def _config(tmp_path, data, task, loss, **sections):
    if task == "segmentation":
        return tiny_config(
            tmp_path,
            data["masks"],
            task="segmentation",
            data={"source": "disk", "image_size": 32, "val_fraction": 2 / 22},
            model={"name": LRASPP, "freeze_bn": True},
            train={"epochs": 1, "batch_size": 8},
            loss=loss,
            optim={"lr": 0.05},
            **sections,
        )
    if task == "multilabel":
        folder, source = data["multilabel"], "disk"
    else:
        folder, source = (data["binary"] if task == "binary" else data["images"]), "imagefolder"
    return tiny_config(
        tmp_path,
        folder,
        task=task,
        data={"source": source, "val_fraction": 0.125},
        train={"epochs": 1, "batch_size": 8},
        loss=loss,
        **sections,
    )


def _multilabel(tmp_path, data):
    """A multi-hot saved dataset made from the image folder's classes (two labels on some images)."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(data["images"]))["train"]
    labels = [[c] if i % 3 else sorted({c, (c + 1) % 3}) for i, c in enumerate(ds["label"])]
    path = tmp_path / "multilabel"
    ds.remove_columns("label").add_column("label", labels).save_to_disk(str(path))
    return path


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


CASES = [
    ("segmentation", {"name": "dice", "ignore_index": 255}),
    ("segmentation", {"name": "iou", "ignore_index": 255}),
    ("segmentation", {"name": "tversky", "alpha": 0.3, "beta": 0.7, "ignore_index": 255}),
    ("segmentation", {"name": "dice_bce", "ignore_index": 255, "class_weights": [0.5, 1.0, 2.0]}),
    ("segmentation", {"name": "dice", "per_image": True, "ignore_index": 255}),
    ("segmentation", {"name": "cross_entropy", "ignore_index": 255}),
    ("binary", {"name": "dice"}),
    ("binary", {"name": "dice_bce"}),
    ("multilabel", {"name": "iou"}),
    ("multilabel", {"name": "tversky", "alpha": 0.7, "beta": 0.3}),
    ("classification", {"name": "dice"}),
]


def _run(tmp_path, data, task, loss, *overrides, launch=False):
    config = _config(tmp_path, data, task, loss)
    if launch:
        launch_2proc("train", config, *overrides)
    else:
        fit_in_process(config, *overrides)
    return tmp_path / "run"


@pytest.mark.parametrize("task, loss", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_grad_accum_4_trains_what_grad_accum_1_trains(tmp_path, data, task, loss):
    one = _run(tmp_path / "k1", data, task, loss)
    four = _run(tmp_path / "k4", data, task, loss, "train.grad_accum=4")
    assert max_abs_diff(load_weights(one), load_weights(four)) <= 1e-6
    assert _losses(four) == pytest.approx(_losses(one), abs=1e-6)


def test_micro_batch_accumulation_is_another_objective(tmp_path, data):
    """Without the statistics pass the test above fails: the mean of 4 micro-batch Dice losses."""
    loss = {"name": "dice", "ignore_index": 255}
    one = _run(tmp_path / "k1", data, "segmentation", loss)
    micro = _run(tmp_path / "k4", data, "segmentation", {**loss, "accumulation": "micro_batch"}, "train.grad_accum=4")
    assert max_abs_diff(load_weights(one), load_weights(micro)) > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, loss",
    [CASES[0], CASES[3], CASES[7], CASES[9]],
    ids=["seg-dice", "seg-dice_bce", "binary-dice_bce", "multilabel-tversky"],
)
def test_two_processes_grad_accum_2_train_what_one_process_trains(tmp_path, data, task, loss):
    one = _run(tmp_path / "k1", data, task, loss)
    two = _run(tmp_path / "n2", data, task, loss, "train.grad_accum=2", launch=True)
    assert max_abs_diff(load_weights(one), load_weights(two)) <= 1e-6
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-6)


def test_the_statistics_pass_does_not_update_batchnorm_twice(tmp_path, data):
    """BatchNorm in train mode: exact and micro_batch accumulation leave the same running
    statistics after a step (the statistics pass puts them back)."""
    loss = {"name": "dice", "ignore_index": 255}
    runs = {}
    for mode in ("exact", "micro_batch"):
        config = _config(
            tmp_path / mode, data, "segmentation", {**loss, "accumulation": mode}, checkpoint={"every_n_steps": 1}
        )
        fit_in_process(config, "model.freeze_bn=false", "train.grad_accum=2", "train.max_steps=1")
        runs[mode] = load_file(str(tmp_path / mode / "run" / "checkpoints" / "step_1" / "model.safetensors"))
    stats = [k for k in runs["exact"] if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(runs["exact"][k], runs["micro_batch"][k]) for k in stats)
    assert runs["exact"][stats[-1]].max() == 2 if stats[-1].endswith("tracked") else True
    weights = [k for k in runs["exact"] if k not in stats]
    assert any(not torch.equal(runs["exact"][k], runs["micro_batch"][k]) for k in weights), "the objectives differ"


def test_exact_accumulation_with_dropout_resumes_exactly(tmp_path, data):
    """A dropout model (MobileNetV3's classifier) at grad_accum 2: the statistics pass replays the
    masks the gradient pass draws; interrupted after step 2 and resumed = uninterrupted, bit for bit."""
    sections = dict(
        model={"name": "mobilenet_v3_small", "freeze_bn": True},
        train={"epochs": 2, "batch_size": 8, "grad_accum": 2},
        loss={"name": "dice"},
        task="binary",
        data={"val_fraction": 0.125},
    )
    whole = tiny_config(tmp_path / "whole", data["binary"], **sections)
    parts = tiny_config(tmp_path / "parts", data["binary"], checkpoint={"every_n_steps": 2}, **sections)
    fit_in_process(whole)
    fit_in_process(parts, "train.max_steps=2")
    fit_in_process(parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _losses(a) == _losses(b)
