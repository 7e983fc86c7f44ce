"""The library face: the README's Python example runs as printed, `fit` validates a Config built in
Python, takes the caller's datasets / model / loss, and leaves nothing behind for the next `fit`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, child_env

import ddp_finetune
from ddp_finetune import Config, DataConfig, LogConfig, ModelConfig, TrainConfig, UserError, fit

README = (ROOT / "README.md").read_text()


def _python_example() -> str:
    section = README.split("## Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_public_names_import_lazily_from_the_package():
    code = "import sys, ddp_finetune as d; assert 'torch' not in sys.modules; d.fit; d.Config; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in ddp_finetune.__all__:
        assert getattr(ddp_finetune, name) is not None
    with pytest.raises(AttributeError):
        ddp_finetune.not_a_name  # noqa: B018


@pytest.mark.slow
def test_readme_python_example_runs_as_printed(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_python_example())
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "10 ('cat', 'dog')"  # 2 epochs x 5 steps, the label names
    assert (tmp_path / "runs" / "python_api" / "final" / "model.json").is_file()


def _cfg(tmp_path, **train) -> Config:
    return Config(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(image_size=16, num_workers=0),
        model=ModelConfig(name="resnet18", freeze_bn=True),
        train=TrainConfig(epochs=1, batch_size=4, **train),
        log=LogConfig(progress_bar=False, every_n_steps=1),
    )


def test_fit_validates_a_config_built_in_python(tmp_path):
    with pytest.raises(UserError, match="train.batch_size=0"):
        fit(Config(data=DataConfig(path=str(tmp_path)), train=TrainConfig(batch_size=0)))
    with pytest.raises(UserError, match="data.path is not set"):
        fit(_cfg(tmp_path))  # no data given and none named
    bad_type = _cfg(tmp_path)
    bad_type.train.epochs = "2"
    with pytest.raises(UserError, match="train.epochs"):
        fit(bad_type)
    assert not (tmp_path / "run").exists()  # refused before anything was written


class Uint8Images(torch.utils.data.Dataset):
    """In-memory uint8 samples whose label is readable from the pixels (class c: value 60 + 120c)."""

    def __init__(self, n: int, size: int = 16):
        self.n, self.size, self.epoch = n, size, 0

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        label = index % 2
        return torch.full((3, self.size, self.size), 60 + 120 * label, dtype=torch.uint8), label


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_fit_takes_torch_datasets_a_model_and_a_loss_and_twice_in_one_process(tmp_path):
    calls = []

    def loss(logits, targets):
        calls.append(logits.shape[0])
        return torch.nn.functional.cross_entropy(logits, targets)

    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary = fit(
        _cfg(tmp_path),
        train_data=Uint8Images(16),
        val_data=Uint8Images(4),
        class_names=["dark", "light"],
        model=net,
        head=["fc"],
        loss=loss,
    )
    assert summary["steps"] == 4 and calls  # 16 images / batch 4, through the caller's loss
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's model trained
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and not (final / "model.json").exists()
    assert not torch.distributed.is_initialized()
    # a second fit in the same process, with another mixed precision: Accelerate's state was reset
    second = _cfg(tmp_path / "again", mixed_precision="bf16")
    summary = fit(second, train_data=Uint8Images(8), class_names=["dark", "light"], model=TinyNet(), head=["fc"])
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 2


def test_fit_refuses_inputs_that_cannot_work_with_one_line(tmp_path):
    with pytest.raises(UserError, match="class_names"):
        fit(_cfg(tmp_path), train_data=Uint8Images(8))
    with pytest.raises(UserError, match="head="):
        fit(_cfg(tmp_path), train_data=Uint8Images(8), class_names=["a", "b"], model=TinyNet())
    with pytest.raises(UserError, match="'classifier'"):
        fit(_cfg(tmp_path), train_data=Uint8Images(8), class_names=["a", "b"], model=TinyNet(), head=["classifier"])
    with pytest.raises(UserError, match="val_data"):
        fit(_cfg(tmp_path), val_data=Uint8Images(8))
