"""Atomic checkpoints, keep_last, and choosing what to resume."""

import json

import pytest
from helpers import SMALL_MODEL, fit_in_process, tiny_config

from ddp_finetune.errors import UserError
from ddp_finetune.training import checkpoint as ckpt


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


def _optimizer_run(name: str, fused: bool):
    """A prepared model and optimizer as build_run makes them: fused unless the run is fp16."""
    from types import SimpleNamespace

    import torch

    from ddp_finetune.distributed import make_accelerator
    from ddp_finetune.training.param_groups import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optim_cfg = SimpleNamespace(name=name, lr=0.1, momentum=0.9, weight_decay=0.01, betas=[0.9, 0.999])
    accelerator = make_accelerator()
    model, optimizer = accelerator.prepare(
        model, make_optimizer([{"params": list(model.parameters())}], optim_cfg, fused)
    )
    return accelerator, model, optimizer


def _guarded_step(model, optimizer, fused: bool, scale: float = 1.0) -> None:
    """One training step the way train.optimizer_step takes it (the guard hands found_inf to fused kernels)."""
    import torch

    from ddp_finetune.training.guards import NonFiniteGuard

    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    loss = model(x).square().mean() * scale
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    guard = NonFiniteGuard("cpu", limit=5, on_device=fused)
    guard.before_update(optimizer.optimizer, grads, None, loss)
    optimizer.step()
    guard.after_update(optimizer.optimizer)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_fused", [False, True], ids=["fp16-to-bf16", "bf16-to-fp16"])
def test_resume_under_another_precision_keeps_the_optimizer_kernels(tmp_path, name, saved_fused):
    """An fp16 run's optimizer is unfused, a bf16 / no-precision run's fused (issue 26 item 2): a
    checkpoint of one resumed as the other crashed at its first step ("Expected grad_scale and
    found_inf to be None"). After load_checkpoint the groups are the resuming run's again, the step
    trains like the uninterrupted optimizer, and a non-finite step is still skipped on the device."""
    import torch

    accelerator, model, optimizer = _optimizer_run(name, fused=saved_fused)
    _guarded_step(model, optimizer, saved_fused)
    accelerator.save_state(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    _guarded_step(model, optimizer, saved_fused)  # the uninterrupted run's next step
    expected = [p.detach().clone() for p in model.parameters()]

    loaded_fused = not saved_fused
    accelerator, model, optimizer = _optimizer_run(name, fused=loaded_fused)
    if not loaded_fused:
        # as under fp16: Accelerate's scaler; the bf16 checkpoint has no scaler.pt for it
        accelerator.scaler = torch.amp.GradScaler("cpu")
    ckpt.load_checkpoint(accelerator, tmp_path / "ckpt")
    before = [p.detach().clone() for p in model.parameters()]
    if loaded_fused:
        _guarded_step(model, optimizer, True, scale=float("nan"))  # skipped on the device
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _guarded_step(model, optimizer, loaded_fused)
    for want, got in zip(expected, model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not loaded_fused:
        assert accelerator.scaler.get_scale() == 2.0**16  # kept, at its initial scale
        accelerator.scaler = None
    assert all(group["fused"] == loaded_fused for group in optimizer.optimizer.param_groups)


@pytest.mark.gpu
@pytest.mark.parametrize("saved, resumed", [("fp16", "bf16"), ("bf16", "fp16")])
def test_cuda_resume_under_another_precision(tmp_path, image_folder, saved, resumed):
    """The GPU end of issue 26 item 2: a checkpoint saved under one train.mixed_precision resumes and
    finishes under another (fp16's unfused optimizer and GradScaler against the fused one)."""
    from helpers import run_cli

    config = tiny_config(
        tmp_path, image_folder, train={"epochs": 2, "mixed_precision": saved}, checkpoint={"every_n_steps": 2}
    )
    run_cli("train", config, "train.max_steps=2")
    proc = run_cli("train", config, "checkpoint.resume=auto", f"train.mixed_precision={resumed}")
    assert "resumed from" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mixed_precision"] == resumed and summary["steps"] > 2
