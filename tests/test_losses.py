"""Losses: values against independent computations, gradients, edge cases, bad input, 2 ranks.

    python -m pytest tests/test_losses.py -q

The references below are written from the definitions (loops over classes and images, in
float64) or are torch / torchvision's own losses; they share no code with ddp_finetune.losses.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import helpers_newloss
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import run_script_2proc

from ddp_finetune import losses as L
from ddp_finetune.config import LossConfig
from ddp_finetune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "losses_2proc.py"

FUNCTIONS = L.LOSS_FUNCTIONS
MODULES = L.LOSS_MODULES
MODES = ("binary", "multilabel", "multiclass")
ALL = [(name, mode) for name in FUNCTIONS for mode in MODES]
IGNORE = {"binary": -1, "multilabel": -1, "multiclass": 255}


# --------------------------------------------------------------------------- data


def make(
    mode: str,
    seg: bool = True,
    seed: int = 0,
    n: int = 3,
    size: int = 4,
    ignore=None,
    dtype=torch.float32,
    channel=True,
):
    """Random logits and targets for a mode: (N, C, H, W) masks or (N, C) classification.

    binary uses soft targets (some hard); `channel=False` drops the binary target's channel dim.
    """
    g = torch.Generator().manual_seed(seed)
    c = 1 if mode == "binary" else 3
    spatial = (size, size) if seg else ()
    x = (2 * torch.randn((n, c) + spatial, generator=g)).to(dtype)
    if mode == "multiclass":
        t = torch.randint(0, c, (n,) + spatial, generator=g)
    elif mode == "multilabel":
        t = (torch.rand((n, c) + spatial, generator=g) > 0.5).float()
    else:
        t = torch.rand((n, 1) + spatial, generator=g)
        t = torch.where(t > 0.7, t, (t > 0.4).float())
        if not channel:
            t = t[:, 0]
    if ignore is not None:
        drop = torch.rand(t.shape, generator=g) < 0.25
        t = torch.where(drop, torch.full_like(t, ignore), t)
    return x, t


# --------------------------------------------------------------------------- references


def _layout(mode, logits, targets):
    x = logits.detach().double()
    n = x.shape[0]
    if mode == "binary":
        return x.reshape(n, 1, -1), targets.double().reshape(n, 1, -1)
    x = x.reshape(n, x.shape[1], -1)
    if mode == "multilabel":
        return x, targets.double().reshape(x.shape)
    return x, targets.reshape(n, -1)


def ref_region(
    name, mode, logits, targets, smooth=1.0, alpha=0.5, beta=0.5, per_image=False, class_weights=None, ignore_index=None
):
    """Dice / IoU / Tversky from the definitions: a loop over classes and (per_image) images."""
    x, t = _layout(mode, logits, targets)
    n, c = x.shape[:2]
    probs = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    groups = [[i] for i in range(n)] if per_image else [list(range(n))]
    per_class = []
    for k in range(c):
        scores = []
        for g in groups:
            p = probs[g, k].reshape(-1)
            tt = t[g].reshape(-1) if mode == "multiclass" else t[g, k].reshape(-1)
            keep = torch.ones_like(p, dtype=torch.bool) if ignore_index is None else tt != ignore_index
            y = (tt == k).double() if mode == "multiclass" else tt
            p, y = p[keep], y[keep]
            inter = (p * y).sum()
            if name == "dice":
                scores.append((2 * inter + smooth) / (p.sum() + y.sum() + smooth))
            elif name == "iou":
                scores.append((inter + smooth) / (p.sum() + y.sum() - inter + smooth))
            else:
                fp, fn = (p * (1 - y)).sum(), ((1 - p) * y).sum()
                scores.append((inter + smooth) / (inter + alpha * fp + beta * fn + smooth))
        per_class.append(1 - torch.stack(scores).mean())
    per_class = torch.stack(per_class)
    if class_weights is None:
        return per_class.mean()
    w = torch.tensor(class_weights, dtype=torch.float64)
    return (per_class * w).sum() / w.sum()


def ref_ce(mode, logits, targets, label_smoothing=0.0, class_weights=None, ignore_index=None):
    x, t = _layout(mode, logits, targets)
    w = torch.tensor(class_weights, dtype=torch.float64) if class_weights is not None else None
    if mode == "multiclass":
        return F.cross_entropy(
            x, t, weight=w, ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing
        )
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    we = (w.view(1, -1, 1) if w is not None else torch.ones(1, x.shape[1], 1, dtype=torch.float64)).expand_as(x)
    smoothed = t * (1 - label_smoothing) + label_smoothing / 2
    total = F.binary_cross_entropy_with_logits(x[keep], smoothed[keep], weight=we[keep], reduction="sum")
    return total / we[keep].sum()


def ref_focal(mode, logits, targets, alpha=0.25, gamma=2.0, class_weights=None, ignore_index=None):
    x, t = _layout(mode, logits, targets)
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    if mode != "multiclass":
        a = -1 if alpha is None else alpha  # torchvision's "no alpha"
        return torchvision.ops.sigmoid_focal_loss(x[keep], t[keep], alpha=a, gamma=gamma, reduction="mean")
    p = torch.softmax(x, 1)
    y = t.clamp(0, x.shape[1] - 1)
    p_y = p.gather(1, y.unsqueeze(1)).squeeze(1)[keep]
    w_y = torch.tensor(class_weights, dtype=torch.float64)[y[keep]] if class_weights is not None else 1.0
    return (-w_y * (1 - p_y) ** gamma * torch.log(p_y)).mean()


def reference(name, mode, logits, targets, **opts):
    common = {k: opts[k] for k in ("class_weights", "ignore_index") if k in opts}
    region = {k: opts[k] for k in ("smooth", "per_image") if k in opts}
    if name == "cross_entropy":
        return ref_ce(mode, logits, targets, label_smoothing=opts.get("label_smoothing", 0.0), **common)
    if name == "focal":
        return ref_focal(mode, logits, targets, alpha=opts.get("alpha", 0.25), gamma=opts.get("gamma", 2.0), **common)
    if name == "dice_bce":
        return ref_ce(mode, logits, targets, **common) + ref_region("dice", mode, logits, targets, **region, **common)
    if name == "tversky":
        region.update(alpha=opts.get("alpha", 0.5), beta=opts.get("beta", 0.5))
    return ref_region(name, mode, logits, targets, **region, **common)


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    assert torch.isfinite(got), got
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- values

VALUE_CASES = [(name, mode, {}, True) for name, mode in ALL] + [(name, mode, {}, False) for name, mode in ALL]
VALUE_CASES += [
    ("dice", "binary", {"smooth": 0.0}, True),
    ("dice", "binary", {"per_image": True}, True),
    ("dice", "multiclass", {"per_image": True, "class_weights": [0.2, 1.0, 3.0]}, True),
    ("dice", "multilabel", {"ignore_index": -1, "class_weights": [1.0, 0.0, 2.0]}, True),
    ("dice", "multiclass", {"ignore_index": 255, "smooth": 0.5}, True),
    ("iou", "multiclass", {"per_image": True, "ignore_index": 255}, True),
    ("iou", "binary", {"smooth": 0.0, "ignore_index": -1}, True),
    ("tversky", "binary", {"alpha": 0.3, "beta": 0.7}, True),
    ("tversky", "multilabel", {"alpha": 0.7, "beta": 0.2, "per_image": True}, True),
    ("tversky", "multiclass", {"alpha": 1.0, "beta": 1.0, "class_weights": [1.0, 2.0, 3.0]}, True),
    ("dice_bce", "multilabel", {"class_weights": [1.0, 2.0, 0.5], "ignore_index": -1}, True),
    ("dice_bce", "multiclass", {"ignore_index": 255, "per_image": True}, True),
    ("focal", "binary", {"alpha": None, "gamma": 0.0}, True),
    ("focal", "binary", {"alpha": 0.75, "gamma": 0.5, "ignore_index": -1}, True),
    ("focal", "multilabel", {"alpha": 0.5, "gamma": 3.0}, False),
    ("focal", "multiclass", {"gamma": 1.0, "class_weights": [0.25, 1.0, 2.0], "ignore_index": 255}, True),
    ("cross_entropy", "multiclass", {"label_smoothing": 0.1}, False),
    (
        "cross_entropy",
        "multiclass",
        {"label_smoothing": 0.2, "class_weights": [1.0, 2.0, 3.0], "ignore_index": 255},
        True,
    ),
    ("cross_entropy", "multiclass", {"class_weights": [0.5, 1.0, 4.0]}, False),
    ("cross_entropy", "binary", {"label_smoothing": 0.1, "ignore_index": -1}, True),
    ("cross_entropy", "multilabel", {"label_smoothing": 0.3, "class_weights": [1.0, 0.5, 2.0]}, False),
]


@pytest.mark.parametrize("name,mode,opts,seg", VALUE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_value_matches_independent_reference(name, mode, opts, seg):
    x, t = make(mode, seg, ignore=IGNORE[mode] if "ignore_index" in opts else None)
    got = FUNCTIONS[name](x, t, mode, **opts)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close(got, reference(name, mode, x, t, **opts))
    assert_close(MODULES[name](mode, **opts)(x, t), got, rtol=0, atol=0)  # the module is the function


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal", "cross_entropy", "dice_bce"])
@pytest.mark.parametrize("layout", ["(N,)", "(N,1)", "(N,1)+(N,)", "(N,1,H,W)", "(N,1,H,W)+(N,H,W)"])
def test_binary_accepts_every_documented_shape(name, layout):
    x, t = make("binary", seg="H" in layout, channel="+" not in layout)
    if layout == "(N,)":
        x, t = x[:, 0], t[:, 0]
    assert_close(FUNCTIONS[name](x, t, "binary"), reference(name, "binary", x, t))


def test_focal_is_torchvision_sigmoid_focal_loss_directly():
    x, t = make("multilabel", seg=True, seed=3)
    for alpha, gamma in [(0.25, 2.0), (0.9, 1.0), (None, 2.0)]:
        want = torchvision.ops.sigmoid_focal_loss(
            x, t, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean"
        )
        torch.testing.assert_close(L.focal_loss(x, t, "multilabel", alpha=alpha, gamma=gamma), want)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.99, 1.0, 2.0])
@pytest.mark.parametrize("mode", MODES)
def test_focal_gradient_is_finite_when_a_probability_rounds_to_one(mode, gamma):
    """(1 - p)^gamma has an infinite derivative at p = 1 for gamma < 1: the loss must still give
    finite gradients (a float32 logit margin of ~17 rounds a softmax probability to 1)."""
    if mode == "multiclass":
        x = torch.tensor([[17.0, 0.0, 0.0], [0.3, 0.1, -0.2], [-30.0, 30.0, 0.0]], requires_grad=True)
        t = torch.tensor([0, 2, 1])
    else:
        x = torch.tensor([[40.0, -40.0, 0.3], [-40.0, 40.0, -0.2]], requires_grad=True)
        t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        if mode == "binary":
            x, t = x[:, :1].detach().clone().requires_grad_(True), t[:, :1]
    loss = L.focal_loss(x, t, mode, gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), x.grad
    # away from the rounding, the gradient is the usual one (double precision, no rounding)
    xd = x.detach().double().requires_grad_(True)
    L.focal_loss(xd, t.double() if mode != "multiclass" else t, mode, gamma=gamma).backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-6, rtol=1e-4)


def test_focal_is_not_the_tutorial_scalar_focal():
    """The tutorial form (focal factor of the mean BCE) gives a different value: ours is per element."""
    x, t = make("binary", seed=4)
    bce = F.binary_cross_entropy_with_logits(x, t)
    tutorial = 0.25 * (1 - torch.exp(-bce)) ** 2 * bce
    assert abs(float(L.focal_loss(x, t) - tutorial)) > 1e-3


def test_cross_entropy_is_f_cross_entropy_directly():
    x, t = make("multiclass", seg=True, seed=5, ignore=255)
    w = torch.tensor([1.0, 2.0, 0.5])
    want = F.cross_entropy(x, t, weight=w, ignore_index=255, label_smoothing=0.15)
    got = L.cross_entropy_loss(x, t, label_smoothing=0.15, class_weights=w.tolist(), ignore_index=255)
    torch.testing.assert_close(got, want)


def test_dice_bce_is_bce_plus_dice():
    x, t = make("binary", seed=6)
    want = F.binary_cross_entropy_with_logits(x, t) + L.dice_loss(x, t)
    torch.testing.assert_close(L.dice_bce_loss(x, t), want)


def test_per_image_differs_from_global():
    x, t = make("binary", seed=8)
    assert abs(float(L.dice_loss(x, t) - L.dice_loss(x, t, per_image=True))) > 1e-4


# --------------------------------------------------------------------------- gradients

GRAD_CASES = [(name, mode, {}) for name, mode in ALL] + [
    ("dice", "multiclass", {"per_image": True, "class_weights": [0.5, 1.0, 2.0]}),
    ("iou", "binary", {"ignore_index": -1}),
    ("tversky", "multiclass", {"alpha": 0.3, "beta": 0.7, "ignore_index": 255}),
    ("dice_bce", "multilabel", {"class_weights": [1.0, 2.0, 0.5], "per_image": True}),
    ("focal", "multiclass", {"class_weights": [0.25, 1.0, 2.0]}),
    ("focal", "binary", {"alpha": None, "gamma": 1.5}),
    ("cross_entropy", "multiclass", {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 3.0], "ignore_index": 255}),
    ("cross_entropy", "multilabel", {"label_smoothing": 0.2, "ignore_index": -1}),
]


@pytest.mark.parametrize("name,mode,opts", GRAD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_gradcheck_float64(name, mode, opts):
    x, t = make(
        mode, seg=True, n=2, size=3, dtype=torch.float64, ignore=IGNORE[mode] if "ignore_index" in opts else None
    )
    if mode != "multiclass":
        t = t.double()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: FUNCTIONS[name](z, t, mode, **opts), (x,))


# --------------------------------------------------------------------------- edge cases


def _hard(mode, seed=0):
    x, t = make(mode, seed=seed)
    if mode == "binary":
        t = (t > 0.5).float()
    return x, t


def _saturated(mode, t, correct: bool):
    """Logits of ±100 that predict the targets exactly (or exactly wrong)."""
    sign = 1.0 if correct else -1.0
    if mode == "multiclass":
        onehot = F.one_hot(t, 3).permute(0, 3, 1, 2).float()
        return sign * 100.0 * (2 * onehot - 1)
    return sign * 100.0 * (2 * t - 1)


def _value_and_grad(fn, x, t, mode, **opts):
    x = x.clone().requires_grad_(True)
    loss = fn(x, t, mode, **opts)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name,mode", ALL)
@pytest.mark.parametrize("correct", [True, False], ids=["right", "wrong"])
def test_saturated_logits_finite_and_correct(name, mode, correct):
    _, t = _hard(mode)
    x = _saturated(mode, t, correct)
    loss, grad = _value_and_grad(FUNCTIONS[name], x, t, mode)
    assert torch.isfinite(grad).all()
    assert_close(loss, reference(name, mode, x, t))
    if correct:
        assert float(loss) < 1e-6  # a perfect prediction costs nothing
    else:
        assert float(loss) > 0.5


@pytest.mark.parametrize("name,mode", ALL)
@pytest.mark.parametrize("case", ["zero_targets", "zero_predictions", "both_zero"])
def test_all_zero_targets_or_predictions(name, mode, case):
    x, t = _hard(mode, seed=2)
    if case in ("zero_targets", "both_zero"):
        t = torch.zeros_like(t)  # multiclass: everything is class 0
    if case in ("zero_predictions", "both_zero"):
        # p = 0 everywhere (multiclass: every pixel confidently class 0)
        x = torch.full_like(x, -100.0) if mode != "multiclass" else _saturated(mode, torch.zeros_like(t), True)
    loss, grad = _value_and_grad(FUNCTIONS[name], x, t, mode)
    assert torch.isfinite(grad).all()
    assert_close(loss, reference(name, mode, x, t))
    if case == "both_zero":
        assert float(loss) < 1e-6  # nothing there, nothing predicted


def test_empty_class_without_smoothing_is_finite():
    """smooth=0 and an empty class with no prediction: 0/0 is defined as score 0, not NaN."""
    x, t = torch.full((2, 1, 3, 3), -200.0), torch.zeros(2, 1, 3, 3)
    for fn in (L.dice_loss, L.iou_loss, L.tversky_loss):
        loss, grad = _value_and_grad(fn, x, t, "binary", smooth=0.0)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name,mode", ALL)
def test_ignore_index_everywhere_but_one_pixel(name, mode):
    x, t = _hard(mode, seed=3)
    ign = IGNORE[mode]
    t_ignored = torch.full_like(t, ign)
    if mode == "multiclass":
        t_ignored[1, 2, 3] = t[1, 2, 3]
    else:
        t_ignored[1, :, 2, 3] = t[1, :, 2, 3]
    loss, grad = _value_and_grad(FUNCTIONS[name], x, t_ignored, mode, ignore_index=ign)
    # the same loss as the one pixel on its own, and no gradient anywhere else
    x1 = x[1:2, :, 2:3, 3:4]
    t1 = t[1:2, 2:3, 3:4] if mode == "multiclass" else t[1:2, :, 2:3, 3:4]
    assert_close(loss, FUNCTIONS[name](x1, t1, mode))
    assert_close(loss, reference(name, mode, x, t_ignored, ignore_index=ign))
    mask = torch.ones_like(grad, dtype=torch.bool)
    mask[1, :, 2, 3] = False
    assert torch.isfinite(grad).all() and grad[mask].abs().max() == 0 and grad[~mask].abs().max() > 0


@pytest.mark.parametrize("name,mode", ALL)
def test_every_element_ignored_gives_zero_not_nan(name, mode):
    x, t = _hard(mode)
    loss, grad = _value_and_grad(FUNCTIONS[name], x, torch.full_like(t, IGNORE[mode]), mode, ignore_index=IGNORE[mode])
    assert float(loss) == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("name,mode", ALL)
def test_fp16_tensors_give_a_float32_loss(name, mode):
    x, t = make(mode, n=4, size=32, seed=9)
    x16 = x.half()
    t16 = t.half() if mode != "multiclass" else t
    loss, grad = _value_and_grad(FUNCTIONS[name], x16, t16, mode)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16 and torch.isfinite(grad).all()
    want = FUNCTIONS[name](x16.float(), t16.float() if mode != "multiclass" else t, mode)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,mode", ALL)
def test_bf16_autocast_statistics_in_float32(name, mode):
    _, t = make(mode, n=4, size=32, seed=10)
    c = 1 if mode == "binary" else 3
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, c, 1)
    inputs = torch.randn(4, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(inputs)
        assert logits.dtype == torch.bfloat16  # the test means something only if autocast is on
        loss = FUNCTIONS[name](logits, t, mode)
    assert loss.dtype == torch.float32
    # the same bf16 logits through a float32 loss outside autocast: identical statistics
    torch.testing.assert_close(loss, FUNCTIONS[name](logits.detach().float(), t, mode), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


# --------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    # (mode, logits shape, targets, what the message must say)
    ("binary", (4, 2), torch.zeros(4, 2), "one logit channel"),
    ("binary", (4, 1, 3, 3), torch.zeros(4, 3, 4), "target shape"),
    ("binary", (4,), torch.zeros(4, 1, 1), "target shape"),
    ("binary", (4, 1), torch.zeros(4, 1, dtype=torch.long), "floating point"),
    ("binary", (4, 1), torch.tensor([[0.0], [1.0], [2.0], [0.5]]), "out of range"),
    ("binary", (4, 1), torch.tensor([[0.0], [-0.5], [1.0], [1.0]]), "values in [0, 1]"),
    ("binary", (4, 1), torch.tensor([[0.0], [float("nan")], [1.0], [1.0]]), "out of range"),
    ("multilabel", (4, 3), torch.zeros(4, 2), "target shape"),
    ("multilabel", (4, 3), torch.zeros(4, 3, dtype=torch.bool), "floating point"),
    ("multilabel", (4, 3, 2, 2), torch.full((4, 3, 2, 2), 3.0), "out of range"),
    ("multilabel", (4,), torch.zeros(4), "channel dim"),
    ("multiclass", (4, 3), torch.zeros(4, 3), "target shape"),
    ("multiclass", (4, 3), torch.zeros(4), "integer class indices"),
    ("multiclass", (4, 3, 2, 2), torch.zeros(4, 3, 2, 2, dtype=torch.long), "target shape"),
    ("multiclass", (4, 3), torch.tensor([0, 1, 3, 2]), "[0, 3)"),
    ("multiclass", (4, 3), torch.tensor([0, -1, 1, 2]), "out of range"),
    ("multiclass", (4, 1), torch.zeros(4, dtype=torch.long), "C >= 2"),
]


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("mode,shape,targets,fragment", BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_raises_user_error_naming_loss_and_shapes(name, mode, shape, targets, fragment):
    if (
        name in ("cross_entropy", "focal")
        and mode == "multiclass"
        and targets.is_floating_point()
        and targets.shape == shape
    ):
        # float targets of the logits' shape are class probabilities there (Mixup / CutMix); all-zero rows are not
        fragment = "summing to 1"
    with pytest.raises(UserError) as info:
        FUNCTIONS[name](torch.zeros(shape), targets, mode)
    message = str(info.value)
    assert fragment in message
    assert f"{name}_loss" in message and f"mode={mode}" in message
    assert str(tuple(shape)) in message and str(tuple(targets.shape)) in message  # both shapes named
    assert "expected" in message and "\n" not in message


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: L.dice_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "softmax"), "not one of"),
        (
            lambda: L.dice_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), "multiclass"),
            "floating-point",
        ),
        (lambda: L.dice_loss(torch.zeros(2, 3), [0, 1], "multiclass"), "must be tensors"),
        (
            lambda: L.dice_loss(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "multiclass", class_weights=[1, 2]
            ),
            "one weight per class",
        ),
        (
            lambda: L.cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), class_weights=[1, -1, 2]),
            ">= 0",
        ),
        (lambda: L.dice_loss(torch.zeros(2, 1), torch.zeros(2, 1), smooth=-1.0), "smooth=-1.0"),
        (
            lambda: L.cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.0),
            "label_smoothing",
        ),
        (lambda: L.focal_loss(torch.zeros(2, 1), torch.zeros(2, 1), alpha=1.5), "alpha=1.5"),
        (lambda: L.focal_loss(torch.zeros(2, 1), torch.zeros(2, 1), gamma=-1.0), "gamma"),
        (lambda: L.focal_loss(torch.zeros(2, 3), torch.zeros(2, 3), "multilabel", class_weights=[1, 1, 1]), "alpha"),
        (lambda: L.tversky_loss(torch.zeros(2, 1), torch.zeros(2, 1), beta=-0.1), "beta"),
    ],
)
def test_bad_options_raise_user_error(call, fragment):
    with pytest.raises(UserError) as info:
        call()
    assert fragment in str(info.value)


def test_ignore_index_makes_an_out_of_range_value_legal():
    x, t = torch.zeros(2, 3), torch.tensor([0, 255])
    with pytest.raises(UserError):
        L.cross_entropy_loss(x, t)
    assert torch.isfinite(L.cross_entropy_loss(x, t, ignore_index=255))


# --------------------------------------------------------------------------- build_loss


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(
    "task,mode", [("classification", "multiclass"), ("binary", "binary"), ("multilabel", "multilabel")]
)
def test_build_loss_builtin_uses_the_config(name, task, mode):
    # each loss is given the options it reads (an option it does not read is an error, below)
    opts = {
        "cross_entropy": {"label_smoothing": 0.1},
        "focal": {"alpha": 0.3, "gamma": 1.5},
        "tversky": {"alpha": 0.3, "beta": 0.6, "smooth": 0.5},
    }.get(name, {"smooth": 0.5})
    fn = L.build_loss(LossConfig(name=name, sync=False, **opts), task, num_classes=3)
    assert isinstance(fn, MODULES[name]) and fn.mode == mode
    x, t = make(mode, seg=False, seed=11)
    assert_close(fn(x, t), reference(name, mode, x, t, **opts))


def test_build_loss_default_is_cross_entropy_with_class_weights_and_ignore():
    cfg = LossConfig(class_weights=[1.0, 2.0, 3.0], ignore_index=255)
    fn = L.build_loss(cfg, "classification", num_classes=3)
    x, t = make("multiclass", seg=True, ignore=255)
    torch.testing.assert_close(fn(x, t), F.cross_entropy(x, t, weight=torch.tensor([1.0, 2.0, 3.0]), ignore_index=255))


@pytest.mark.parametrize(
    "cfg,task,fragment",
    [
        (LossConfig(name="dise"), "classification", "cross_entropy, dice, dice_bce, iou, focal, tversky"),
        (LossConfig(name="dice", mode="binary"), "classification", "loss.mode=binary"),
        (LossConfig(name="dice", mode="multiclass"), "multilabel", "set loss.mode=multilabel"),
        (LossConfig(name="dice"), "regression", "task='regression'"),
        (LossConfig(name="dice", label_smoothing=0.1), "classification", "label_smoothing"),
        (LossConfig(name="focal", per_image=True), "classification", "per_image"),
        (LossConfig(name="dice", class_weights=[1.0, 2.0]), "classification", "3 classes"),
        (LossConfig(name="focal", class_weights=[1.0]), "binary", "loss.alpha"),
        (LossConfig(name="tversky", alpha=None), "binary", "loss.alpha=null"),
        (LossConfig(name="dice", args={"x": 1}), "binary", "loss.args"),
        (LossConfig(name="no_such_package.losses:MyLoss"), "binary", "cannot import 'no_such_package.losses'"),
        (LossConfig(name="helpers_userloss:Missing"), "binary", "has no 'Missing'"),
        (LossConfig(name="helpers_userloss:NOT_CALLABLE"), "binary", "not callable"),
        (LossConfig(name="helpers_userloss:"), "binary", "package.module:Name"),
        (LossConfig(name="helpers_userloss:ScaledCrossEntropy", args={"weight": 2}), "binary", "fix loss.args"),
        (LossConfig(name="ddp_finetune.config:LossConfig"), "binary", "not an nn.Module"),
    ],
    ids=lambda v: v.name if isinstance(v, LossConfig) else str(v)[:30],
)
def test_build_loss_bad_config_raises_user_error(cfg, task, fragment):
    with pytest.raises(UserError) as info:
        L.build_loss(cfg, task, num_classes=3)
    assert fragment in str(info.value)


def test_user_loss_function_by_import_path():
    fn = L.build_loss(LossConfig(name="helpers_userloss:scaled_bce", args={"scale": 2.0}), "binary", num_classes=1)
    x, t = make("binary", seg=False)
    torch.testing.assert_close(fn(x, t), 2.0 * F.binary_cross_entropy_with_logits(x, t))


def test_user_loss_class_by_import_path():
    import helpers_userloss

    fn = L.build_loss(
        LossConfig(name="helpers_userloss:ScaledCrossEntropy", args={"scale": 3.0}), "classification", num_classes=3
    )
    assert isinstance(fn, helpers_userloss.ScaledCrossEntropy) and fn.scale == 3.0
    x, t = make("multiclass", seg=False)
    torch.testing.assert_close(fn(x, t), 3.0 * F.cross_entropy(x, t))


def test_user_loss_from_an_installed_package():
    fn = L.build_loss(LossConfig(name="torch.nn:BCEWithLogitsLoss"), "binary", num_classes=1)
    x, t = make("binary", seg=False)
    torch.testing.assert_close(fn(x, t), F.binary_cross_entropy_with_logits(x, t))


# --------------------------------------------------------------------------- one table, one validation

# a value for every LossConfig field that differs from its default
NOT_DEFAULT = {
    "mode": "multiclass",
    "label_smoothing": 0.1,
    "smooth": 0.5,
    "alpha": 0.5,
    "beta": 0.7,
    "gamma": 3.0,
    "per_image": True,
    "ignore_index": 255,
    "class_weights": [1.0, 2.0, 3.0],
    "sync": False,
    "accumulation": "micro_batch",
    "args": {"scale": 2.0},
}


def test_table_options_are_config_fields_and_kernel_fields():
    """A loss's options are its class's keyword-only parameters, named like LossConfig fields;
    its kernel takes the ones that are not common to every loss."""
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert set(NOT_DEFAULT) == fields - {"name"}
    assert set(L.LOSS_FUNCTIONS) == set(L.LOSSES)
    for name, cls in L.LOSSES.items():
        assert cls.name == name and issubclass(cls, L.Loss)
        assert set(cls.option_names()) <= fields, name
        kernel_fields = {f.name for f in dataclasses.fields(cls.kernel_type)}
        assert kernel_fields == set(cls.option_names()) - {"ignore_index", "class_weights", "sync"}, name
    assert {n for n, cls in L.LOSSES.items() if cls.is_region()} == {"dice", "dice_bce", "iou", "tversky"}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_function_is_the_class_called_once(name):
    """Plain classes, findable by `grep "class DiceLoss"`; the function takes the class's options
    (the same names, defaults and order) and gives the same value."""
    cls = MODULES[name]
    source = inspect.getsource(inspect.getmodule(cls))
    assert f"class {cls.__name__}(Loss):" in source and getattr(L, cls.__name__) is cls
    fn = inspect.signature(FUNCTIONS[name])
    module = inspect.signature(cls)
    assert list(module.parameters.values())[: len(fn.parameters) - 2] == list(fn.parameters.values())[2:]
    assert list(module.parameters)[len(fn.parameters) - 2 :] == ["accumulation", "defer_target_check"]
    with pytest.raises(TypeError, match="not_an_option"):
        cls(not_an_option=1)
    mode = "multiclass"
    logits, targets = (
        torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)),
        torch.arange(75).reshape(3, 5, 5) % 4,
    )
    assert torch.equal(FUNCTIONS[name](logits, targets, mode), cls(mode)(logits, targets))


def _reads(name):
    if ":" in name:
        return {"args", "ignore_index", "sync"}
    cls = L.LOSSES[name]
    return {"mode", *cls.option_names()} | ({"accumulation"} if cls.is_region() else set())


@pytest.mark.parametrize("name", [*FUNCTIONS, "helpers_userloss:scaled_bce"])
@pytest.mark.parametrize("option", list(NOT_DEFAULT))
def test_an_option_the_loss_does_not_read_is_an_error(name, option):
    cfg = LossConfig(name=name, **{option: NOT_DEFAULT[option]})
    if option in _reads(name):
        cfg.validate()  # read: accepted
        return
    with pytest.raises(UserError) as info:
        cfg.validate()
    message = str(info.value)
    assert f"loss.{option}=" in message and f"not used by {name}" in message and "\n" not in message


def test_options_set_to_their_defaults_are_accepted_by_every_loss():
    for name in [*FUNCTIONS, "helpers_userloss:scaled_bce"]:
        LossConfig(name=name, gamma=2.0, smooth=1.0, alpha=0.25, accumulation="exact").validate()


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("loss.gamma=3", "loss.gamma=3.0 is not used by dice (only by focal)"),
        ("loss.mode=softmax", "loss.mode='softmax' is not one of binary, multilabel, multiclass"),
        ("loss.accumulation=sometimes", "loss.accumulation='sometimes' is not one of exact, micro_batch"),
        ("loss.smooth=-1", "loss.smooth=-1.0 must be >= 0"),
        ("loss.class_weights=[1, -2]", "must be finite, >= 0"),
    ],
)
def test_loss_config_is_checked_when_the_config_loads(override, fragment):
    from ddp_finetune.config import config_from_dict

    with pytest.raises(UserError) as info:
        config_from_dict({"data": {"path": "x"}, "loss": {"name": "dice"}}, [override])
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory):
    """Launch tests/scripts/losses_2proc.py once on 2 gloo ranks; its JSON report."""
    out = tmp_path_factory.mktemp("losses_2proc") / "report.json"
    run_script_2proc(SCRIPT, out)
    return json.loads(out.read_text())


def test_two_ranks_equal_one_rank_for_every_loss_and_mode(two_rank_report):
    report = two_rank_report
    assert report["world_size"] == 2
    results = report["results"]
    assert {(r["loss"], r["mode"]) for r in results} >= set(ALL)  # nothing skipped
    assert {r["split"] for r in results} == {"halves", "uneven"}
    # float64 shows the logic is exact; float32 only adds the rounding of a different sum order
    tolerance = {"float64": 1e-6, "float32": 1e-5}
    assert {r["dtype"] for r in results} == set(tolerance)
    bad = [
        r for r in results if not (r["loss_rel"] <= tolerance[r["dtype"]] and r["grad_rel"] <= tolerance[r["dtype"]])
    ]
    assert not bad, json.dumps(bad, indent=1)
    assert all(r["ref_grad_max"] > 1e-4 and r["ref_loss"] > 1e-3 for r in results)  # the comparisons are not 0 == 0


def test_a_loss_added_as_documented_is_synchronized_on_two_ranks(two_rank_report):
    """tests/helpers_newloss.py's loss (kernel, class, function, table row, nothing else) is among the
    2-rank cases above, in every mode, and equals its 1-rank value like the built-in ones."""
    modes = {r["mode"] for r in two_rank_report["results"] if r["loss"] == helpers_newloss.NAME}
    assert modes == {"binary", "multilabel", "multiclass"}


def test_a_loss_added_as_documented_works_with_the_config_and_exact_accumulation(monkeypatch):
    from ddp_finetune.config import config_from_dict
    from ddp_finetune.losses import build, table

    losses = {**table.LOSSES}
    monkeypatch.setattr(build, "LOSSES", losses)  # the table check_loss_config and build_loss read
    helpers_newloss.register(losses, {})
    cfg = config_from_dict({"data": {"path": "x"}, "loss": {"name": "vnet_dice", "smooth": 0.5}})
    with pytest.raises(UserError, match="loss.gamma=3.0 is not used by vnet_dice"):
        config_from_dict({"data": {"path": "x"}, "loss": {"name": "vnet_dice"}}, ["loss.gamma=3"])
    loss_fn = L.build_loss(cfg.loss, "segmentation", 3)
    assert isinstance(loss_fn, helpers_newloss.VNetDiceLoss) and loss_fn.kernel.smooth == 0.5
    assert L.needs_statistics_pass(loss_fn)
    # exact accumulation: 4 micro-batches of 2 through statistics / surrogate = one batch of 8
    g = torch.Generator().manual_seed(0)
    logits, targets = (
        torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (8, 6, 6), generator=g),
    )
    whole = logits.clone().requires_grad_(True)
    reference = loss_fn(whole, targets)
    reference.backward()
    parts = logits.clone().requires_grad_(True)
    chunks = list(zip(parts.split(2), targets.split(2)))
    stats = loss_fn.reduce_statistics(sum(loss_fn.statistics(x, t) for x, t in chunks))
    values = []
    for x, t in chunks:
        value = loss_fn.surrogate(x, t, stats, micro_batches=4)
        (value / 4).backward()
        values.append(value.detach())
    assert all(torch.allclose(v, reference.detach(), rtol=1e-12) for v in values)
    assert torch.allclose(parts.grad, whole.grad, rtol=1e-10, atol=1e-14)


def test_two_ranks_unsynchronized_dice_differs(two_rank_report):
    """Without sync the per-rank Dice is not the global one: the comparison above can fail."""
    nosync = two_rank_report["nosync_dice"]
    assert nosync["loss_rel"] > 1e-3 and nosync["grad_rel"] > 1e-3


def test_two_ranks_bad_target_on_one_rank_raises_on_both(two_rank_report):
    rank0, rank1 = two_rank_report["bad_target_messages"]
    assert rank0 is not None and "another rank" in rank0
    assert rank1 is not None and "1 target value is out of range" in rank1
