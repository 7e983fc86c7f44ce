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


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=8, size=16)
