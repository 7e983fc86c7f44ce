"""End to end on CPU: the files a run writes, resume equivalence, accumulation, trackers."""

import json

import pytest
import torch
from helpers import fit_in_process, load_weights, max_abs_diff, read_metrics, read_summary, run_cli, tiny_config


def test_tiny_run_writes_its_files(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder, checkpoint={"every_n_steps": 2, "keep_last": 2})
    summary = fit_in_process(config)
    run = tmp_path / "run"
    # 24 images, val_fraction 0.25 -> 18 train -> 3 steps/epoch of 6
    assert summary["steps"] == 6 and summary["epochs"] == 2
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 6
    assert read_summary(run) == json.loads(json.dumps(summary))
    assert set(summary["val"]) >= {"loss", "top1", "top5"} and summary["val"]["count"] == 6
    assert summary["images_per_second"] > 0
    assert (run / "config.yaml").read_text().startswith("output_dir:")
    weights = load_weights(run)
    assert weights["fc.weight"].shape == (3, 512)

    records = read_metrics(run)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr/backbone", "lr/head", "images_per_second", "epoch"} <= r.keys() for r in train)
    assert [r["step"] for r in val] == [3, 6] and val[-1]["top1"] == summary["val"]["top1"]

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_4", "step_6"] or ckpts == ["step_3", "step_4"], ckpts  # keep_last=2
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    state = json.loads((run / "checkpoints" / ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == int(ckpts[-1].split("_")[1])


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, image_folder):
    """Stop mid-epoch (step 4 of 6, epoch 2 step 1), resume with auto: same weights, same losses.
    With persistent data workers, as runs have them by default: the resumed epoch's skipped batches
    and the next epoch's crops come from the sampler's (epoch, index) keys."""
    extra = dict(data={"augment": True, "num_workers": 2}, train={"epochs": 2, "batch_size": 6})
    whole = tiny_config(tmp_path / "a", image_folder, **extra)
    fit_in_process(whole)

    parts = tiny_config(tmp_path / "b", image_folder, checkpoint={"every_n_steps": 4}, **extra)
    first = fit_in_process(parts, "train.max_steps=4")
    assert first["steps"] == 4
    second = fit_in_process(parts, "checkpoint.resume=auto")
    assert second["resumed_from"].endswith("step_4") and second["steps"] == 6

    assert max_abs_diff(load_weights(tmp_path / "a" / "run"), load_weights(tmp_path / "b" / "run")) <= 1e-6
    train_a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a" / "run") if r["split"] == "train"]
    train_b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b" / "run") if r["split"] == "train"]
    assert [step for step, _ in train_b] == [step for step, _ in train_a]
    assert [loss for _, loss in train_b] == pytest.approx([loss for _, loss in train_a], abs=1e-6)
    assert read_summary(tmp_path / "b" / "run")["val"] == pytest.approx(
        read_summary(tmp_path / "a" / "run")["val"], abs=1e-6
    )


def test_grad_accum_gives_the_same_training(tmp_path, image_folder):
    a = tiny_config(tmp_path / "a", image_folder)
    b = tiny_config(tmp_path / "b", image_folder, train={"grad_accum": 3})
    fit_in_process(a)
    summary = fit_in_process(b)
    assert summary["per_device_batch_size"] == 2 and summary["steps"] == 6
    assert max_abs_diff(load_weights(tmp_path / "a" / "run"), load_weights(tmp_path / "b" / "run")) <= 1e-5


def test_bf16_on_cpu_trains(tmp_path, image_folder):
    summary = fit_in_process(tiny_config(tmp_path, image_folder, train={"mixed_precision": "bf16", "epochs": 1}))
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 3
    assert torch.isfinite(torch.tensor(summary["val"]["loss"]))


def test_wandb_offline_writes_history(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    config = tiny_config(
        tmp_path, image_folder, log={"report_to": "wandb"}, train={"epochs": 1}, checkpoint={"every_n_steps": 1}
    )
    fit_in_process(config, "train.max_steps=2")
    run = tmp_path / "run"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, list((run / "wandb").iterdir()) if (run / "wandb").exists() else "no wandb folder"
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert offline[0].name.endswith(run_id)
    assert list(offline[0].glob("run-*.wandb")) and list(offline[0].glob("run-*.wandb"))[0].stat().st_size > 0
    # a resumed (or requeued) job continues the same wandb run: same id, no second run
    fit_in_process(config, "checkpoint.resume=auto")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(run_id) for p in offline), [p.name for p in offline]


def test_data_workers_do_not_change_the_training(tmp_path, image_folder):
    # 2 epochs with augmentation: the persistent workers keep their own copy of the dataset, so
    # epoch 1's crops must come from the sampler's (epoch, index) keys, not from a dataset attribute
    sections = dict(data={"augment": True}, train={"epochs": 2})
    fit_in_process(tiny_config(tmp_path / "w0", image_folder, **sections), "data.num_workers=0")
    fit_in_process(tiny_config(tmp_path / "w2", image_folder, **sections), "data.num_workers=2")
    assert max_abs_diff(load_weights(tmp_path / "w0" / "run"), load_weights(tmp_path / "w2" / "run")) == 0.0


def test_tensorboard_writes_events(tmp_path, image_folder):
    pytest.importorskip("tensorboard", reason="tensorboard is an extra: pip install 'ddp-finetune[tensorboard]'")
    fit_in_process(tiny_config(tmp_path, image_folder, log={"report_to": "tensorboard"}, train={"epochs": 1}))
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_cli_train_runs_from_the_command_line(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    proc = run_cli("train", config, "train.epochs=1", f"output_dir={tmp_path / 'cli'}")
    assert "world size 1" in proc.stdout and "done: 3 steps" in proc.stdout
    assert read_summary(tmp_path / "cli")["steps"] == 3


def test_gradient_clipping_is_applied(tmp_path, image_folder):
    fit_in_process(tiny_config(tmp_path / "free", image_folder, train={"epochs": 1}))
    fit_in_process(tiny_config(tmp_path / "clip", image_folder, train={"epochs": 1, "max_grad_norm": 1e-9}))
    fit_in_process(tiny_config(tmp_path / "zero", image_folder, train={"epochs": 1}, optim={"lr": 0.0}))
    start = load_weights(tmp_path / "zero" / "run")  # lr 0: the initial weights
    assert max_abs_diff(load_weights(tmp_path / "clip" / "run"), start) < 1e-8
    assert max_abs_diff(load_weights(tmp_path / "free" / "run"), start) > 1e-4
