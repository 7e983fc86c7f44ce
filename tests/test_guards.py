"""Non-finite losses and gradients: the step is skipped on the device, counted, and the run stops
with one line once too many come in a row; no NaN reaches a checkpoint or final/."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import fit_in_process, load_weights, max_abs_diff, read_metrics, run_cli, tiny_config
from safetensors.torch import load_file

from ddp_finetune.training.guards import NonFiniteGuard, all_finite


@pytest.fixture(autouse=True)
def user_losses_importable(monkeypatch):
    """Child processes import helpers_faultyloss from tests/, as a user's PYTHONPATH would allow."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))


def _checkpoint_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, image_folder, optim):
    """Calls 2 and 3 (steps 2 and 3) return NaN: those steps leave weights and optimizer state
    untouched; the other steps train; the count is logged; the final weights are finite."""
    config = tiny_config(
        tmp_path,
        image_folder,
        loss={"name": "helpers_faultyloss:NaNAtCalls", "args": {"calls": [2, 3]}},
        optim={"name": optim, "lr": 0.01},
        checkpoint={"every_n_steps": 1, "keep_last": 10},
    )
    summary = fit_in_process(config)
    run = tmp_path / "run"
    assert summary["steps"] == 6
    w = {s: _checkpoint_weights(run, s) for s in range(1, 7)}
    assert max_abs_diff(w[1], w[2]) == 0.0 and max_abs_diff(w[2], w[3]) == 0.0, "skipped steps change nothing"
    assert max_abs_diff(w[3], w[4]) > 0 and max_abs_diff(w[4], w[5]) > 0, "real steps train"
    final = load_weights(run)
    assert all(torch.isfinite(t).all() for t in final.values())
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r.get("nonfinite_steps", 0) for r in train] == [0, 1, 2, 2, 2, 2]
    assert 0 <= summary["val"]["top1"] <= 1  # (the validation loss is this user loss too: NaN at its 2nd call)


def test_the_skipped_first_step_leaves_no_garbage_momentum(tmp_path, image_folder):
    """Fused SGD allocates its momentum buffers uninitialized on the first step: skipping that step
    must not leave them so (the buffers start at zero instead)."""
    skip_first = tiny_config(
        tmp_path / "skip",
        image_folder,
        loss={"name": "helpers_faultyloss:NaNAtCalls", "args": {"calls": [1]}},
        train={"epochs": 1},
    )
    fit_in_process(skip_first, "train.max_steps=2")
    # step 2 of that run is the first real step: the same as step 1 of a run that skips nothing
    clean = tiny_config(tmp_path / "clean", image_folder, train={"epochs": 1})
    fit_in_process(clean, "train.max_steps=1")
    first = load_weights(tmp_path / "clean" / "run")
    second = load_weights(tmp_path / "skip" / "run")
    # same initial weights, same first real update; only the batch differs (step 2 vs step 1 data)
    assert all(torch.isfinite(t).all() for t in second.values())
    assert max_abs_diff(first, second) < 1.0


def test_persistent_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, image_folder):
    config = tiny_config(
        tmp_path,
        image_folder,
        loss={"name": "helpers_faultyloss:NaNAtCalls", "args": {"calls": list(range(3, 100))}},
        train={"epochs": 4, "max_nonfinite_steps": 3, "check_every_n_steps": 1},
        checkpoint={"every_n_steps": 1, "keep_last": 2},
        log={"every_n_steps": 100},
    )
    proc = run_cli("train", config, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("ddp-finetune: error: 3 optimizer steps in a row (steps 3-5)"), err
    assert "last finite loss" in err[0] and "optim.lr" in err[0]
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_3", "step_4"], kept  # saved before the limit; steps 3-4 skipped, weights = step 2's
    assert max_abs_diff(_checkpoint_weights(run, 3), _checkpoint_weights(run, 4)) == 0.0
    assert not (run / "final").exists()


def test_a_huge_learning_rate_never_writes_nan_weights(tmp_path, image_folder):
    """optim.lr=1e6 blows the weights up: the run stops with one line, exit 2, and no checkpoint
    or final/ holds a NaN."""
    config = tiny_config(
        tmp_path, image_folder, optim={"lr": 1e6}, train={"epochs": 6}, checkpoint={"every_n_steps": 1, "keep_last": 20}
    )
    proc = run_cli("train", config, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "optim.lr" in err[0], proc.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "final").exists()
    for folder in (run / "checkpoints").iterdir():
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), folder.name
    assert not any('"loss": NaN' in line for line in (run / "metrics.jsonl").read_text().splitlines())


