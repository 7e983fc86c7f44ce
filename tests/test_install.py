"""Installed = editable: a wheel built from the repository, installed in a fresh virtual
environment, runs from another folder with nothing of the repository in sight.

The wheel is built from a copy of the files a wheel is made of (pyproject.toml, README.md,
ddp_finetune/), so a file read at run time that is not declared as package data is missing here
as it would be for a user. The fresh environment gets the wheel only (`--no-deps`); it sees the
test environment's site-packages for torch & co through a `.pth` line, which adds those folders
to `sys.path` without running the `.pth` files in them, so the editable install stays invisible.
"""

import json
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import ROOT, child_env


def _run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv with the wheel installed, an environment for its commands)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT / "ddp_finetune", src / "ddp_finetune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("ddp_finetune-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    (Path(purelib) / "_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = child_env()
    env.pop("PYTHONPATH")  # nothing of the repository
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    return env_dir / "bin", env


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_runs_the_demo_from_another_folder(installed, tmp_path):
    bin_dir, env = installed
    where = _run([bin_dir / "python", "-c", "import ddp_finetune; print(ddp_finetune.__file__)"], tmp_path, env)
    assert where.stdout.startswith(str(bin_dir.parent)), where.stdout  # the wheel's copy, not the repository's

    assert "@digits_source" in _run([bin_dir / "ddp-finetune", "train", "-h"], tmp_path, env).stdout
    config = _run([bin_dir / "ddp-finetune", "config", "@segmentation_example", "data.path=."], tmp_path, env)
    assert "name: lraspp_mobilenet_v3_large" in config.stdout

    _run([bin_dir / "ddp-finetune", "init", "--task", "segmentation"], tmp_path, env)
    assert (tmp_path / "my_run.yaml").read_text().startswith("# ddp-finetune train my_run.yaml")

    demo = _run(
        [bin_dir / "ddp-finetune", "demo", "--seeds", "0", "train.max_steps=1", "log.progress_bar=false"],
        tmp_path,
        env,
        timeout=900,
    )
    assert "| seed | fine-tuned top-1 | from scratch top-1 | difference |" in demo.stdout
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [0] and set(summary["seeds"][0]) >= {"fine-tuned", "from scratch"}
