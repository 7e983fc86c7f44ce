"""Bad input: exit code 2, one line naming the problem and the fix, no traceback."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import run_cli, tiny_config

from ddp_finetune.cli import main


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp-finetune: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    assert "does not exist" in _error_line(capsys, ["train", tmp_path / "missing.yaml"])


def test_yaml_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: [unclosed\n")
    assert "not valid YAML at line" in _error_line(capsys, ["train", bad])


def test_unknown_key_and_wrong_type(capsys, tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    line = _error_line(capsys, ["train", config, "train.batchsize=4"])
    assert "unknown config key 'train.batchsize'" in line and "did you mean 'batch_size'" in line
    assert "expected int" in _error_line(capsys, ["train", config, "train.epochs=1.5"])


def test_unknown_model_name(capsys, tmp_path, image_folder):
    line = _error_line(capsys, ["train", tiny_config(tmp_path, image_folder), "model.name=resnet181"])
    assert "model.name='resnet181'" in line and "resnet18" in line


def test_missing_data_path_and_label_column(capsys, tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    assert "does not exist" in _error_line(capsys, ["train", config, f"data.path={tmp_path / 'nowhere'}"])
    assert "data.label_column='kind' is not a column" in _error_line(
        capsys, ["train", config, "data.label_column=kind"]
    )


def test_batch_not_divisible_by_accumulation(capsys, tmp_path, image_folder):
    line = _error_line(
        capsys, ["train", tiny_config(tmp_path, image_folder), "train.batch_size=6", "train.grad_accum=4"]
    )
    assert "train.batch_size=6 does not divide by train.grad_accum=4" in line


def test_weights_file_missing_or_corrupt(capsys, tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    assert "file not found" in _error_line(capsys, ["train", config, f"model.weights={tmp_path / 'w.pth'}"])
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_bytes(b"{not safetensors")
    line = _error_line(capsys, ["train", config, f"model.weights={corrupt}"])
    assert "corrupt" in line and str(corrupt) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; with CUDA fp16 is allowed")
def test_fp16_without_cuda(capsys, tmp_path, image_folder):
    line = _error_line(capsys, ["train", tiny_config(tmp_path, image_folder), "train.mixed_precision=fp16"])
    assert "fp16 needs a CUDA GPU" in line and "bf16" in line


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = run_cli("train", tmp_path / "nope.yaml", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "nope.yaml" in proc.stderr
