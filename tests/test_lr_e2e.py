"""Learning rates end to end: freezing, gradual unfreezing, the logged lr at every world size,
skipped fp16 steps, the lr plot, and bad schedule input through the CLI.

One reference config (`_UNFREEZE`) is trained once per module on 1 process, with and without
gradient accumulation, and once each on 2 processes; most tests read those runs.
Its schedule is what can go wrong across world sizes: head_lr != lr, warmup, then cosine.
18 train images / batch 6 = 3 optimizer steps per epoch, 2 epochs; the backbone unfreezes at
epoch 1, so the epoch-0 checkpoint is `checkpoints/step_3`.
"""

from __future__ import annotations

import pytest
import torch
from datagen import make_image_folder
from helpers import (
    fit_in_process,
    fresh_accelerate,
    launch_2proc,
    load_weights,
    max_abs_diff,
    read_metrics,
    read_summary,
    run_cli,
    tiny_config,
)
from safetensors.torch import load_file

STEPS_PER_EPOCH = 3
_UNFREEZE = dict(
    model={"freeze_backbone": True, "unfreeze_at_epoch": 1},
    # small lrs: from ~0.05 a tiny frozen-BN resnet18 run turns chaotic and amplifies the float
    # rounding between world sizes; here 1 and 2 processes agree to ~1e-8
    optim={"lr": 0.01, "head_lr": 0.03},
    schedule={"name": "CosineAnnealingLR", "warmup_steps": 2},
    checkpoint={"keep_last": 10},
)
HEAD = ("fc.weight", "fc.bias")


# --------------------------------------------------------------------------- helpers


def initial_weights(config_path) -> dict:
    """The weights a run starts from: `train.setup` seeds, then builds the model."""
    from accelerate.utils import set_seed

    from ddp_finetune.config import load_config
    from ddp_finetune.models import build_model

    cfg = load_config(config_path)
    set_seed(cfg.seed)
    model, _, _ = build_model(cfg.model, 3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def backbone_equal(a: dict, b: dict) -> bool:
    keys = [k for k in a if k not in HEAD]
    assert keys and set(keys) == {k for k in b if k not in HEAD}
    return all(torch.equal(a[k], b[k]) for k in keys)


def head_changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in HEAD)


def logged_lrs(run_dir) -> dict[str, list[float]]:
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # log.every_n_steps=1
    return {key: [r[key] for r in train] for key in ("lr/backbone", "lr/head")}


def simulated_lrs(config_path, *overrides) -> dict[str, list[float]]:
    from ddp_finetune.commands.lr_plot import simulate_lrs
    from ddp_finetune.config import load_config

    return simulate_lrs(load_config(config_path, list(overrides)), STEPS_PER_EPOCH)


