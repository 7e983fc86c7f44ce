"""Shared helpers for the tests that train: tiny configs, in-process and launched runs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# The smallest torchvision classifier the package builds that has no dropout (its resume is exact like
# resnet18's): 0.35 M parameters with 3 classes, a 3 MB checkpoint against resnet18's 86 MB. For the tests
# of checkpoints, resume and faults, which need a model's behaviour, not its size (issue 25: disk).
SMALL_MODEL = "shufflenet_v2_x0_5"


def tiny_config(tmp_path, image_folder, **sections) -> Path:
    """A YAML config that trains resnet18 on 16px images in a few seconds.

    No data workers (the default is `auto`): on 16px images starting them costs more than they
    save (tests/test_train.py and test_lr_e2e.py took 179 s with auto's 1 worker against 110 s
    without, on the 2-core machine); the tests of workers ask for them."""
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "data": {"path": str(image_folder), "image_size": 16, "augment": False, "val_fraction": 0.25, "num_workers": 0},
        "model": {"name": "resnet18", "freeze_bn": True},
        "train": {"epochs": 2, "batch_size": 6},
        "optim": {"lr": 0.01},
        "log": {"progress_bar": False, "every_n_steps": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args, timeout=600, check=True, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python -m ddp_finetune ARGS` in a child process; `env`: extra environment variables."""
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_finetune", *map(str, args)],
        capture_output=True,
        text=True,
        env={**child_env(), **(env or {})},
        timeout=timeout,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    """A TCP port no one listens on now, picked by the OS (bind to port 0). Every multi-process
    launch of the tests gets its own: a fixed port fails when another run (a parallel test
    session, a benchmark, another user) holds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_cmd(num_processes: int = 2) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N` of this interpreter's accelerate, on a free
    port; N gloo ranks on CPU (docs/pitfalls.md, 2). Append `-m ddp_finetune ...` or a script."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def launch_2proc(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m ddp_finetune ...` (2 gloo ranks on CPU)."""
    cmd = [*accelerate_launch_cmd(2), "-m", "ddp_finetune", *map(str, args)]
    env = child_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # 2 gloo ranks on the CPU, also on a machine with one GPU
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def run_script_2proc(script, *args, timeout=300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT ARGS` on a free port: 2 gloo ranks on
    the CPU (CUDA hidden, also on a 1-GPU machine where they would share a device); the script
    can import the package and tests/ helpers. Fails the test with the output's tail unless it exits 0."""
    cmd = [*accelerate_launch_cmd(2), str(script), *map(str, args)]
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@contextlib.contextmanager
def fresh_accelerate():
    """Accelerate keeps process-wide singletons (AcceleratorState, GradientState): reset them around
    an in-process run so each test builds its Accelerator from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def cli(*argv) -> int:
    """`ddp-finetune ARGV` in this process (faster than a subprocess); its exit code. Accelerate's singletons reset."""
    from ddp_finetune.commands.cli import main

    with fresh_accelerate():
        return main([str(a) for a in argv])


def one_error_line(capsys, *argv) -> str:
    """`cli(*argv)` must stop with exit code 2 and one `ddp-finetune: error: ...` line on stderr; returns it."""
    code = cli(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ddp-finetune: error: "), err
    return err[0]


def fit_in_process(config_path, *overrides) -> dict:
    """Run `fit` in this process (faster than a subprocess), with Accelerate's singletons reset."""
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import fit

    with fresh_accelerate():
        return fit(load_config(config_path, list(overrides)))


def model_input(samples):
    """uint8 samples (as the datasets give them) as the normalized float batch the model sees (ImageNet
    statistics, on the CPU): what `run.prepare_input` does inside the step."""
    import torch

    from ddp_finetune.data.transforms import DeviceInput
    from ddp_finetune.models.parts import IMAGENET_MEAN, IMAGENET_STD

    return DeviceInput(IMAGENET_MEAN, IMAGENET_STD)(torch.stack(list(samples)))


def normalized_by_hand(x, mean, std):
    """A uint8 batch as torchvision's ToDtype(scale=True) + Normalize(mean, std) would give it: the
    reference the package's on-device normalization (`transforms.DeviceInput`) is checked against."""
    import torch

    assert x.dtype == torch.uint8
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return (x.float() / 255 - mean) / std


def datasets_of(cfg):
    """(train, val, classes, splits) of a config, as a run builds them (ImageNet normalization)."""
    from ddp_finetune.data.datasets import build_datasets
    from ddp_finetune.data.sources import decide_classes, load_splits

    splits = load_splits(cfg.data, cfg.seed, cfg.task)
    classes = decide_classes(cfg, splits)
    train, val = build_datasets(cfg, splits, classes)
    return train, val, classes, splits
