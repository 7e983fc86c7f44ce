"""The demos end to end, on a tiny budget: digits (source, target, table) and segmentation shapes."""

import importlib.util
import json

import pytest
from accelerate.state import AcceleratorState, GradientState
from helpers import read_metrics, run_cli

from ddp_finetune.commands.demo import SHAPES_PER_SPLIT, make_digits_folders, parse_seeds, run_demo
from ddp_finetune.commands.printed_digits import make_printed_digits


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
def test_digits_folders_hold_all_ten_handwritten_digits(tmp_path):
    counts = make_digits_folders(tmp_path)
    assert counts == {"source": 1797}
    assert sorted(p.name for p in (tmp_path / "digits_source").iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (tmp_path / "digits_source").rglob("*.png")) == 1797


needs_fonts = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the printed digits use matplotlib's fonts"
)


@needs_fonts
def test_printed_digits_train_split_follows_the_seed_validation_does_not(tmp_path):
    import numpy as np
    from PIL import Image

    a = make_printed_digits(tmp_path / "a", train_per_class=2, val_per_class=3, train_seed=0)
    make_printed_digits(tmp_path / "b", train_per_class=2, val_per_class=3, train_seed=1)
    assert a == {"train": 20, "validation": 30}

    def pixels(root, split):
        return [np.asarray(Image.open(p)) for p in sorted((root / split).rglob("*.png"))]

    assert all(
        np.array_equal(x, y) for x, y in zip(pixels(tmp_path / "a", "validation"), pixels(tmp_path / "b", "validation"))
    )
    assert not all(
        np.array_equal(x, y) for x, y in zip(pixels(tmp_path / "a", "train"), pixels(tmp_path / "b", "train"))
    )
    assert pixels(tmp_path / "a", "train")[0].shape == (32, 32)


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,3", [0, 3]), ("7", [7]), ("1-2,5", [1, 2, 5])])
def test_seed_lists(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["a", "1-", "0,0", "-1", ""])
def test_bad_seed_lists_are_one_line(text):
    from ddp_finetune.errors import UserError

    with pytest.raises(UserError, match="--seeds"):
        parse_seeds(text)


@needs_sklearn
@needs_fonts
def test_demo_runs_source_once_then_both_target_runs_per_seed(tmp_path, capsys):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        results = run_demo(tmp_path, ["train.max_steps=2", "log.progress_bar=false"], seeds="0,1")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    out = capsys.readouterr().out
    assert out.count("== source task") == 1
    assert "head keys not loaded: fc.bias, fc.weight" in out or "head keys not loaded: fc.weight, fc.bias" in out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [r["seed"] for r in saved["seeds"]] == [0, 1]
    for arm in ("fine-tuned", "from scratch"):
        values = [r[arm] for r in saved["seeds"]]
        assert saved[arm] == pytest.approx({"mean": sum(values) / 2, "min": min(values), "max": max(values)})
        # the reported top-1 is that of final/'s weights: the EMA's, as the configs say
        for seed, value in zip((0, 1), values):
            run = tmp_path / f"seed{seed}" / arm.replace(" ", "_").replace("-", "_")
            ema = [r for r in read_metrics(run) if r["split"] == "val_ema"][-1]
            assert ema["top1"] == value
    assert saved["versions"]["torch"] and results["seeds"] == saved["seeds"]
    table = (tmp_path / "results.md").read_text()
    assert "| 0 |" in table and "| mean |" in table and table in out
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and "training curves in" in out


def test_demo_refuses_several_processes(tmp_path, monkeypatch):
    from ddp_finetune.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="runs in one process"):
        run_demo(tmp_path)
    assert not (tmp_path / "data").exists()
