"""Shared by tests/test_preemption.py and tests/test_slurm.py: one tiny training setup, the
command lines that run it, and one uninterrupted reference run per test session.

The setup is 48 images of 16x16 px in 3 classes (43 train after the validation split), resnet18
with frozen BatchNorm, global batch 8: 5 optimizer steps per epoch, 2 epochs, 10 steps.

A stop request must reach a run that is still training, however fast or slow the machine: the
loss is tests/helpers_userloss.py's GatedCrossEntropy, which the stop tests tell (`gate(...)`
overrides) to hold the run inside optimizer step GATE_STEP until the test has sent its request.
The run then stops at a step boundary at or after GATE_STEP (the loop decides which), before
TOTAL_STEPS. Without those overrides it is plain cross-entropy: the reference run uses it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 10
GATE_STEP = 3
LOSS = "helpers_userloss:GatedCrossEntropy"  # tests/ is on the children's PYTHONPATH

CONFIG = {
    "data": {"source": "imagefolder", "image_size": 16, "augment": False},
    "model": {"name": "resnet18", "freeze_bn": True},
    "train": {"epochs": 2, "batch_size": 8},
    "optim": {"lr": 0.01},
    "loss": {"name": LOSS},
    "log": {"progress_bar": False, "every_n_steps": 1},
}


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        PYTHONUNBUFFERED="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    env.update(extra)
    return env


def make_setup(root: Path) -> Path:
    """Write the images and the config under `root` once; return the config path."""
    from datagen import make_image_folder

    config = root / "config.yaml"
    if not config.exists():
        images = make_image_folder(root / "images", per_class=16, size=16)
        values = json.loads(json.dumps(CONFIG))
        values["data"]["path"] = str(images)
        values["output_dir"] = str(root / "default_out")
        config.write_text(yaml.safe_dump(values))
    return config


def train_cmd(config: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ddp_finetune", "train", str(config), f"output_dir={output_dir}", *overrides]


def gate(gate_dir: Path, step: int = GATE_STEP) -> list[str]:
    """Overrides that hold the run inside optimizer step `step` until `<gate_dir>/go` exists."""
    Path(gate_dir).mkdir(parents=True, exist_ok=True)
    return [f"loss.args.gate_dir={gate_dir}", f"loss.args.gate_call={step}"]


def wait_for_file(path: Path, proc: subprocess.Popen | None = None, timeout: float = 240, what: str = "") -> None:
    """Return once `path` exists; fail when `proc` ends first or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what or 'the run'} ended (exit {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s ({what or 'the run'})")
        time.sleep(0.05)


def reference_run(root: Path) -> Path:
    """An uninterrupted 1-process run (once per session); returns its final weights."""
    config = make_setup(root)
    out = root / "reference"
    weights = out / "final" / "model.safetensors"
    if not weights.exists():
        proc = subprocess.run(
            train_cmd(config, out), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"reference run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return weights


def max_weight_diff(a: Path, b: Path) -> float:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name, t in wa.items():
        assert torch.isfinite(t.float()).all(), f"{a}: {name} is not finite (the run diverged)"
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def stop_process(proc: subprocess.Popen) -> None:
    """Clean up after a failed test, by the id of the process we started: SIGTERM first (a
    torchrun launcher passes it on to its workers), SIGKILL if that is not enough."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
