import contextlib
import os
import shutil
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


# The caches the libraries under test write to by default live in the user's home (~/.cache/huggingface for
# `datasets` and the image check's entries, ~/.config/matplotlib, ~/.config/wandb, ~/.cache/torch): the tests
# point them into the session's temporary folder instead, where pytest's retention removes them with the rest.
# Set in os.environ, so the commands the tests start inherit them; before any test module imports `datasets`
# (which reads its cache path on import).
CACHES = {
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "MPLCONFIGDIR": "matplotlib",
    "TORCH_HOME": "torch",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_DATA_DIR": "wandb/data",
    "XDG_CACHE_HOME": "xdg-cache",
}


@pytest.hookimpl(trylast=True)  # after pytest's own tmpdir plugin has made the session's factory
def pytest_configure(config):
    # the base folder of this session (pytest-of-<user>/pytest-N, or --basetemp), made now rather than at the first test
    base = config._tmp_path_factory.getbasetemp()
    for name, sub in CACHES.items():
        os.environ[name] = str(base / "caches" / sub)
    config.stash[_BASE] = base
    config.stash[_SIZES] = {}


_BASE = pytest.StashKey[Path]()
_SIZES = pytest.StashKey[dict]()
_module = {"key": None, "before": set(), "failed": False}


def _size(path: Path) -> int:
    """Bytes of the files under `path` (0 if it is gone); what cannot be read counts as 0."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _module_of(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if _module["key"] != _module_of(item):
        base = item.config.stash[_BASE]
        _module.update(key=_module_of(item), before=set(base.iterdir()), failed=False)
    return (yield)


def pytest_runtest_logreport(report):
    if report.failed:
        _module["failed"] = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """tmp_path_retention_policy "failed" for the module-scoped folders too: once a module's last test is
    torn down (its module fixtures with it), the folders made under the base folder while it ran
    (tmp_path_factory.mktemp: trained runs, data sets) are removed if every test of the module passed, so
    a whole run never holds more than one module's files. Folders made as `getbasetemp() / name` are
    shared between modules on purpose (tests/test_preemption.py and test_slurm.py) and stay to the end."""
    result = yield  # a teardown that raised (a failed fixture teardown) leaves before the removal
    if nextitem is not None and _module_of(nextitem) == _module["key"]:
        return result
    config = item.config
    if config.getini("tmp_path_retention_policy") != "failed" or _module["failed"]:
        return result
    base = config.stash[_BASE]
    made = [p for p in set(base.iterdir()) - _module["before"] if p.name[-1:].isdigit() and not p.is_symlink()]
    size = sum(_size(p) for p in made)
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
    config.stash[_SIZES][_module["key"]] = size
    return result


def _human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def pytest_terminal_summary(terminalreporter, config):
    """What this run left in its temporary folder (pytest removes a green session's whole folder, unless
    --basetemp names it) and the modules that wrote the most, so a test that starts writing gigabytes or
    leaving files behind shows in the log (.ci/run prints the same for the whole temporary folder)."""
    base = config.stash.get(_BASE, None)
    if base is None:
        return
    terminalreporter.write_sep("-", "disk")
    terminalreporter.write_line(f"temporary files left behind: {_human(_size(base))} in {base}")
    top = sorted(config.stash[_SIZES].items(), key=lambda kv: -kv[1])[:3]
    if top and top[0][1]:
        terminalreporter.write_line(
            "largest module folders, removed when their module passed: "
            + ", ".join(f"{key} {_human(size)}" for key, size in top if size)
        )
