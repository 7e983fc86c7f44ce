"""Interrupted + resumed = uninterrupted, bit for bit on CPU, also for models that draw random
numbers while training (dropout: MobileNetV3; stochastic depth: EfficientNet).

The leak this guards against: a DataLoader draws its workers' base seed from torch's global RNG
each time an iterator is made, and a resumed run makes one iterator more (mid-epoch) than the
uninterrupted run did, which shifted every later dropout mask (measured: 2.3e-4 on
mobilenet_v3_small before the loaders got generators of their own).
"""

import pytest
from datagen import make_image_folder
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, tiny_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "images", per_class=8, size=32)


def _configs(tmp_path, images, model, workers):
    sections = dict(
        model={"name": model, "freeze_bn": True},
        data={"augment": True, "image_size": 32, "num_workers": workers},
        train={"epochs": 2, "batch_size": 6},
    )
    whole = tiny_config(tmp_path / "whole", images, **sections)
    parts = tiny_config(tmp_path / "parts", images, checkpoint={"every_n_steps": 4}, **sections)
    return whole, parts


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.mark.parametrize(
    "model, workers",
    [
        ("mobilenet_v3_small", 0),
        pytest.param("mobilenet_v3_small", 2, marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", 0, marks=pytest.mark.slow),
    ],
)
def test_one_process_resume_is_bit_identical(tmp_path, images, model, workers):
    whole, parts = _configs(tmp_path, images, model, workers)
    fit_in_process(whole)
    fit_in_process(parts, "train.max_steps=4")  # stops mid-epoch 2 (3 steps per epoch)
    fit_in_process(parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _train_losses(a) == _train_losses(b)


@pytest.mark.slow
def test_two_processes_resume_is_bit_identical(tmp_path, images):
    """Each rank restores its own random stream: dropout on 2 ranks resumes exactly, with workers."""
    whole, parts = _configs(tmp_path, images, "mobilenet_v3_small", workers=2)
    launch_2proc("train", whole)
    launch_2proc("train", parts, "train.max_steps=4")
    launch_2proc("train", parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _train_losses(a) == _train_losses(b)


def _recipe_configs(tmp_path, images):
    sections = dict(
        model={"name": "resnet18", "freeze_bn": True},
        data={
            "augment": True,
            "image_size": 32,
            "num_workers": 1,
            "policy": "trivialaugment",
            "random_erasing": 0.5,
            "mixup_alpha": 0.4,
            "cutmix_alpha": 1.0,
            "sampler": "balanced",
        },
        train={"epochs": 2, "batch_size": 6},
        optim={"name": "nadam", "lr": 0.001},
    )
    whole = tiny_config(tmp_path / "whole", images, **sections)
    parts = tiny_config(tmp_path / "parts", images, checkpoint={"every_n_steps": 4}, **sections)
    return whole, parts


def test_resume_is_bit_identical_with_the_balanced_sampler_mixing_and_a_policy(tmp_path, images):
    """The sampler's keys (balanced draws, repeats, Mixup / CutMix partners) are a function of (seed,
    epoch, position), so skipping the consumed batches resumes them exactly; with workers."""
    whole, parts = _recipe_configs(tmp_path, images)
    fit_in_process(whole)
    fit_in_process(parts, "train.max_steps=4")  # stops mid-epoch 2 (3 steps per epoch)
    fit_in_process(parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _train_losses(a) == _train_losses(b)


@pytest.mark.slow
def test_two_processes_resume_is_bit_identical_with_the_balanced_sampler_and_mixing(tmp_path, images):
    whole, parts = _recipe_configs(tmp_path, images)
    launch_2proc("train", whole)
    launch_2proc("train", parts, "train.max_steps=4")
    launch_2proc("train", parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0
    assert _train_losses(a) == _train_losses(b)
