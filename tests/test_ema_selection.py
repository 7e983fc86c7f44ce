"""Model EMA (`train.ema_decay`), evaluation every N steps, the best model (`train.monitor`) and
early stopping: the average's arithmetic, the selection rules, and end-to-end runs that check
best/ is final/, that a resumed run equals the uninterrupted one bit for bit (EMA and early
stopping state included), and that 2 processes train as 1 process with grad_accum 2."""

import json

import pytest
import torch
from datagen import make_image_folder
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, read_summary, tiny_config

from ddp_finetune.config import load_config
from ddp_finetune.errors import UserError
from ddp_finetune.training.ema import ModelEma, warmup_decay
from ddp_finetune.training.selection import Selection

# ----------------------------------------------------------------------------- the average


def _linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_ema_follows_the_decay_and_its_warmup():
    model = _linear()
    ema = ModelEma(model, decay=0.9, warmup=True)
    start = model[0].weight.detach().clone()
    assert torch.equal(ema.module[0].weight, start)  # the average starts at the initial weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(step=1)
    d = warmup_decay(0.9, 1, True)
    assert d == pytest.approx(2 / 11)
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * model[0].weight, atol=1e-6)
    assert warmup_decay(0.9, 1000, True) == 0.9 and warmup_decay(0.9, 1, False) == 0.9


