"""The demo end to end, on a tiny budget: data from scikit-learn's digits, source, target, table."""

import json

import pytest
from accelerate.state import AcceleratorState, GradientState

pytest.importorskip("sklearn", reason="the demo's digits come from scikit-learn: pip install 'ddp-finetune[demo]'")

from ddp_finetune.demo import make_digits_folders, run_demo  # noqa: E402


def test_digits_folders_split_source_and_target(tmp_path):
    counts = make_digits_folders(tmp_path, target_train_per_class=3, target_val_per_class=4)
    assert counts == {"source": 901, "target_train": 15, "target_validation": 20}
    assert sorted(p.name for p in (tmp_path / "digits_source").iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in (tmp_path / "digits_target" / "train").iterdir()) == ["5", "6", "7", "8", "9"]


def test_demo_runs_source_then_both_target_runs(tmp_path, capsys):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        results = run_demo(tmp_path, ["train.max_steps=2", "log.progress_bar=false"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    out = capsys.readouterr().out
    assert "head keys not loaded: fc.bias, fc.weight" in out or "head keys not loaded: fc.weight, fc.bias" in out
    table = (tmp_path / "results.md").read_text()
    assert "| fine-tuned from source weights |" in table and "| from scratch |" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["source"]["final_weights"].endswith("source/final/model.safetensors")
    assert results["fine-tuned from source weights"]["steps"] == 2
    assert 0.0 <= saved["from scratch"]["val"]["top1"] <= 1.0


def test_demo_refuses_several_processes(tmp_path, monkeypatch):
    from ddp_finetune.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="runs in one process"):
        run_demo(tmp_path)
    assert not (tmp_path / "data").exists()
