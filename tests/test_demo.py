"""The demos end to end, on a tiny budget: digits (source, target, table) and segmentation shapes."""

import importlib.util
import json

import pytest
from accelerate.state import AcceleratorState, GradientState
from helpers import run_cli

from ddp_finetune.commands.demo import SHAPES_PER_SPLIT, make_digits_folders, run_demo


def test_segmentation_demo_writes_its_shapes_and_trains_lraspp(tmp_path):
    # a real process started in another folder: the demo needs no file of tests/
    out = tmp_path / "seg"
    proc = run_cli("demo", "train.max_steps=2", "--task", "segmentation", "--out", out, cwd=tmp_path)
    for split in ("train", "validation"):
        assert len(list((out / "data" / split / "images").glob("*.jpg"))) == SHAPES_PER_SPLIT
        assert len(list((out / "data" / split / "masks").glob("*.png"))) == SHAPES_PER_SPLIT
    summary = json.loads((out / "results.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["val"]["mean_iou"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| lraspp_mobilenet_v3_large |" in table and "mean_iou" in table and table in proc.stdout
    assert (out / "lraspp" / "final" / "model.safetensors").is_file()


needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="the demo's digits come from scikit-learn: pip install 'ddp-finetune[demo]'",
)


@needs_sklearn
def test_digits_folders_split_source_and_target(tmp_path):
    counts = make_digits_folders(tmp_path, target_train_per_class=3, target_val_per_class=4)
    assert counts == {"source": 901, "target_train": 15, "target_validation": 20}
    assert sorted(p.name for p in (tmp_path / "digits_source").iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in (tmp_path / "digits_target" / "train").iterdir()) == ["5", "6", "7", "8", "9"]


@needs_sklearn
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
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and "training curves in" in out


def test_demo_refuses_several_processes(tmp_path, monkeypatch):
    from ddp_finetune.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="runs in one process"):
        run_demo(tmp_path)
    assert not (tmp_path / "data").exists()