def test_ema_leaves_a_skipped_step_out():
    """A step the non-finite guard skipped (found_inf = 1 on the device) does not move the average."""
    model = _linear()
    ema = ModelEma(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(step=1, found_inf=torch.tensor(1.0))
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
    ema.update(step=2, found_inf=torch.tensor(0.0))
    assert not torch.equal(before["0.weight"], ema.module[0].weight)


def test_ema_state_round_trips():
    model = _linear()
    ema = ModelEma(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(step=1)
    other = ModelEma(_linear(), decay=0.5, warmup=False)
    other.averaged.load_state_dict(ema.averaged.state_dict())
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


# ----------------------------------------------------------------------------- selection


class _T:
    def __init__(self, monitor="val/top1", mode="auto", patience=None, min_delta=0.0):
        self.monitor, self.monitor_mode = monitor, mode
        self.early_stopping_patience, self.early_stopping_min_delta = patience, min_delta


@pytest.mark.parametrize(
    "monitor, values, best_step",
    [("val/top1", [0.5, 0.7, 0.6], 2), ("val/loss", [0.5, 0.7, 0.4], 3), ("val_ema/loss", [0.5, 0.5, 0.6], 1)],
)
def test_selection_keeps_the_best_by_mode(monitor, values, best_step):
    t, sel = _T(monitor), Selection()
    for step, v in enumerate(values, start=1):
        sel.observe(t, {monitor: v}, step)
    assert sel.best_step == best_step


def test_selection_stops_after_patience_without_min_delta_improvement():
    t, sel = _T(patience=2, min_delta=0.05), Selection()
    assert sel.observe(t, {"val/top1": 0.5}, 1)
    assert not sel.observe(t, {"val/top1": 0.54}, 2)  # +0.04 is within min_delta: no improvement
    assert not sel.should_stop(t)
    assert not sel.observe(t, {"val/top1": 0.3}, 3)
    assert sel.should_stop(t) and sel.best_step == 1


def test_selection_names_the_known_metrics_for_an_unknown_one():
    with pytest.raises(UserError, match="val/top1"):
        Selection().observe(_T("val/top5"), {"val/top1": 0.5, "val/loss": 1.0}, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.monitor=top1"], "val/<metric>"),
        (["train.monitor=val_ema/top1"], "train.ema_decay"),
        (["train.final_weights=ema"], "train.ema_decay"),
        (["train.early_stopping_patience=2"], "train.monitor"),
        (["train.ema_decay=1.0"], "train.ema_decay"),
        (["train.ema_decay=0.9", "train.final_weights=ema", "train.monitor=val/top1"], "val_ema/top1"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as err:
        load_config(None, ["data.path=x", *overrides])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ema") / "images", per_class=8, size=16)


def _sections(**train):
    # 18 training images, batch 6: 3 steps per epoch; evaluations at steps 2, 3, 4, 6, ...
    return dict(
        model={"name": "resnet18", "freeze_bn": True},
        train={
            "epochs": 4,
            "batch_size": 6,
            "ema_decay": 0.8,
            "eval_every_n_steps": 2,
            "monitor": "val_ema/loss",
            **train,
        },
        optim={"lr": 0.01},
    )


def test_best_model_is_final_and_ema_is_evaluated(tmp_path, images):
    config = tiny_config(tmp_path, images, **_sections())
    summary = fit_in_process(config)
    run = tmp_path / "run"
    records = read_metrics(run)
    val_steps = [r["step"] for r in records if r["split"] == "val"]
    assert val_steps == [2, 3, 4, 6, 8, 9, 10, 12]  # every 2 steps and each epoch's end, once each
    ema_losses = {r["step"]: r["loss"] for r in records if r["split"] == "val_ema"}
    assert list(ema_losses) == val_steps
    best_step = min(ema_losses, key=ema_losses.get)
    card = json.loads((run / "final" / "model.json").read_text())
    assert card["averaged"] is True
    assert card["selected"]["step"] == best_step == summary["selected"]["step"]
    assert card["selected"]["value"] == pytest.approx(ema_losses[best_step])
    assert (run / "best" / "manifest.json").is_file()
    assert max_abs_diff(load_weights(run), _weights(run / "best")) == 0.0


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_final_weights_ema_without_monitor(tmp_path, images):
    config = tiny_config(tmp_path, images, **_sections(monitor=None, final_weights="ema", eval_every_n_steps=None))
    fit_in_process(config, "train.epochs=1")
    card = json.loads((tmp_path / "run" / "final" / "model.json").read_text())
    assert card["averaged"] is True and card["selected"] is None
    assert not (tmp_path / "run" / "best").exists()


def test_early_stopping_resumes_bit_exact(tmp_path, images):
    """min_delta so large that nothing after the first evaluation improves: with patience 3 the run
    stops after the evaluations of steps 3, 4, 6, at step 6. A run killed at step 4 (after that
    step's evaluation and checkpoint) and resumed stops at the same step with the same weights,
    EMA metrics and selection."""
    sections = _sections(early_stopping_patience=3, early_stopping_min_delta=10.0)
    whole = tiny_config(tmp_path / "whole", images, **sections)
    parts = tiny_config(tmp_path / "parts", images, checkpoint={"every_n_steps": 4}, **sections)
    s_whole = fit_in_process(whole)
    fit_in_process(parts, "train.max_steps=4")
    s_parts = fit_in_process(parts, "checkpoint.resume=auto")
    a, b = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    assert s_whole["steps"] == s_parts["steps"] == 6
    assert s_whole["stopped_early"] and s_parts["stopped_early"]
    assert s_whole["selected"] == s_parts["selected"] and s_whole["selected"]["step"] == 2
    assert s_whole["val_ema"] == s_parts["val_ema"]
    assert max_abs_diff(load_weights(a), load_weights(b)) == 0.0

    def evals(run):
        return [(r["split"], r["step"], r["loss"]) for r in read_metrics(run) if r["split"] != "train"]

    assert evals(a) == evals(b)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path, images):
    """EMA metrics, the selected step and the final (best EMA) weights: 2 ranks = 1 rank x grad_accum 2."""
    sections = _sections()
    sections["train"].update(epochs=2, batch_size=6)
    sections["model"] = {"name": "resnet18", "freeze_bn": True}
    one = tiny_config(tmp_path / "one", images, **sections)
    fit_in_process(one, "train.grad_accum=2", "train.batch_size=6")
    two = tiny_config(tmp_path / "two", images, **sections)
    launch_2proc("train", two)
    a, b = tmp_path / "one" / "run", tmp_path / "two" / "run"
    sa, sb = read_summary(a), read_summary(b)
    assert sb["world_size"] == 2 and sa["grad_accum"] == 2
    assert sa["selected"]["step"] == sb["selected"]["step"]
    for key in ("loss", "top1"):
        assert sa["val_ema"][key] == pytest.approx(sb["val_ema"][key], abs=1e-5)
    assert max_abs_diff(load_weights(a), load_weights(b)) < 1e-5
