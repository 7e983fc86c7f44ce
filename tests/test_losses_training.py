"""What a training loop uses from the losses, beyond `loss_fn(logits, targets)`.

    python -m pytest tests/test_losses_training.py -q

1. The deferred target check (`defer_target_check=True`, `check_targets()`): no host sync per
   call, and a bad label still raises, on every rank, with the same one-line message.
2. Exact gradient accumulation of region losses (`needs_statistics_pass`, `statistics`,
   `reduce_statistics`, `surrogate`): k micro-batches give the loss value and the parameter
   gradient of the whole batch, on 1 rank and on 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_script_2proc
from host_syncs import host_syncs
from torch import nn

from ddp_finetune import losses as L
from ddp_finetune.config import LossConfig
from ddp_finetune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "losses_training_2proc.py"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]

MODES = ("binary", "multilabel", "multiclass")
CLASSES = {"binary": 1, "multilabel": 3, "multiclass": 3}
IGNORE = {"binary": -1, "multilabel": -1, "multiclass": 255}
REGION = ("dice", "iou", "tversky", "dice_bce")


def make(mode: str, n: int = 8, size: int = 5, ignore: bool = False, seed: int = 0, dtype=torch.float64):
    """Inputs (n, 4, size, size) for a conv head, and targets for the mode (some ignored)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g, dtype=torch.float64).to(dtype)
    if mode == "multiclass":
        t = torch.randint(0, 3, (n, size, size), generator=g)
    else:
        t = torch.rand(n, CLASSES[mode], size, size, generator=g, dtype=torch.float64)
        t = (torch.where(t > 0.8, t, (t > 0.5).double()) if mode == "binary" else (t > 0.5).double()).to(dtype)
    if ignore:
        t = torch.where(torch.rand(t.shape, generator=g) < 0.3, torch.full_like(t, IGNORE[mode]), t)
    return x, t


def conv_head(mode: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, CLASSES[mode], 1)).to(dtype)


def weights_for(mode: str) -> list[float]:
    return [2.0] if mode == "binary" else [0.5, 1.0, 2.0]


# --------------------------------------------------------------------------- deferred target check


def _options(name: str, mode: str) -> dict:
    options = {"ignore_index": IGNORE[mode]}
    if name != "focal" or mode == "multiclass":
        options["class_weights"] = weights_for(mode)
    return options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(L.LOSSES))
def test_deferred_training_calls_make_no_host_sync(device, name, mode):
    """forward + backward, and for a region loss the statistics pass + surrogates, wait for
    nothing: the bad-target count stays on the device until `check_targets`."""
    loss_fn = L.LOSS_MODULES[name](mode, defer_target_check=True, **_options(name, mode))
    head = conv_head(mode, dtype=torch.float32).to(device)
    x, t = make(mode, ignore=True, dtype=torch.float32)
    x, t = x.to(device), t.to(device)
    loss_fn(head(x), t).backward()  # first call: class weights copied to the device once
    with host_syncs(device) as seen:
        loss_fn(head(x), t).backward()
        if loss_fn.needs_statistics_pass:
            with torch.no_grad():
                stats = loss_fn.statistics(head(x[:4]), t[:4]) + loss_fn.statistics(head(x[4:]), t[4:])
            stats = loss_fn.reduce_statistics(stats)
            for part in (slice(0, 4), slice(4, 8)):
                (loss_fn.surrogate(head(x[part]), t[part], stats, micro_batches=2) / 2).backward()
    assert seen == []
    loss_fn.check_targets()  # the targets were fine


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_the_immediate_check_is_seen_as_a_host_sync(name):
    """The instrument can fail: the default (immediate) check reads the count back each call."""
    loss_fn = L.LOSS_MODULES[name]("multiclass")
    x, t = make("multiclass", dtype=torch.float32)
    logits = conv_head("multiclass", dtype=torch.float32)(x)
    loss_fn(logits, t)
    with host_syncs("cpu") as seen:
        loss_fn(logits, t)
    assert "aten._local_scalar_dense" in seen