def test_guard_counts_on_the_device_and_checks_on_demand():
    guard = NonFiniteGuard("cpu", limit=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, fused=True)
    for loss, grad in ((1.0, 1.0), (float("nan"), float("nan")), (2.0, float("inf"))):
        g = torch.full((2,), grad)
        guard.before_update(opt, [g], None, torch.tensor(loss))
        assert float(opt.found_inf) == float(grad != 1.0)
        guard.after_update(opt)
        assert not hasattr(opt, "found_inf")
    with pytest.raises(Exception, match=r"2 optimizer steps in a row \(steps 2-3\).*last finite loss 2"):
        guard.check(3)
    guard.before_update(opt, [torch.ones(2)], None, torch.tensor(0.5))
    guard.after_update(opt)
    assert guard.check(4) == {"nonfinite_steps": 2}


def test_all_finite_looks_at_buffers_too():
    bn = torch.nn.BatchNorm1d(3)
    assert all_finite(bn)
    bn.running_mean[1] = float("nan")
    assert not all_finite(bn)
    assert json.dumps(True)


def _scaler_steps(guard, scaler, w, opt, factor: float, steps: int, first: int) -> int:
    """Steps the way Accelerate takes them under fp16 (scale, backward, scaler.step, update), each
    reported to the guard as skipped or not, checked every step; returns the last step taken."""
    step = first - 1
    for step in range(first, first + steps):
        loss = w.sum() * factor
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        guard.before_update(opt, [w.grad], None, loss)  # the step's loss, for the error message
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        guard.after_update(opt, skipped_by_scaler=scaler.get_scale() < before)  # halved: the step was skipped
        guard.check(step)
    return step


def test_fp16_loss_scale_calibration_is_not_a_failure():
    """GradScaler halves its scale from 2^16 on each overflow until the gradients fit (issue 26 item 5):
    those skips are expected and counted apart; they used to count toward train.max_nonfinite_steps
    and stopped a healthy fp16 run. A NaN loss still stops the run once the scale has collapsed.
    A CPU GradScaler with gradients of 2^115 plays fp16's overflow: they overflow float32 at scales
    of 2^13 and above, so the first 4 steps are skipped."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=2.0**-120)
    scaler = torch.amp.GradScaler("cpu")
    guard = NonFiniteGuard("cpu", limit=3, on_device=False, scaler=scaler)
    step = _scaler_steps(guard, scaler, w, opt, 2.0**115, steps=10, first=1)
    assert scaler.get_scale() == 2.0**12
    assert guard.check(step) == {"nonfinite_steps": 0, "scaler_skipped_steps": 4}
    assert torch.all(w != 0)  # the steps after the calibration trained

    # every step NaN from now on: each one halves the scale; below 1 they are non-finite steps
    with pytest.raises(Exception, match=r"3 optimizer steps in a row \(steps 23-25\) had non-finite"):
        _scaler_steps(guard, scaler, w, opt, float("nan"), steps=30, first=step + 1)
    assert scaler.get_scale() == 2.0**-3


@pytest.mark.gpu
def test_cuda_fp16_run_is_not_stopped_by_the_scalers_calibration(tmp_path, image_folder):
    """The GPU end of issue 26 item 5: with train.max_nonfinite_steps=1 any GradScaler skip used to stop
    an fp16 run. It finishes now; the skips (if this run's scale calibrates) are logged apart."""
    config = tiny_config(tmp_path, image_folder, train={"epochs": 2, "mixed_precision": "fp16"})
    run_cli("train", config, "train.max_nonfinite_steps=1", "train.check_every_n_steps=1")
    records = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "train"]
    assert records and not any(r.get("nonfinite_steps") for r in records)
    skips = max((r.get("scaler_skipped_steps", 0) for r in records), default=0)
    print(f"GradScaler skipped {skips} steps of {records[-1]['step']}")
