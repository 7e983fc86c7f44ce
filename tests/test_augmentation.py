"""Augmentation (policies, colour jitter, random erasing, crop range), Mixup / CutMix and the balanced
sampler: every random draw from a sample's own seeded streams, so a sample looks the same whichever
rank, worker, restart or world size handles it; and the refusals where a combination cannot work."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from datagen import make_image_folder, make_mask_folder
from helpers import datasets_of

from ddp_finetune.config import config_from_dict
from ddp_finetune.data.loaders import EpochSampler, balanced_weights
from ddp_finetune.data.mixing import Mixing
from ddp_finetune.data.transforms import Augmentation, sample_seed, train_view
from ddp_finetune.errors import UserError
from ddp_finetune.losses import cross_entropy_loss, focal_loss


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("aug") / "images", per_class=8, size=32)


def _train_set(folder, **data):
    cfg = config_from_dict({"data": {"path": str(folder), "image_size": 24, "val_fraction": 0.2, **data}})
    return datasets_of(cfg)[0]


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_policies_are_seeded_per_sample_and_leave_the_global_rng_alone(folder, policy):
    plain = _train_set(folder)
    augmented = _train_set(folder, policy=policy, color_jitter=0.4, random_erasing=0.5)
    before = torch.get_rng_state()
    first = [augmented[(3, i)][0] for i in range(8)]
    assert torch.equal(torch.get_rng_state(), before), "dropout's RNG must not move"
    torch.manual_seed(123)  # whatever the global RNG holds, the sample's pixels are the same
    again = [augmented[(3, i)][0] for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the crop and flip are unchanged (the policy has its own stream); the pixels are not
    changed = sum(not torch.equal(a, plain[(3, i)][0]) for i, a in enumerate(first))
    assert changed >= 6
    # another epoch draws anew
    assert sum(not torch.equal(a, augmented[(4, i)][0]) for i, a in enumerate(first)) >= 6


def test_photometric_transforms_are_torchvisions_run_under_the_sample_seed(folder):
    train = _train_set(folder, policy="randaugment", policy_magnitude=15, color_jitter=0.2)
    aug = train.augmentation
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    crop = aug.draw_crop(__import__("random").Random(1), 40, 50)
    x = train_view(image, crop, 24)
    seed = sample_seed(0, 2, 5, 1)
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    reference = v2.Compose([v2.RandAugment(num_ops=2, magnitude=15), v2.ColorJitter(0.2, 0.2, 0.2)])
    expected = reference(tv_tensors.Image(x)).as_subclass(torch.Tensor)
    assert torch.equal(aug.photometric(x, seed), expected)


def test_crop_scale_and_ratio_bound_the_boxes():
    import random

    aug = Augmentation(scale=(0.5, 0.6), ratio=(1.0, 1.0), hflip=False)
    rng = random.Random(0)
    for _ in range(200):
        c = aug.draw_crop(rng, 100, 100)
        assert 0.48 <= c.height * c.width / 10000 <= 0.62 and abs(c.height - c.width) <= 1 and not c.flip
    # turning flips off leaves every box where it was
    on, off = Augmentation(), Augmentation(hflip=False)
    a, b = on.draw_crop(random.Random(5), 50, 70), off.draw_crop(random.Random(5), 50, 70)
    assert (a.top, a.left, a.height, a.width) == (b.top, b.left, b.height, b.width)


def test_segmentation_moves_mask_with_the_geometry_and_colours_only_the_image(tmp_path):
    masks = make_mask_folder(tmp_path / "masks", n=6, size=32)
    base = {"path": str(masks), "image_size": 24, "val_fraction": 0.2}
    plain = datasets_of(config_from_dict({"task": "segmentation", "data": base}))[0]
    jittered = datasets_of(
        config_from_dict({"task": "segmentation", "data": {**base, "color_jitter": 0.5, "random_erasing": 1.0}})
    )[0]
    for i in range(len(plain)):
        (x0, m0), (x1, m1) = plain[(1, i)], jittered[(1, i)]
        assert torch.equal(m0, m1), "photometric transforms leave the mask alone"
        assert not torch.equal(x0, x1)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"task": "segmentation", "data": {"policy": "randaugment"}}, "data.policy=randaugment moves only the image"),
        ({"task": "segmentation", "data": {"mixup_alpha": 0.2}}, "a segmentation mask cannot"),
        ({"data": {"cutmix_alpha": 1.0}, "loss": {"name": "dice"}}, "loss.name=dice does not take"),
        ({"data": {"policy": "trivialaugment", "policy_magnitude": 5}}, "not read by data.policy=trivialaugment"),
        ({"data": {"decode": "gpu", "color_jitter": 0.2}}, "data.decode=gpu applies only the crop and flip"),
        ({"data": {"decode": "gpu", "mixup_alpha": 0.2}}, "data.decode=gpu applies only the crop and flip"),
        ({"data": {"crop_scale": [0.5, 0.2]}}, "data.crop_scale"),
        ({"task": "multilabel", "data": {"sampler": "balanced"}}, "data.sampler=balanced"),
        ({"optim": {"name": "lamb"}}, "is not a torch.optim optimizer"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(values, message):
    values = {**values, "data": {"path": "x", **values.get("data", {})}}
    with pytest.raises(UserError, match=message) as info:
        config_from_dict(values)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- Mixup / CutMix


def test_partners_come_from_the_same_global_batch_and_do_not_depend_on_the_slicing():
    mixing = Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8)
    sampler = EpochSampler(50, 8, seed=3, mixing=mixing)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert len(keys) == 48
    for start in range(0, 48, 8):
        batch = keys[start : start + 8]
        members = {k[1] for k in batch}
        partners = [k[3] for k in batch if k[3] >= 0]
        assert all(p in members for p in partners), "a partner is from the same optimizer step's batch"
        assert all(k[3] != k[1] for k in batch)
    mixed = sum(k[3] >= 0 for k in keys)
    assert 30 <= mixed <= 46  # about mix_prob of them
    again = EpochSampler(50, 8, seed=3, mixing=mixing)
    again.set_epoch(2)
    assert list(again) == keys  # a function of (seed, epoch) only: every rank, every restart


def test_mixed_samples_blend_images_and_targets(folder):
    train = _train_set(folder, mixup_alpha=0.4, cutmix_alpha=1.0, mix_switch_prob=0.5)
    plain = _train_set(folder)
    n = train.classes.outputs
    saw_cutmix = saw_mixup = False
    for i in range(12):
        partner = (i + 5) % len(train)
        x, t = train[(1, i, 0, partner, 0)]
        a, ta = plain[(1, i)]
        b, tb = plain[(1, partner)]
        assert t.shape == (n,) and t.sum().item() == pytest.approx(1.0)
        lam = t[ta].item() if ta != tb else None
        if lam is None:
            continue
        from_a = x == a
        from_b = x == b
        if bool((from_a | from_b).all()) and not bool(from_a.all()):
            saw_cutmix = True  # every pixel from one of the two images: a pasted box, weighted by its area
            only_b = (from_b & ~from_a).any(0)
            rows, cols = only_b.any(1).nonzero(), only_b.any(0).nonzero()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert 1 - lam == pytest.approx(box.item() / (24 * 24), abs=0.1)
        elif not bool(from_a.all()):
            saw_mixup = True
            blend = (lam * a.float() + (1 - lam) * b.float()).round()
            assert (x.float() - blend).abs().max() <= 1
    assert saw_cutmix and saw_mixup
    # an unmixed key is the plain sample with a one-hot target
    x, t = train[(1, 2, 0, -1, 0)]
    assert torch.equal(x, plain[(1, 2)][0]) and torch.equal(t, F.one_hot(torch.tensor(plain[(1, 2)][1]), n).float())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_through_cross_entropy_and_focal(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (7,))
    one_hot = F.one_hot(labels, 4).double()
    weights = [1.0, 2.0, 0.5, 3.0]
    hard = cross_entropy_loss(logits, labels, label_smoothing=smoothing, class_weights=weights)
    soft = cross_entropy_loss(logits, one_hot, label_smoothing=smoothing, class_weights=weights)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-12)
    probs = torch.softmax(torch.randn(7, 4, dtype=torch.float64), 1)
    ours = cross_entropy_loss(logits, probs, label_smoothing=smoothing)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, probs, label_smoothing=smoothing).item(), rel=1e-12)
    assert focal_loss(logits, one_hot, "multiclass", alpha=None).item() == pytest.approx(
        focal_loss(logits, labels, "multiclass", alpha=None).item(), rel=1e-12
    )
    with pytest.raises(UserError, match="out of range"):
        cross_entropy_loss(logits, probs * 2)


# --------------------------------------------------------------------------- the balanced sampler


def test_balanced_sampler_draws_classes_evenly_seeded_with_repeats_augmented_anew(folder):
    labels = [0] * 40 + [1] * 8 + [2] * 2  # imbalanced 20:4:1
    sampler = EpochSampler(50, 10, seed=1, class_weights=balanced_weights(labels))
    counts = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == 50
        counts.update(labels[k[1]] for k in keys)
        repeats = Counter(k[1] for k in keys)
        assert max(repeats.values()) > 1  # with replacement
        assert sorted(k[2] for k in keys if k[1] == keys[0][1]) == list(range(repeats[keys[0][1]]))
    shares = [counts[c] / 1000 for c in range(3)]
    assert all(0.27 <= s <= 0.40 for s in shares), shares
    again = EpochSampler(50, 10, seed=1, class_weights=balanced_weights(labels))
    again.set_epoch(19)
    assert list(again) == keys
    # a repeated draw of a sample gets its own crop
    train = _train_set(folder, sampler="balanced")
    assert not torch.equal(train[(0, 1, 0, -1, 0)][0], train[(0, 1, 1, -1, 0)][0])
    assert train.class_indices() == [train._index(v) for v in train.ds["label"]]


def test_auto_decoding_stays_on_the_cpu_where_the_device_would_skip_a_transform(tmp_path):
    from datagen import make_jpeg_folder

    from ddp_finetune.data.datasets import decide_decode
    from ddp_finetune.data.sources import load_splits

    jpegs = make_jpeg_folder(tmp_path / "jpegs")
    for extra, on_device in [({}, True), ({"policy": "augmix"}, False), ({"cutmix_alpha": 1.0}, False)]:
        cfg = config_from_dict({"data": {"path": str(jpegs), "decode": "auto", **extra}})
        decided, why = decide_decode(cfg, load_splits(cfg.data, cfg.seed, cfg.task), cuda=True)
        assert decided is on_device, why
        assert on_device or "run on the CPU workers" in why


def test_binary_and_multilabel_targets_mix_as_they_are(tmp_path):
    cfg = config_from_dict(
        {
            "task": "binary",
            "data": {
                "path": str(make_image_folder(tmp_path / "bin", classes=("no", "yes"))),
                "image_size": 24,
                "mixup_alpha": 1.0,
            },
        }
    )
    train = datasets_of(cfg)[0]
    labels = [train[(0, i)][1].item() for i in range(len(train))]
    i, j = labels.index(0.0), labels.index(1.0)
    x, t = train[(0, i, 0, j, 0)]
    assert t.shape == (1,) and 0.0 < t.item() < 1.0  # the partner's share of "yes"


@pytest.mark.parametrize(
    "key, value", [("policy", "trivialaugment"), ("color_jitter", "0.3"), ("random_erasing", "0.5")]
)
def test_an_augmentation_key_without_augment_is_refused_not_ignored(tmp_path, key, value):
    """Set with data.augment=false they would silently do nothing (a benchmark row measured nothing so)."""
    from ddp_finetune.config import load_config
    from ddp_finetune.errors import UserError

    with pytest.raises(UserError, match=f"data.{key}=.* has no effect with data.augment=false"):
        load_config(None, [f"data.path={tmp_path}", "data.augment=false", f"data.{key}={value}"])
    load_config(None, [f"data.path={tmp_path}", "data.augment=true", f"data.{key}={value}"])