@pytest.mark.parametrize("route", ["forward", "statistics"])
def test_a_bad_target_raises_at_the_next_check_not_before(route):
    loss_fn = L.DiceLoss("binary", ignore_index=-1, defer_target_check=True)
    x, good = make("binary", dtype=torch.float32)
    logits = conv_head("binary", dtype=torch.float32)(x)
    bad = good.clone()
    bad[0, 0, 0, :2] = 2.0
    if route == "forward":
        loss_fn(logits, bad)
        loss_fn(logits, good)
    else:
        loss_fn.reduce_statistics(loss_fn.statistics(logits, bad) + loss_fn.statistics(logits, good))
    with pytest.raises(UserError) as info:
        loss_fn.check_targets()
    message = str(info.value)
    assert message.startswith("dice_loss (mode=binary): 2 target values out of range") and "\n" not in message
    assert "expected values in [0, 1] or ignore_index=-1" in message
    loss_fn.check_targets()  # counted once: the next check starts from zero
    loss_fn(logits, good)
    loss_fn.check_targets()


def test_the_immediate_modes_still_raise_in_the_call():
    x, t = torch.zeros(2, 3), torch.tensor([0, 5])
    with pytest.raises(UserError, match="1 target value is out of range"):
        L.CrossEntropyLoss()(x, t)
    with pytest.raises(UserError, match="1 target value is out of range"):
        L.cross_entropy_loss(x, t)
    loss_fn = L.CrossEntropyLoss()
    with pytest.raises(UserError, match="1 target value out of range"):
        loss_fn.reduce_statistics(loss_fn.statistics(x, t))


def test_build_loss_defers_the_check_when_asked():
    fn = L.build_loss(LossConfig(name="dice"), "segmentation", 3, defer_target_check=True)
    assert fn.defer_target_check and not L.build_loss(LossConfig(name="dice"), "segmentation", 3).defer_target_check
    fn(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 9))
    with pytest.raises(UserError, match="4 target values out of range"):
        L.check_targets(fn)


# --------------------------------------------------------------------------- exact accumulation


def one_step(loss_fn, model, x, t, k: int):
    """What the loop does for one optimizer step of k micro-batches: (logged loss, parameter grads)."""
    model.zero_grad()
    xs, ts = x.chunk(k), t.chunk(k)
    if L.needs_statistics_pass(loss_fn):
        with torch.no_grad():
            stats = sum(loss_fn.statistics(model(xi), ti) for xi, ti in zip(xs, ts))
        stats = loss_fn.reduce_statistics(stats)
    logged = 0.0
    for xi, ti in zip(xs, ts):
        if L.needs_statistics_pass(loss_fn):
            loss = loss_fn.surrogate(model(xi), ti, stats, micro_batches=k) / k
        else:
            loss = loss_fn(model(xi), ti) / k
        loss.backward()
        logged = logged + loss.detach()
    return logged, [p.grad.clone() for p in model.parameters()]


def whole_batch(loss_fn, model, x, t):
    model.zero_grad()
    loss = loss_fn(model(x), t)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _variants(mode: str):
    yield "plain", {}
    yield "ignore_index", {"ignore_index": IGNORE[mode]}
    yield "per_image", {"per_image": True}
    yield "per_image+ignore_index", {"per_image": True, "ignore_index": IGNORE[mode]}
    yield "class_weights", {"class_weights": weights_for(mode)}
    yield (
        "per_image+class_weights+ignore_index",
        {
            "per_image": True,
            "class_weights": weights_for(mode),
            "ignore_index": IGNORE[mode],
        },
    )


