"""The promise: one config, 1 process or 2 gloo ranks, the same training.

BatchNorm statistics are per rank (SyncBatchNorm needs CUDA), so the config freezes them; the
data order and augmentation are rank-independent by construction, so augmentation stays on.
"""

import pytest
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, read_summary, tiny_config

pytestmark = pytest.mark.slow


def test_one_and_two_processes_train_the_same_model(tmp_path, image_folder):
    # 24 images: 19 train / 5 val with val_fraction 0.2; eval batch 4 leaves a last batch of 1,
    # which Accelerate pads to 2 for 2 ranks: gather_for_metrics must drop the duplicate
    sections = dict(
        data={"augment": True, "val_fraction": 0.2},
        train={"epochs": 2, "batch_size": 6, "eval_batch_size": 4, "grad_accum": 1},
    )
    one = tiny_config(tmp_path / "one", image_folder, **sections)
    two = tiny_config(tmp_path / "two", image_folder, **sections)
    fit_in_process(one)
    proc = launch_2proc("train", two)
    assert "world size 2" in proc.stdout

    s1, s2 = read_summary(tmp_path / "one" / "run"), read_summary(tmp_path / "two" / "run")
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["global_batch_size"] == s2["global_batch_size"] == 6 and s2["per_device_batch_size"] == 3
    assert s1["steps"] == s2["steps"] == 6
    assert max_abs_diff(load_weights(tmp_path / "one" / "run"), load_weights(tmp_path / "two" / "run")) <= 1e-5

    # identical validation metrics (accuracy exactly; the loss to float rounding) on all 5 images
    assert s2["val"]["count"] == s1["val"]["count"] == 5
    assert s2["val"]["top1"] == s1["val"]["top1"] and s2["val"]["top5"] == s1["val"]["top5"]
    assert s2["val"]["loss"] == pytest.approx(s1["val"]["loss"], abs=1e-5)

    # the logged training losses are global, not rank 0's
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "run") if r["split"] == "train"]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "run") if r["split"] == "train"]
    assert l2 == pytest.approx(l1, abs=1e-5)


def test_two_processes_that_do_not_divide_the_batch_fail_clearly(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder, train={"batch_size": 5})
    proc = launch_2proc("train", config, check=False)
    assert proc.returncode != 0
    assert "train.batch_size=5 does not divide by 2 processes" in proc.stderr


RECIPE = dict(
    data={
        "augment": True,
        "val_fraction": 0.2,
        "policy": "randaugment",
        "color_jitter": 0.3,
        "random_erasing": 0.3,
        "mixup_alpha": 0.4,
        "cutmix_alpha": 1.0,
        "sampler": "balanced",
    },
    loss={"label_smoothing": 0.1},
    train={"epochs": 2, "batch_size": 6, "eval_batch_size": 4},
)


def test_the_augmentation_recipe_trains_the_same_on_two_processes_as_one_accumulating_two(tmp_path, image_folder):
    """Policy, colour jitter, erasing, Mixup / CutMix partners and balanced draws come from per-sample
    streams over the global batch: 2 ranks (3 samples each) = 1 process with grad_accum 2 (3 per micro-batch)."""
    one = tiny_config(tmp_path / "one", image_folder, **RECIPE)
    two = tiny_config(tmp_path / "two", image_folder, **RECIPE)
    fit_in_process(one, "train.grad_accum=2")
    proc = launch_2proc("train", two)
    assert "world size 2" in proc.stdout and "Mixup alpha 0.4 / CutMix alpha 1.0" in proc.stdout
    s1, s2 = read_summary(tmp_path / "one" / "run"), read_summary(tmp_path / "two" / "run")
    assert s1["per_device_batch_size"] == s2["per_device_batch_size"] == 3
    assert max_abs_diff(load_weights(tmp_path / "one" / "run"), load_weights(tmp_path / "two" / "run")) <= 1e-5
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "run") if r["split"] == "train"]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "run") if r["split"] == "train"]
    assert l2 == pytest.approx(l1, abs=1e-5)
