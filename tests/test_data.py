"""Data from a generated image folder and from a saved dataset; transforms; the sampler."""

import datasets
import numpy as np
import pytest
import torch
from datagen import make_image_folder
from helpers import datasets_of
from PIL import Image

from ddp_finetune.config import config_from_dict
from ddp_finetune.data.loaders import EpochSampler, build_loaders, plan_loaders
from ddp_finetune.data.sources import load_splits
from ddp_finetune.data.transforms import sample_seed
from ddp_finetune.errors import UserError


def _cfg(path, *overrides, source="imagefolder"):
    return config_from_dict(
        {"data": {"path": str(path), "source": source, "image_size": 16}, "train": {"batch_size": 4}}, list(overrides)
    )


def test_image_folder_with_seeded_val_fraction(image_folder):
    cfg = _cfg(image_folder, "data.val_fraction=0.25")
    a, b = load_splits(cfg.data, seed=0), load_splits(cfg.data, seed=0)
    assert a.class_names == ["cat", "dog", "fox"]
    assert len(a.train) == 18 and len(a.val) == 6 and a.val_source == "val_fraction"
    assert a.val["image"][0].tobytes() == b.val["image"][0].tobytes(), "the split is seeded"
    c = load_splits(cfg.data, seed=1)
    assert [x.tobytes() for x in a.val["image"]] != [x.tobytes() for x in c.val["image"]]


def test_image_folder_split_folders(tmp_path):
    root = make_image_folder(tmp_path / "split", per_class=4, splits=["train", "validation"])
    s = load_splits(_cfg(root).data, seed=0)
    assert s.val_source == "validation" and len(s.train) == 12 and len(s.val) == 12


def test_grayscale_and_rgba_become_rgb_tensors(tmp_path):
    for mode in ("L", "RGBA"):
        root = make_image_folder(tmp_path / mode, per_class=4, mode=mode)
        cfg = _cfg(root)
        train, val, classes, _ = datasets_of(cfg)
        x, y = val[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and classes.outputs == 3
        assert isinstance(y, int)


def test_saved_dataset_with_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(10)]
    ds = datasets.Dataset.from_dict(
        {"img": images, "kind": ["b", "a"] * 5},
        features=datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "saved"))
    cfg = _cfg(tmp_path / "saved", "data.image_column=img", "data.label_column=kind", source="disk")
    train, _, _, splits = datasets_of(cfg)
    assert splits.val_source == "test" and splits.class_names == ["a", "b"]
    assert [train[i][1] for i in range(4)] == [1, 0, 1, 0]
    assert train[0][0].shape == (3, 16, 16)


def test_missing_path_and_columns(tmp_path, image_folder):
    with pytest.raises(UserError, match="does not exist"):
        load_splits(_cfg(tmp_path / "nowhere").data, 0)
    with pytest.raises(UserError, match="data.label_column='species' is not a column.*label"):
        load_splits(_cfg(image_folder, "data.label_column=species").data, 0)
    with pytest.raises(UserError, match="data.val_split='dev' is not in the dataset"):
        load_splits(_cfg(image_folder, "data.val_split=dev").data, 0)


def test_not_a_saved_dataset(image_folder):
    with pytest.raises(UserError, match="not a dataset saved with save_to_disk"):
        load_splits(_cfg(image_folder, source="disk").data, 0)


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hugging Face Hub"):
        load_splits(_cfg("someone/no-such-dataset-xyz", source="hub").data, 0)


def test_augmentation_is_seeded_per_sample_not_per_process(image_folder):
    cfg = _cfg(image_folder, "data.augment=true")
    train, _, _, _ = datasets_of(cfg)
    first = train[3][0]
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(train[3][0], first)
    train.epoch = 1
    assert not torch.equal(train[3][0], first), "a new epoch draws new crops"


def test_per_sample_seeds_never_collide_across_epochs_indices_and_seeds():
    """A linear seed formula (seed*a + epoch*b + index) gave (epoch e, index i + b) the crop of
    (epoch e+1, index i) on any data set over b images. Every triple gets its own seed."""
    triples = [(seed, epoch, index) for seed in (0, 1) for epoch in range(3) for index in range(10_100)]
    seeds = {sample_seed(*t) for t in triples}
    assert len(seeds) == len(triples)
    assert sample_seed(0, 0, 10_007) != sample_seed(0, 1, 0) and sample_seed(1, 0, 0) != sample_seed(0, 0, 1_000_003)
    assert all(0 <= s < 2**64 for s in seeds)


def test_sampler_same_order_everywhere_and_whole_batches():
    s = EpochSampler(length=23, batch_size=4, seed=5)
    s.set_epoch(2)
    order = list(s)
    assert len(order) == 20 and len({index for _, index in order}) == 20
    assert {epoch for epoch, _ in order} == {2}, "each key carries its epoch (persistent workers seed from it)"
    t = EpochSampler(length=23, batch_size=4, seed=5)
    t.set_epoch(2)
    assert list(t) == order
    t.set_epoch(3)
    assert list(t) != order


def test_loader_batch_is_the_global_micro_batch(image_folder):
    cfg = _cfg(image_folder, "train.batch_size=8", "train.grad_accum=2")
    train, val, _, _ = datasets_of(cfg)
    train_dl, _, _ = build_loaders(cfg, train, val, plan_loaders(0, cuda=False))
    batches = [x for x, _ in train_dl]
    assert [x.shape[0] for x in batches] == [4] * (len(train) // 8 * 2)
    # uint8 samples: a quarter of float32's bytes through the workers' shared memory and host-to-device
    assert all(x.dtype == torch.uint8 and x.nbytes == 4 * 3 * 16 * 16 for x in batches)


def test_too_small_for_the_batch(image_folder):
    cfg = _cfg(image_folder, "train.batch_size=64")
    train, val, _, _ = datasets_of(cfg)
    with pytest.raises(UserError, match="fewer than train.batch_size=64"):
        build_loaders(cfg, train, val, plan_loaders(0, cuda=False))
