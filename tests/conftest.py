import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests import datagen, helpers
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datagen import make_image_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests (and `pytest.param("cuda", marks=pytest.mark.gpu)` cases) skip without CUDA;
    `pytest -m gpu` runs exactly them on a GPU machine (benchmarks/device_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker: run by benchmarks/device_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=8, size=16)