ACCUMULATION_CASES = (
    [
        pytest.param(name, mode, options, id=f"{name}-{mode}-{label}")
        for name in REGION
        for mode in MODES
        for label, options in _variants(mode)
    ]
    + [
        # means over samples whose count depends on the targets
        pytest.param(name, mode, {"ignore_index": IGNORE[mode]}, id=f"{name}-{mode}-ignore_index")
        for name in ("cross_entropy", "focal")
        for mode in MODES
    ]
    + [
        pytest.param(
            "cross_entropy",
            "multiclass",
            {"class_weights": weights_for("multiclass")},
            id="cross_entropy-multiclass-class_weights",
        )
    ]
)


@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("name,mode,options", ACCUMULATION_CASES)
def test_exact_accumulation_equals_the_whole_batch(name, mode, options, k):
    """k micro-batches through the loop's protocol: the value and the gradient of the whole batch."""
    x, t = make(mode, ignore="ignore_index" in options, seed=len(name) + k)
    loss_fn = L.LOSS_MODULES[name](mode, **options)
    want_loss, want_grads = whole_batch(loss_fn, conv_head(mode), x, t)
    got_loss, got_grads = one_step(loss_fn, conv_head(mode), x, t, k)
    assert rel(got_loss, want_loss) <= 1e-10
    assert max(rel(g, w) for g, w in zip(got_grads, want_grads)) <= 1e-10
    assert min(float(w.abs().max()) for w in want_grads) > 1e-6  # not 0 == 0


@pytest.mark.parametrize("name,mode,options", ACCUMULATION_CASES)
def test_micro_batch_accumulation_is_not_the_whole_batch_where_a_pass_is_needed(name, mode, options):
    """Without the statistics pass, the mean of the micro-batches' losses is another objective:
    where `needs_statistics_pass` is true the comparison above could fail."""
    loss_fn = L.LOSS_MODULES[name](mode, **options)
    if not loss_fn.needs_statistics_pass:
        return
    x, t = make(mode, ignore="ignore_index" in options, seed=3)
    micro = L.LOSS_MODULES[name](mode, accumulation="micro_batch", **options)
    assert not micro.needs_statistics_pass
    want_loss, want_grads = whole_batch(loss_fn, conv_head(mode), x, t)
    got_loss, got_grads = one_step(micro, conv_head(mode), x, t, 4)
    assert max(rel(g, w) for g, w in zip(got_grads, want_grads)) > 1e-4


def test_which_losses_need_a_statistics_pass():
    def needs(name, mode="multiclass", **options):
        return L.LOSS_MODULES[name](mode, **options).needs_statistics_pass

    assert all(needs(name) for name in REGION)
    assert not any(needs(name, accumulation="micro_batch") for name in REGION)
    assert not any(needs(name, per_image=True) for name in REGION)  # the mean over images is exact
    # dice_bce's BCE mean over elements, when the count of elements depends on the targets
    assert needs("dice_bce", per_image=True, ignore_index=255)
    assert needs("dice_bce", per_image=True, class_weights=[1.0, 2.0, 3.0])
    assert not needs("dice_bce", "multilabel", per_image=True, class_weights=[1.0, 2.0, 3.0])
    # cross-entropy and focal: means over samples, exact from equal micro-batches unless the
    # count (ignored pixels; cross-entropy's multiclass weights) depends on the targets
    assert not needs("cross_entropy") and not needs("focal") and not needs("focal", class_weights=[1.0, 2.0, 3.0])
    assert needs("cross_entropy", ignore_index=255) and needs("focal", ignore_index=255)
    assert needs("cross_entropy", class_weights=[1.0, 2.0, 3.0])
    assert not needs("cross_entropy", "multilabel", class_weights=[1.0, 2.0, 3.0])
    assert not needs("cross_entropy", ignore_index=255, accumulation="micro_batch")
    user = L.build_loss(LossConfig(name="helpers_userloss:scaled_bce"), "binary", 1)
    assert not L.needs_statistics_pass(user)
    L.check_targets(user)  # nothing to check, nothing raised


