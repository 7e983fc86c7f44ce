"""`ddp-finetune check-invariance`: a good config passes; each known cause, injected, is detected and named."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_config

from ddp_finetune.commands.check_invariance import Comparison, Run, compare, likely_causes
from ddp_finetune.config import load_config


def _run(losses, micro, state):
    records = [{"loss": v, "lr/backbone": 0.1, "grad_norm": 1.0, "micro_losses": m} for v, m in zip(losses, micro)]
    return Run("x", records, state)


def test_compare_finds_the_first_step_and_tensor_that_differ():
    w = torch.ones(3)
    a = _run([1.0, 0.9, 0.8], [[1.0, 1.0]] * 3, {"w": w, "bn.running_mean": torch.zeros(2)})
    b = _run(
        [1.0, 0.9 * (1 + 1e-3), 0.8], [[1.0, 1.0], [1.0, 1.2], [1.0, 1.0]], {"w": w, "bn.running_mean": torch.ones(2)}
    )
    c = compare(a, b, 1e-5)
    assert c.first_step == 2 and "loss" in c.first_step_what and c.micro_first_step == 2
    assert c.first_tensor == "bn.running_mean" and math.isinf(c.tensor_max) is False and c.tensor_max > 0.5
    same = compare(a, a, 1e-5)
    assert same.first_step is None and same.first_tensor is None and same.tensor_max == 0.0


def test_likely_causes_follow_the_evidence(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}", "loss.name=dice", "loss.sync=false", "model.freeze_bn=true"])
    moved = Comparison(first_step=1, first_step_what="loss")
    causes = likely_causes(cfg, moved, Comparison(), cuda=False, has_bn=True)
    assert len(causes) == 1 and "loss.sync=true" in causes[0]
    cfg = load_config(None, [f"data.path={tmp_path}"])  # BatchNorm in train mode
    buffers = Comparison(first_tensor="layer1.0.bn1.running_mean", tensor_max=1e-2)
    assert "model.freeze_bn=true" in likely_causes(cfg, buffers, Comparison(), cuda=False, has_bn=True)[0]
    assert "model.sync_bn=true (GPU)" in likely_causes(cfg, buffers, Comparison(), cuda=True, has_bn=True)[0]
    cfg = load_config(None, [f"data.path={tmp_path}", "model.freeze_bn=true", "loss.name=helpers_userloss:X"])
    assert "all_reduce_sum_with_grad" in likely_causes(cfg, moved, Comparison(), cuda=False, has_bn=True)[0]
    moved.micro_first_step = 1
    assert "depends on the rank" in likely_causes(cfg, moved, Comparison(), cuda=False, has_bn=True)[0]


def _check(tmp_path, image_folder, name, *overrides):
    # resnet18 at 16 px, frozen BatchNorm, 2 steps of batch 8: the tests' tiny config
    cfg = tiny_config(tmp_path / name, image_folder, train={"epochs": 1, "batch_size": 8})
    tests = Path(__file__).resolve().parent  # the user losses of helpers_userloss.py, importable by every run
    env = {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    return run_cli("check-invariance", cfg, "--steps", "2", *overrides, check=False, timeout=900, env=env)


@pytest.mark.slow
def test_a_good_config_is_invariant(tmp_path, image_folder):
    proc = _check(tmp_path, image_folder, "good", "--out", tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "invariant: 2 processes train as 1 process" in proc.stdout
    assert "for scale, 1 process with the config's micro-batch" in proc.stdout
    assert {p.name for p in (tmp_path / "runs").iterdir()} >= {"single", "accum", "procs"}  # kept with --out


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,named",
    [
        (["model.freeze_bn=false"], "BatchNorm statistics per rank"),
        (["loss.name=dice", "loss.sync=false"], "a loss that is not synchronized"),
        (["loss.name=helpers_userloss:SquaredMeanCrossEntropy"], "a loss without global reductions"),
        (["loss.name=helpers_userloss:RankNoiseCrossEntropy"], "randomness that depends on the rank"),
    ],
    ids=["batchnorm", "unsynced_dice", "per_rank_user_loss", "rank_seeded_noise"],
)
def test_each_known_cause_is_detected_and_named(tmp_path, image_folder, overrides, named):
    proc = _check(tmp_path, image_folder, "bad", *overrides)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not invariant: first difference above" in proc.stdout
    first_cause = next(line for line in proc.stdout.splitlines() if "likely cause:" in line)
    assert named in first_cause, proc.stdout


def test_bad_input_is_one_line(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 1, "batch_size": 6})
    proc = run_cli("check-invariance", cfg, "--procs", "4", check=False)
    assert proc.returncode == 2 and "does not divide by --procs 4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = run_cli("check-invariance", cfg, "--procs", "2", "--out", tmp_path / "full", check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
