"""No host sync on an ordinary optimizer step: only check steps (train.check_every_n_steps, log,
checkpoint and epoch-end steps) may wait for the device.

The counting is done by tests/scripts/sync_counter.py (see its docstring for what counts as a sync
on a CPU); the GPU twin, `test_cuda_ordinary_steps_do_not_sync` (tests/scripts/cuda_sync_check.py:
torch.cuda.set_sync_debug_mode("error") on every ordinary step), is a `gpu` test that
benchmarks/device_check.sh runs. fp16 is left out there: Accelerate reads the GradScaler's skip
flag after every step (README, Speed and mixed precision).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datagen import make_image_folder, make_jpeg_folder
from helpers import ROOT, accelerate_launch_cmd, child_env, tiny_config

SCRIPT = ROOT / "tests" / "scripts" / "sync_counter.py"
CUDA_SCRIPT = ROOT / "tests" / "scripts" / "cuda_sync_check.py"


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


CUDA_CASES = {
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "max_grad_norm": ["train.max_grad_norm=1.0", "train.grad_accum=2"],
    "decode_gpu": ["data.decode=gpu"],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_ordinary_steps_do_not_sync(tmp_path, case):
    """issue 26 item 7: on a GPU, any synchronizing call on an ordinary step raises (set_sync_debug_mode
    "error"), from torch's, Accelerate's or our code, data loading with workers and pinned memory
    included. The run must finish; the check steps are the CPU test's."""
    data = {"num_workers": 2}
    if case == "decode_gpu":  # nvJPEG wants JPEG files
        jpegs = make_jpeg_folder(tmp_path / "jpegs", classes=("cat", "dog", "fox"), per_class=16, height=24, width=24)
        data["path"] = str(jpegs)
    config = _config(tmp_path, data=data)
    out = tmp_path / "cuda_syncs.json"
    proc = subprocess.run(
        [sys.executable, str(CUDA_SCRIPT), str(config), str(out), *CUDA_CASES[case]],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode_catches_item"]
    assert sorted(report["check"]) == [5, 8, 9, 10, 15, 16, 18]
    assert sorted(report["ordinary"]) == [1, 2, 3, 4, 6, 7, 11, 12, 13, 14, 17]