@pytest.mark.parametrize("name", list(L.LOSSES))
@pytest.mark.parametrize("mode", MODES)
def test_the_surrogate_is_exact_for_every_builtin_loss(name, mode):
    """The protocol is generic: also cross-entropy and focal (with ignore_index and class
    weights, whose counts vary between micro-batches) come out exact through it."""
    options = {"ignore_index": IGNORE[mode]}
    if name != "focal" or mode == "multiclass":
        options["class_weights"] = weights_for(mode)
    x, t = make(mode, ignore=True, seed=5)
    loss_fn = L.LOSS_MODULES[name](mode, **options)
    want_loss, want_grads = whole_batch(loss_fn, conv_head(mode), x, t)
    head = conv_head(mode)
    xs, ts = x.chunk(4), t.chunk(4)
    with torch.no_grad():
        stats = loss_fn.reduce_statistics(sum(loss_fn.statistics(head(xi), ti) for xi, ti in zip(xs, ts)))
    got_loss = sum(loss_fn.surrogate(head(xi), ti, stats, micro_batches=4) / 4 for xi, ti in zip(xs, ts))
    got_loss.backward()
    assert rel(got_loss.detach(), want_loss) <= 1e-10
    assert max(rel(p.grad, w) for p, w in zip(head.parameters(), want_grads)) <= 1e-10


def test_statistics_are_detached_float32_under_autocast():
    loss_fn = L.DiceBCELoss("multiclass")
    x, t = make("multiclass", dtype=torch.float32)
    head = conv_head("multiclass", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        assert logits.dtype == torch.bfloat16
        stats = loss_fn.reduce_statistics(loss_fn.statistics(logits, t))
        loss = loss_fn.surrogate(logits, t, stats, micro_batches=1)
    assert stats.dtype == torch.float32 and not stats.requires_grad
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(logits.detach().float(), t), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in head.parameters())


def test_statistics_of_another_loss_are_refused():
    x, t = make("multiclass", dtype=torch.float32)
    stats = L.DiceLoss("multiclass").statistics(x[:, :3], t)
    with pytest.raises(ValueError, match="do not fit this loss"):
        L.DiceBCELoss("multiclass").surrogate(x[:, :3], t, stats, micro_batches=1)


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory):
    """Launch tests/scripts/losses_training_2proc.py once on 2 gloo ranks; its JSON report."""
    out = tmp_path_factory.mktemp("losses_training_2proc") / "report.json"
    run_script_2proc(SCRIPT, out)
    return json.loads(out.read_text())


def test_two_ranks_two_micro_batches_equal_one_rank_whole_batch(two_rank_report):
    assert two_rank_report["world_size"] == 2
    results = two_rank_report["accumulation"]
    assert {(r["loss"], r["mode"]) for r in results} == {(n, m) for n in REGION for m in MODES}
    assert any(r["statistics_pass"] for r in results) and any(not r["statistics_pass"] for r in results)
    bad = [r for r in results if not (r["loss_rel"] <= 1e-10 and r["grad_rel"] <= 1e-10)]
    assert not bad, json.dumps(bad, indent=1)
    assert all(r["ref_grad_max"] > 1e-4 and r["ref_loss"] > 1e-3 for r in results)  # not 0 == 0


@pytest.mark.parametrize("route", ["forward", "statistics"])
def test_two_ranks_bad_target_on_one_rank_raises_the_same_message_on_both_at_the_check(two_rank_report, route):
    rank0, rank1 = (r[route] for r in two_rank_report["deferred"])
    assert rank0["raised_early"] is None and rank1["raised_early"] is None
    assert rank0["host_syncs"] == [] and rank1["host_syncs"] == []
    assert rank0["message"] is not None and rank0["message"] == rank1["message"]
    assert "1 target value out of range" in rank0["message"] and "class indices in [0, 3)" in rank0["message"]
