"""The guards around the Accelerator (the launcher's process count is the one we train with) and
the process group's teardown on every way out of the CLI."""

import json

import pytest
import torch.distributed as dist
from helpers import ROOT, free_port, fresh_accelerate, run_script_2proc, tiny_config

from ddp_finetune.distributed import check_world_size
from ddp_finetune.errors import UserError
from ddp_finetune.training.preemption import EXIT_PREEMPTED, STOP_FILE


def test_launcher_world_size_must_match_the_accelerator(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE=2 .* sees 1"):
        check_world_size(1)
    check_world_size(2)


def test_accelerate_cpu_flag_with_several_processes_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (docs/pitfalls.md, 2)."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    check_world_size(1)  # `--cpu` alone: one process, as asked
    monkeypatch.setenv("MASTER_PORT", "29500")  # what the launcher adds for --num_processes > 1
    with pytest.raises(UserError, match="starts ONE process.*--multi_gpu"):
        check_world_size(1)


@pytest.fixture
def process_group():
    """A real 1-rank gloo group in this process, as a launched rank has one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if dist.is_initialized():  # the test failed: do not leak the group into the next test
        dist.destroy_process_group()


@pytest.mark.parametrize("way_out", ["done", "preempted", "bad_input", "crash"])
def test_every_way_out_of_the_cli_destroys_the_process_group(
    process_group, tmp_path, image_folder, way_out, monkeypatch
):
    """Left to interpreter shutdown, a live group's gloo threads can abort the rank at exit
    (tests/scripts/losses_2proc.py); accelerate's end_training() only runs after a whole run."""
    from ddp_finetune.commands.cli import main
    from ddp_finetune.training import loop as train

    config = tiny_config(tmp_path, image_folder, train={"epochs": 1, "max_steps": 1})
    expected = {"done": 0, "preempted": EXIT_PREEMPTED, "bad_input": 2}
    if way_out == "preempted":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / STOP_FILE).touch()  # stops at the first step boundary
    argv = ["train", str(config if way_out != "bad_input" else tmp_path / "missing.yaml")]
    with fresh_accelerate():
        if way_out == "crash":
            monkeypatch.setattr(train, "fit", lambda cfg: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                main(argv)
        else:
            assert main(argv) == expected[way_out]
    assert not dist.is_initialized(), f"{way_out}: the process group outlived the CLI"


def test_only_distributed_py_reads_the_launcher_or_calls_torch_distributed():
    """The rank contract of distributed.py, checked on the source: a new module that reads RANK or
    all-reduces by hand would bypass the one place where the package's multi-process rules live."""
    import re
    from pathlib import Path

    import ddp_finetune

    forbidden = re.compile(
        r"import torch\.distributed|from torch\.distributed|from torch import distributed"
        r"|environ(?:\.get\(|\[)\s*[\"'](?:RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|SLURM_CPUS_PER_TASK)[\"']"
    )
    package = Path(ddp_finetune.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "distributed.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert offenders == []
    assert forbidden.search('rank = int(os.environ.get("RANK", "0"))')  # the pattern does catch a reader


def test_dist_timeout_reaches_the_process_group_and_an_error_on_one_rank_stops_the_others(tmp_path):
    """issue 26 item 3: the process group gets `train.dist_timeout_minutes` (NCCL's default 10 minutes
    killed a large dataset's first start-up); the longer wait must not keep the ranks that wait for
    a failed first rank waiting: they stop at once with its line."""
    run_script_2proc(ROOT / "tests" / "scripts" / "rank_failure_2proc.py", tmp_path)
    first, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["timeout_s"] == other["timeout_s"] == 60
    assert first["raised"].startswith("UserError: data.path='/nowhere'")
    assert other["raised"] == (
        "UserError: rank 0 stopped while this rank waited for it: data.path='/nowhere' does not exist; set data.path"
    )
    assert "ran_block" not in other and other["seconds"] < 30, other


def test_dist_timeout_is_the_configs_and_positive(monkeypatch, tmp_path):
    """start_accelerator hands train.dist_timeout_minutes to make_accelerator; 0 is a one-line error."""
    from ddp_finetune.config import config_from_dict
    from ddp_finetune.training import run

    with pytest.raises(UserError, match="train.dist_timeout_minutes"):
        config_from_dict({"data": {"path": str(tmp_path)}, "train": {"dist_timeout_minutes": 0}})
    seen = {}

    def fake_make_accelerator(*args, timeout_minutes, **kwargs):
        seen["timeout_minutes"] = timeout_minutes
        raise UserError("stop here")

    monkeypatch.setattr(run.dist_utils, "make_accelerator", fake_make_accelerator)
    values = {"output_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path)}}
    cfg = config_from_dict({**values, "train": {"dist_timeout_minutes": 90}})
    with pytest.raises(UserError, match="stop here"):
        run.start_accelerator(cfg)
    assert seen == {"timeout_minutes": 90}
