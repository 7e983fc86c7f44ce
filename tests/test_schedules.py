"""Schedules per optimizer step: warmup, step_decay, torch schedulers by name, resume, lr plot.

python -m pytest tests/test_schedules.py -q
"""

import io
import math
import sys

import pytest
import torch
from torch import nn

from ddp_finetune.commands.lr_plot import lr_plot_command, plot_lrs, plot_schedule, simulate_lrs
from ddp_finetune.config import OptimConfig, ScheduleConfig, config_from_dict
from ddp_finetune.errors import UserError
from ddp_finetune.models import build_model, generic_parts
from ddp_finetune.training.param_groups import build_param_groups, lr_log, make_optimizer
from ddp_finetune.training.schedules import build_schedule, torch_scheduler_names, warmup_steps_of

BACKBONE_LR, HEAD_LR = 0.02, 0.2


def lrs_of(schedule) -> list[float]:
    """The lr of each group for the next optimizer step."""
    return [float(g["lr"]) for g in schedule.optimizer.param_groups]


def make_optimizer_groups(name: str = "sgd") -> torch.optim.Optimizer:
    """Four groups (backbone, backbone_no_decay, head, head_no_decay) with a 10x head lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cfg = OptimConfig(name=name, lr=BACKBONE_LR, head_lr=HEAD_LR, weight_decay=1e-4)
    return make_optimizer(build_param_groups(model, generic_parts(model, ["2"]), cfg), cfg)


def sched(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


def run(schedule, optimizer, steps: int, spe: int, metrics=None, start: int = 0) -> list[list[float]]:
    """The lrs used by steps start..start+steps-1, calling epoch_end at epoch boundaries."""
    seen = []
    for s in range(start, start + steps):
        seen.append(lrs_of(schedule))
        optimizer.step()  # no gradients: a no-op, but it is what the loop does before schedule.step()
        schedule.step()
        if (s + 1) % spe == 0:
            epoch = s // spe
            schedule.epoch_end(epoch, None if metrics is None else {"val/loss": metrics(epoch)})
    return seen


def ratio_kept(lrs: list[float]) -> bool:
    backbone, head = lrs[0], lrs[2]
    return head == pytest.approx(backbone * HEAD_LR / BACKBONE_LR, rel=1e-9, abs=1e-15)


# --------------------------------------------------------------------------- closed forms


def test_constant_is_the_base_lr_of_each_group():
    optimizer = make_optimizer_groups()
    schedule = build_schedule(sched(name="constant"), optimizer, 3, 2)
    for lrs in run(schedule, optimizer, 6, 3):
        assert lrs == [BACKBONE_LR, BACKBONE_LR, HEAD_LR, HEAD_LR]


def test_step_decay_equals_torch_steplr_step_by_step():
    spe, every, gamma, epochs = 3, 2, 0.5, 7
    optimizer = make_optimizer_groups()
    schedule = build_schedule(sched(name="step_decay", every=every, gamma=gamma), optimizer, spe, epochs)
    reference = make_optimizer_groups()
    steplr = torch.optim.lr_scheduler.StepLR(reference, step_size=every * spe, gamma=gamma)
    for _ in range(spe * epochs):
        assert lrs_of(schedule) == pytest.approx([g["lr"] for g in reference.param_groups], rel=1e-12)
        optimizer.step(), schedule.step()
        reference.step(), steplr.step()
    assert lrs_of(schedule)[0] == pytest.approx(BACKBONE_LR * gamma**3)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_step_decay_counts_epochs_after_warmup(interval):
    optimizer = make_optimizer_groups()
    schedule = build_schedule(
        sched(name="step_decay", every=1, gamma=0.1, warmup_steps=2, interval=interval), optimizer, 4, 3
    )
    seen = [lrs[0] for lrs in run(schedule, optimizer, 12, 4)]
    expected = [BACKBONE_LR * r for r in (1 / 3, 2 / 3, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_warmup_then_cosine_matches_closed_form():
    spe, epochs, warmup, eta_min = 4, 5, 3, 1e-4
    optimizer = make_optimizer_groups()
    schedule = build_schedule(
        sched(name="CosineAnnealingLR", warmup_steps=warmup, args={"eta_min": eta_min}), optimizer, spe, epochs
    )
    assert schedule.resolved_args["T_max"] == spe * epochs - warmup  # the default length
    t_max = spe * epochs - warmup
    for s, lrs in enumerate(run(schedule, optimizer, spe * epochs, spe)):
        for lr, base in zip(lrs, (BACKBONE_LR, BACKBONE_LR, HEAD_LR, HEAD_LR)):
            if s < warmup:
                expected = base * (s + 1) / (warmup + 1)
            else:
                k = s - warmup
                expected = eta_min + (base - eta_min) * (1 + math.cos(math.pi * k / t_max)) / 2
            assert lr == pytest.approx(expected, rel=1e-9), (s, lr, expected)


def test_epoch_interval_cosine_with_warmup_epochs():
    spe, epochs = 3, 5
    cfg = sched(name="CosineAnnealingLR", interval="epoch", warmup_epochs=1)
    assert warmup_steps_of(cfg, spe) == 3
    optimizer = make_optimizer_groups()
    schedule = build_schedule(cfg, optimizer, spe, epochs)
    seen = [lrs[2] for lrs in run(schedule, optimizer, spe * epochs, spe)]
    assert seen[:3] == pytest.approx([HEAD_LR * r for r in (0.25, 0.5, 0.75)])
    t_max = epochs - 1  # epochs after warmup
    for epoch in range(1, epochs):
        expected = HEAD_LR * (1 + math.cos(math.pi * (epoch - 1) / t_max)) / 2
        assert seen[epoch * spe : (epoch + 1) * spe] == pytest.approx([expected] * spe, rel=1e-9)


def test_fractional_warmup_epochs_round_to_steps():
    assert warmup_steps_of(sched(warmup_epochs=0.5), 7) == 4
    assert warmup_steps_of(sched(warmup_steps=5, warmup_epochs=3), 7) == 5


def test_warmup_ramps_to_onecycle_start_and_keeps_ratios():
    optimizer = make_optimizer_groups()
    schedule = build_schedule(sched(name="OneCycleLR", warmup_steps=4, args={"div_factor": 10.0}), optimizer, 5, 2)
    seen = run(schedule, optimizer, 10, 5)
    # OneCycleLR starts at max_lr / div_factor, max_lr defaulting to each group's base lr.
    assert seen[3][0] == pytest.approx(BACKBONE_LR / 10 * 4 / 5)
    assert seen[4][0] == pytest.approx(BACKBONE_LR / 10)
    assert max(lrs[2] for lrs in seen) == pytest.approx(HEAD_LR, rel=0.05)
    assert all(ratio_kept(lrs) for lrs in seen)


# --------------------------------------------------------------------------- ReduceLROnPlateau


def test_reduce_on_plateau_reacts_to_the_validation_metric():
    optimizer = make_optimizer_groups()
    cfg = sched(name="ReduceLROnPlateau", args={"patience": 0, "factor": 0.5}, monitor="val/loss")
    schedule = build_schedule(cfg, optimizer, 2, 10)
    start = lrs_of(schedule)
    for _ in range(2):
        optimizer.step(), schedule.step()
    assert lrs_of(schedule) == start  # optimizer steps do not move it
    schedule.epoch_end(0, {"val/loss": 1.0})
    schedule.epoch_end(1, {"val/loss": 0.8})  # improving
    assert lrs_of(schedule) == start
    schedule.epoch_end(2, {"val/loss": 0.9})  # worse: halve
    assert lrs_of(schedule) == pytest.approx([lr * 0.5 for lr in start])
    schedule.epoch_end(2, {"val/loss": 5.0})  # the same epoch again: ignored
    schedule.epoch_end(3, None)  # no evaluation: waits
    assert lrs_of(schedule) == pytest.approx([lr * 0.5 for lr in start])
    with pytest.raises(UserError, match="schedule.monitor"):
        schedule.epoch_end(4, {"val/acc": 0.5})


def test_reduce_on_plateau_waits_for_warmup_and_can_maximize():
    optimizer = make_optimizer_groups()
    cfg = sched(name="ReduceLROnPlateau", args={"patience": 0, "mode": "max"}, monitor="val/acc", warmup_steps=4)
    schedule = build_schedule(cfg, optimizer, 2, 10)
    accs = [0.5, 0.4, 0.6, 0.5]  # epochs 0-1 are warmup: the drops there are not seen
    seen = run_plateau(schedule, optimizer, accs, "val/acc")
    assert seen[4][0] == pytest.approx(BACKBONE_LR)  # epoch 2, warmup over
    assert lrs_of(schedule)[0] == pytest.approx(BACKBONE_LR * 0.1)  # epoch 3 dropped


def run_plateau(schedule, optimizer, values, key):
    seen = []
    for epoch, value in enumerate(values):
        for _ in range(schedule.steps_per_epoch):
            seen.append(lrs_of(schedule))
            optimizer.step(), schedule.step()
        schedule.epoch_end(epoch, {key: value})
    return seen


# --------------------------------------------------------------------------- every torch scheduler

ARGS = {
    "ConstantLR": {"total_iters": 2},
    "CosineAnnealingLR": {},
    "CosineAnnealingWarmRestarts": {"T_0": 3},
    "CyclicLR": {"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2},
    "ExponentialLR": {"gamma": 0.9},
    "LinearLR": {"start_factor": 1.0, "end_factor": 0.1},
    "MultiStepLR": {"milestones": [2, 5]},
    "OneCycleLR": {},
    "PolynomialLR": {"power": 2.0},
    "ReduceLROnPlateau": {"patience": 1},
    "StepLR": {"step_size": 2},
}


def test_the_args_table_covers_every_torch_scheduler():
    assert set(torch_scheduler_names()) == set(ARGS)


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("name", sorted(ARGS))
def test_every_torch_scheduler_builds_and_runs_the_whole_run(name, interval):
    spe, epochs = 3, 6
    optimizer = make_optimizer_groups()
    schedule = build_schedule(
        sched(name=name, interval=interval, warmup_steps=2, args=ARGS[name]), optimizer, spe, epochs
    )
    assert name in schedule.describe() and "18 steps" in schedule.describe()
    seen = run(schedule, optimizer, spe * epochs, spe, metrics=lambda epoch: 1.0)  # a flat metric: plateau drops
    assert all(math.isfinite(lr) and lr >= 0 for lrs in seen for lr in lrs)
    assert len({tuple(lrs) for lrs in seen[2:]}) > 1, "the schedule never changed the lr"
    if name != "CyclicLR":  # CyclicLR's base_lr / max_lr are absolute, the others scale each group
        assert all(ratio_kept(lrs) for lrs in seen)


def test_adamw_with_onecycle_cycles_betas():
    optimizer = make_optimizer_groups("adamw")
    schedule = build_schedule(sched(name="OneCycleLR"), optimizer, 4, 2)
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.95)  # OneCycleLR's max_momentum at the low lr
    seen = run(schedule, optimizer, 8, 4)
    beta1 = optimizer.param_groups[0]["betas"][0]
    assert 0.85 <= beta1 < 0.95 and max(lrs[0] for lrs in seen) == pytest.approx(BACKBONE_LR, rel=0.05)


# --------------------------------------------------------------------------- resume


def _roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("stop", [3, 11], ids=["mid_warmup", "after_warmup"])
@pytest.mark.parametrize("optimizer_first", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(name="CosineAnnealingLR"),
        dict(name="ExponentialLR", args={"gamma": 0.8}, interval="epoch"),
        dict(name="OneCycleLR"),
        dict(name="step_decay", every=1, gamma=0.5),
        dict(name="ReduceLROnPlateau", args={"patience": 0, "factor": 0.5}),
    ],
    ids=lambda c: c["name"],
)
def test_state_dict_round_trip_continues_identically(cfg, stop, optimizer_first):
    spe, epochs = 4, 5
    total = spe * epochs
    metric = lambda epoch: [1.0, 0.9, 0.95, 0.97, 0.5][epoch]  # noqa: E731  improves, then plateaus
    config = sched(warmup_steps=5, **cfg)

    optimizer = make_optimizer_groups()
    reference = run(build_schedule(config, optimizer, spe, epochs), optimizer, total, spe, metric)

    optimizer = make_optimizer_groups()
    schedule = build_schedule(config, optimizer, spe, epochs)
    first = run(schedule, optimizer, stop, spe, metric)
    saved = _roundtrip({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})

    optimizer = make_optimizer_groups()
    schedule = build_schedule(config, optimizer, spe, epochs)
    if optimizer_first:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
    else:
        schedule.load_state_dict(saved["schedule"])
        optimizer.load_state_dict(saved["optimizer"])
    rest = run(schedule, optimizer, total - stop, spe, metric, start=stop)
    assert first + rest == reference  # exactly, not approximately
    assert len({tuple(lrs) for lrs in reference}) > 3


def test_resume_with_another_schedule_is_a_user_error():
    optimizer = make_optimizer_groups()
    state = build_schedule(sched(name="constant"), optimizer, 2, 2).state_dict()
    other = build_schedule(sched(name="StepLR", args={"step_size": 1}), make_optimizer_groups(), 2, 2)
    with pytest.raises(UserError, match="schedule.name='StepLR'"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(name="cosine"), "schedule.name='cosine'.*CosineAnnealingLR"),
        (dict(name="LambdaLR"), "schedule.name='LambdaLR'"),
        (dict(name="StepLR"), r"schedule.args=\{\}.*step_size"),
        (dict(name="StepLR", args={"step_sizes": 2}), "schedule.args.*step_sizes"),
        (dict(name="ReduceLROnPlateau", args={"factor": 2.0}), "schedule.args.*Factor should be < 1.0"),
        (dict(name="constant", args={"T_max": 3}), "schedule.args"),
    ],
)
def test_bad_schedules_are_user_errors(cfg, match):
    with pytest.raises(UserError, match=match) as info:
        build_schedule(sched(**cfg), make_optimizer_groups(), 3, 2)
    assert "\n" not in str(info.value)


def test_names_are_case_insensitive_and_steps_per_epoch_must_be_positive():
    assert build_schedule(sched(name="steplr", args={"step_size": 1}), make_optimizer_groups(), 3, 2).name == "StepLR"
    with pytest.raises(UserError, match="batch_size"):
        build_schedule(sched(), make_optimizer_groups(), 0, 2)


# --------------------------------------------------------------------------- lr plot


def _plot_config(**schedule):
    return config_from_dict(
        {
            "data": {"path": "unused"},
            "model": {"name": "resnet18", "freeze_backbone": True, "unfreeze_at_epoch": 1},
            "train": {"epochs": 3},
            "optim": {"lr": 0.01, "head_lr": 0.1, "weight_decay": 1e-4, "layer_decay": 0.7},
            "schedule": schedule or {"name": "CosineAnnealingLR", "warmup_steps": 4},
        }
    )


def test_simulated_lrs_equal_a_manual_step_loop(tmp_path):
    cfg, spe = _plot_config(), 5
    series = simulate_lrs(cfg, spe)

    # The same run by hand, on the real model's parameters.
    model, parts, _ = build_model(cfg.model, 3)
    optimizer = make_optimizer(build_param_groups(model, parts, cfg.optim), cfg.optim)
    schedule = build_schedule(cfg.schedule, optimizer, spe, cfg.train.epochs)
    manual: dict[str, list[float]] = {}
    for s in range(spe * cfg.train.epochs):
        for key, lr in lr_log(optimizer, per_block=True).items():
            manual.setdefault(key, []).append(lr)
        optimizer.step(), schedule.step()
        if (s + 1) % spe == 0:
            schedule.epoch_end(s // spe, None)
    manual.pop("lr/backbone")  # repeated by lr/backbone.layer4 under layer decay
    assert series == manual
    assert set(series) == {"lr/head"} | {f"lr/backbone.{b}" for b in ("stem", "layer1", "layer2", "layer3", "layer4")}

    out = plot_lrs(series, tmp_path / "plots" / "lr.png", unfreeze_step=spe)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_plot_schedule_asks_models_for_the_head_and_draws_plateau_flat(tmp_path):
    cfg = _plot_config(name="ReduceLROnPlateau", warmup_steps=2)
    series = simulate_lrs(cfg, 4)  # groups of models.build_model's meta-device resnet18
    assert series["lr/head"][2:] == [0.1] * 10  # flat after warmup: no metrics without training
    assert series["lr/backbone.layer4"][2:] == pytest.approx([0.007] * 10)
    out, description = plot_schedule(cfg, 4, tmp_path / "lr.png")
    assert out.stat().st_size > 5000 and "ReduceLROnPlateau" in description


def test_lr_plot_command_writes_the_png(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: unused}\nmodel: {name: regnet_y_400mf}\nschedule: {name: OneCycleLR}\n")
    out = lr_plot_command(config, ["train.epochs=2"], tmp_path / "lr.png", steps_per_epoch=6)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert "6 optimizer steps/epoch x 2 epochs = 12 steps" in capsys.readouterr().out


def test_lr_plot_command_counts_steps_from_the_dataset(tmp_path, capsys, image_folder):
    from ddp_finetune.config import load_config
    from ddp_finetune.data.sources import load_splits

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {image_folder}}}\nmodel: {{name: resnet18}}\ntrain: {{batch_size: 4}}\n")
    lr_plot_command(config, [], tmp_path / "lr.png")
    expected = len(load_splits(load_config(config).data, 0).train) // 4
    assert expected > 0 and f"{expected} optimizer steps/epoch" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'ddp-finetune\[plot\]'"):
        plot_lrs({"lr/head": [0.1, 0.1]}, tmp_path / "lr.png")
