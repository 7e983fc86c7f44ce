"""The guards around the Accelerator: the launcher's process count is the one we train with."""

import pytest

from ddp_finetune.distributed import check_world_size
from ddp_finetune.errors import UserError


def test_launcher_world_size_must_match_the_accelerator(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE=2 .* sees 1"):
        check_world_size(1)
    check_world_size(2)


def test_accelerate_cpu_flag_with_several_processes_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (PITFALLS item 2)."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    check_world_size(1)  # `--cpu` alone: one process, as asked
    monkeypatch.setenv("MASTER_PORT", "29500")  # what the launcher adds for --num_processes > 1
    with pytest.raises(UserError, match="starts ONE process.*--multi_gpu"):
        check_world_size(1)
