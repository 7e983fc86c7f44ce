"""No host sync on an ordinary optimizer step: only check steps (train.check_every_n_steps, log,
checkpoint and epoch-end steps) may wait for the device.

The counting is done by tests/scripts/sync_counter.py (see its docstring for what counts as a sync
on a CPU); the GPU twin with torch.cuda.set_sync_debug_mode("error") is in benchmarks/device_check.sh.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datagen import make_image_folder
from helpers import ROOT, accelerate_launch_cmd, child_env, tiny_config

SCRIPT = ROOT / "tests" / "scripts" / "sync_counter.py"


def _config(tmp_path, **sections):
    images = make_image_folder(tmp_path / "images", per_class=16, size=16)
    # 36 training images, batch 4: 9 steps per epoch, 18 in all; checks every 8, logs every 5
    return tiny_config(
        tmp_path,
        images,
        train={"epochs": 2, "batch_size": 4, "check_every_n_steps": 8, **sections.pop("train", {})},
        log={"every_n_steps": 5},
        checkpoint={"every_epoch": False},
        **sections,
    )


def _reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(out.name + ".rank*"))]


def _assert_no_sync_off_check_steps(report: dict, total_steps: int) -> None:
    checks = set(report["check_steps"])
    assert checks == {5, 8, 9, 10, 15, 16, 18}, sorted(checks)
    calls = {int(k): v for k, v in report["calls"].items()}
    ordinary = [s for s in range(1, total_steps + 1) if s not in checks]
    offending = {s: calls[s] for s in ordinary if calls.get(s)}
    assert not offending, f"host syncs on ordinary steps: {offending}"
    # the counter sees the syncs that are allowed: it would see forbidden ones too
    assert any(calls.get(s) for s in checks), calls


@pytest.mark.parametrize("loss", ["cross_entropy", "dice"])
def test_one_process_syncs_only_on_check_steps(tmp_path, loss):
    config = _config(tmp_path, loss={"name": loss})
    out = tmp_path / "syncs.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(config), str(out)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = _reports(out)
    _assert_no_sync_off_check_steps(report, 18)


@pytest.mark.slow
def test_two_processes_with_accumulation_sync_only_on_check_steps(tmp_path):
    """The stop request is agreed (an all-reduce read back) on check steps only; the synchronized
    Dice loss checks its labels there too; accumulation adds no sync."""
    config = _config(tmp_path, loss={"name": "dice"}, train={"grad_accum": 2})
    out = tmp_path / "syncs.json"
    cmd = [*accelerate_launch_cmd(2), str(SCRIPT), str(config), str(out)]
    env = child_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(out)
    assert len(reports) == 2
    for report in reports:
        _assert_no_sync_off_check_steps(report, 18)