def checkpoint_weights(run_dir, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


# --------------------------------------------------------------------------- the reference runs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lr_e2e") / "images", per_class=8, size=16)


@pytest.fixture(scope="module")
def unfreeze_config(images, tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("unfreeze"), images, **_UNFREEZE)


@pytest.fixture(scope="module")
def one_proc(unfreeze_config):
    """{'plain': run dir, 'accum': run dir} of the reference config on 1 process."""
    base = unfreeze_config.parent
    fit_in_process(unfreeze_config, f"output_dir={base / 'p1'}")
    fit_in_process(unfreeze_config, f"output_dir={base / 'p1_accum'}", "train.grad_accum=3")
    return {"plain": base / "p1", "accum": base / "p1_accum"}


@pytest.fixture(scope="module")
def two_proc(unfreeze_config):
    """The same on 2 gloo ranks (3 images per rank per step; with grad_accum=3, 1 per micro-batch)."""
    base = unfreeze_config.parent
    proc = launch_2proc("train", unfreeze_config, f"output_dir={base / 'p2'}")
    assert "world size 2" in proc.stdout
    launch_2proc("train", unfreeze_config, f"output_dir={base / 'p2_accum'}", "train.grad_accum=3")
    return {"plain": base / "p2", "accum": base / "p2_accum"}


# --------------------------------------------------------------------------- freezing


def test_frozen_backbone_stays_bit_identical(tmp_path, image_folder):
    # weight decay and momentum would move any backbone parameter the optimizer touched
    config = tiny_config(
        tmp_path, image_folder, model={"freeze_backbone": True}, optim={"weight_decay": 0.01}, train={"epochs": 1}
    )
    summary = fit_in_process(config)
    assert summary["steps"] == STEPS_PER_EPOCH
    init, final = initial_weights(config), load_weights(tmp_path / "run")
    assert backbone_equal(init, final)  # parameters and BatchNorm buffers (freeze_bn in tiny_config)
    assert head_changed(init, final)


def test_unfreeze_at_epoch_1_on_one_process(unfreeze_config, one_proc):
    init = initial_weights(unfreeze_config)
    for run in one_proc.values():  # with and without gradient accumulation
        after_epoch0, final = checkpoint_weights(run, STEPS_PER_EPOCH), load_weights(run)
        assert backbone_equal(init, after_epoch0), f"{run.name}: backbone moved while frozen"
        assert head_changed(init, after_epoch0)
        assert not backbone_equal(after_epoch0, final), f"{run.name}: backbone did not train after unfreezing"
        assert read_summary(run)["steps"] == 2 * STEPS_PER_EPOCH
    assert max_abs_diff(load_weights(one_proc["plain"]), load_weights(one_proc["accum"])) <= 1e-5


def test_two_processes_train_and_log_like_one(unfreeze_config, one_proc, two_proc):
    init = initial_weights(unfreeze_config)
    expected = simulated_lrs(unfreeze_config)
    assert expected["lr/head"] != expected["lr/backbone"]
    for kind in ("plain", "accum"):
        p1, p2 = one_proc[kind], two_proc[kind]
        assert read_summary(p2)["world_size"] == 2 and read_summary(p2)["steps"] == 2 * STEPS_PER_EPOCH
        assert backbone_equal(init, checkpoint_weights(p2, STEPS_PER_EPOCH)), (
            f"{kind}: backbone moved while frozen on 2 ranks"
        )
        assert max_abs_diff(load_weights(p1), load_weights(p2)) <= 1e-5, kind
        # the schedule advances once per optimizer step: never per micro-batch, never per rank
        assert logged_lrs(p1) == logged_lrs(p2) == expected, kind


def test_resume_in_the_middle_of_the_frozen_epoch(unfreeze_config, one_proc, tmp_path):
    out = tmp_path / "resumed"
    overrides = (f"output_dir={out}", "checkpoint.every_n_steps=2")
    first = fit_in_process(unfreeze_config, *overrides, "train.max_steps=2")
    assert first["steps"] == 2
    second = fit_in_process(unfreeze_config, *overrides, "checkpoint.resume=auto")
    assert second["resumed_from"].endswith("step_2") and second["steps"] == 2 * STEPS_PER_EPOCH

    init = initial_weights(unfreeze_config)
    assert backbone_equal(init, checkpoint_weights(out, STEPS_PER_EPOCH))  # still frozen after the resume
    assert max_abs_diff(load_weights(one_proc["plain"]), load_weights(out)) <= 1e-6
    assert logged_lrs(out) == logged_lrs(one_proc["plain"])


# --------------------------------------------------------------------------- skipped steps


def _skip_optimizer_steps(monkeypatch, skip: set[int]) -> list[int]:
    """Make Accelerate's optimizer behave as under fp16 loss scaling on overflow at the chosen
    optimizer steps (1-based): no update, `step_was_skipped` True. Returns the steps seen."""
    from accelerate.optimizer import AcceleratedOptimizer

    original = AcceleratedOptimizer.step
    seen: list[int] = []

    def step(self, closure=None):
        if self.gradient_state.sync_gradients:
            seen.append(len(seen) + 1)
            if seen[-1] in skip:
                self._is_overflow = True  # what GradScaler's found-inf path leaves behind
                return None
            self._is_overflow = False
        return original(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    return seen


def _check_skips(run_dir, skip: set[int], config, *overrides) -> None:
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    total = 2 * STEPS_PER_EPOCH
    assert [r["step"] for r in train] == list(range(1, total + 1))  # the step count still advances
    skipped = {r["step"] for r in train if r.get("skipped_step")}
    assert skipped >= skip
    expected = simulated_lrs(config, *overrides)
    real = 0  # optimizer steps that really happened before this one
    for r in train:
        for key in ("lr/backbone", "lr/head"):
            assert r[key] == expected[key][real], (r["step"], key, real)
        real += r["step"] not in skipped
    assert real == total - len(skipped)


def test_a_skipped_step_does_not_advance_the_schedule(tmp_path, image_folder, monkeypatch):
    skip = {2, 5}
    seen = _skip_optimizer_steps(monkeypatch, skip)
    config = tiny_config(tmp_path, image_folder, **{**_UNFREEZE, "train": {"grad_accum": 3}})
    summary = fit_in_process(config)
    assert seen == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert {r["step"] for r in train if r.get("skipped_step")} == skip
    # lr of step 3 is the one step 2 would have used: step 2 did not count
    assert train[2]["lr/head"] == train[1]["lr/head"] != train[0]["lr/head"]
    _check_skips(tmp_path / "run", skip, config)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")


@pytest.mark.parametrize("precision", [pytest.param("fp16", marks=[pytest.mark.gpu, CUDA]), "no"])
def test_fp16_overflow_skips_the_step_and_not_the_schedule(tmp_path, image_folder, precision):
    """A real overflow, through public seams only: a user loss (`loss.name`) multiplies its
    gradient by 1e38 at training calls 2 and 5, i.e. optimizer steps 2 and 5 (grad_accum 1, no
    aux heads). Under fp16 loss scaling (x 2**16) that is inf: GradScaler skips the step and the
    schedule must not advance. The CPU twin (`no`) runs the same body: it checks that the loss is
    called once per optimizer step at the steps the GPU test means, and states what happens today
    without loss scaling: the gradient is huge but finite, clipping (max_grad_norm) bounds the
    update, no step is skipped and the schedule advances every step."""
    record = tmp_path / "loss_calls.txt"
    loss = {"name": "helpers_userloss:GradientBlowUp", "args": {"calls": [2, 5], "record": str(record)}}
    train = {"mixed_precision": precision, "max_grad_norm": 1.0}
    config = tiny_config(tmp_path, image_folder, **{**_UNFREEZE, "train": train, "loss": loss})
    summary = fit_in_process(config)
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["mixed_precision"] == precision
    # one training call per optimizer step, scaled where chosen: the call numbers are the steps
    assert record.read_text().splitlines() == ["1", "2 x", "3", "4", "5 x", "6"]

    train_log = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    skipped = {r["step"] for r in train_log if r.get("skipped_step")}
    if precision == "fp16":
        assert skipped >= {2, 5}  # loss scaling may also skip a step of its own
    else:
        assert skipped == set()  # a finite gradient is clipped and applied
    _check_skips(tmp_path / "run", skipped, config)
    weights = load_weights(tmp_path / "run")
    assert all(torch.isfinite(w.float()).all() for w in weights.values()), (
        "a skipped or clipped step leaves finite weights"
    )


# --------------------------------------------------------------------------- lr plot


def test_lr_plot_command_draws_what_training_logs(unfreeze_config, one_proc, tmp_path):
    png = tmp_path / "plots" / "lr.png"
    proc = run_cli("lr-plot", unfreeze_config, "--out", png)
    assert "wrote" in proc.stdout and "CosineAnnealingLR" in proc.stdout
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    # the simulated series (index s: the lr optimizer step s uses) is what the run logged at step s+1
    simulated = simulated_lrs(unfreeze_config)
    assert set(simulated) == {"lr/backbone", "lr/head"}
    assert simulated == logged_lrs(one_proc["plain"])
    assert simulated["lr/head"][0] < simulated["lr/head"][1]  # warmup is drawn, then cosine
    assert simulated["lr/head"][-1] < simulated["lr/head"][2]


# --------------------------------------------------------------------------- bad input

_BAD = [
    ("schedule.name=CosineAnealingLR", "CosineAnealingLR"),
    ("schedule.args={T_maxx: 3}", "T_maxx"),
    ("model.unfreeze_at_epoch=2", "unfreeze_at_epoch=2"),
    ("optim.lr=-0.1", "optim.lr=-0.1"),
    ("optim.layer_decay=1.5", "optim.layer_decay=1.5"),
    ("optim.layer_decay=0", "optim.layer_decay=0"),
]
_BAD_IDS = [
    "unknown-scheduler",
    "wrong-scheduler-args",
    "unfreeze-after-last-epoch",
    "negative-lr",
    "layer-decay-above-1",
    "layer-decay-0",
]


def _bad_config(tmp_path, image_folder):
    return tiny_config(
        tmp_path,
        image_folder,
        model={"freeze_backbone": True, "unfreeze_at_epoch": 1},
        schedule={"name": "CosineAnnealingLR"},
    )


def _one_error_line(code: int, err: str, named: str) -> None:
    err = err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp-finetune: error: "), err
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("override, named", _BAD, ids=_BAD_IDS)
def test_bad_schedule_input_is_one_line_exit_2(tmp_path, image_folder, capsys, override, named):
    """Through the CLI's `main` in this process (the scheduler errors come from `setup`, after
    the data and the model are built)."""
    from ddp_finetune.commands.cli import main

    config = _bad_config(tmp_path, image_folder)
    capsys.readouterr()
    with fresh_accelerate():
        code = main(["train", str(config), override])
    _one_error_line(code, capsys.readouterr().err, named)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_scheduler_args_from_a_real_process(tmp_path, image_folder):
    """The whole of a child process's stderr (import-time warnings included) and its exit code."""
    override, named = _BAD[1]
    proc = run_cli("train", _bad_config(tmp_path, image_folder), override, check=False)
    _one_error_line(proc.returncode, proc.stderr, named)
