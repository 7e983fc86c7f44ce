"""Atomic checkpoints, keep_last, and choosing what to resume."""

import json

import pytest
from helpers import SMALL_MODEL, fit_in_process, tiny_config

from ddp_finetune import checkpoint as ckpt
from ddp_finetune.errors import UserError


def _fake_checkpoint(root, step, complete=True):
    d = root / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    if complete:
        (d / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_skips_temporary_and_incomplete_folders(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 12)
    _fake_checkpoint(tmp_path, 20, complete=False)
    (tmp_path / "checkpoints" / ".tmp-step_24").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_12"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_4", "step_12"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_12"
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "fresh") is None


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "checkpoints" / "step_3"), tmp_path)


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, image_folder, monkeypatch):
    config = tiny_config(
        tmp_path,
        image_folder,
        model={"name": SMALL_MODEL},
        checkpoint={"every_n_steps": 2, "every_epoch": False, "keep_last": 1},
    )
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def crash_on_second_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(self, output_dir, **kwargs)  # files half written ...
            raise OSError("disk full")  # ... then the job dies
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        fit_in_process(config)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_2"]
    assert (run / "checkpoints" / ".tmp-step_4").is_dir(), "the half-written save stays aside"
    assert json.loads((run / "checkpoints" / "step_2" / ckpt.STATE_FILE).read_text())["step"] == 2

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    summary = fit_in_process(config, "checkpoint.resume=auto")
    assert summary["resumed_from"].endswith("step_2") and summary["steps"] == 6
    assert not (run / "checkpoints" / ".tmp-step_4").exists(), "a later save of the same step replaces the debris"


def test_keep_last_prunes_the_oldest(tmp_path, image_folder):
    config = tiny_config(
        tmp_path, image_folder, model={"name": SMALL_MODEL}, checkpoint={"every_n_steps": 1, "keep_last": 3}
    )
    fit_in_process(config)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_4", "step_5", "step_6"]


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, image_folder):
    sections = dict(model={"name": SMALL_MODEL}, train={"epochs": 1}, checkpoint={"every_n_steps": 1})
    config = tiny_config(tmp_path, image_folder, **sections)
    fit_in_process(config)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run.*checkpoint.resume=auto"):
        fit_in_process(config)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
