"""What the test suite leaves on disk (issue 25): a passing test's files go when it ends, a module's
fixture folders when its last test passed; a failing test keeps them to debug; the libraries' caches
live in the session's folder, not in the user's home.

The test runs a small pytest session in a child process with this suite's conftest.py and
pyproject.toml's retention settings, and looks at the folder that session left behind."""

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

INNER = """
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # stands in for a module-scoped training run: a folder made once, shared by the module's tests
    path = tmp_path_factory.mktemp("trained") / "model.safetensors"
    path.write_bytes(b"x" * 100_000)
    return path


def test_reads_the_run(trained, tmp_path):
    (tmp_path / "copy.bin").write_bytes(trained.read_bytes())
    assert Path(os.environ["HF_DATASETS_CACHE"]).is_relative_to(tmp_path.parent)


def test_second(trained, tmp_path):
    (tmp_path / "out.txt").write_text("y")
    assert {outcome}
"""


def _retention_settings() -> str:
    """pyproject.toml's tmp_path_retention_* lines: the inner session runs with the suite's own settings."""
    text = (ROOT / "pyproject.toml").read_text()
    lines = re.findall(r"^tmp_path_retention_\w+ = .*$", text, re.M)
    assert any('policy = "failed"' in line for line in lines), lines
    return "\n".join(lines)


@pytest.mark.slow
def test_green_modules_leave_only_caches_and_failing_ones_keep_what_they_need(pytester):
    """One session (a child process: it imports torch) with a green module and a failing one."""
    pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\n{_retention_settings()}\n")
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    (pytester.path / "datagen.py").write_text((TESTS / "datagen.py").read_text())  # conftest imports it
    pytester.makepyfile(test_green=INNER.format(outcome="True"), test_red=INNER.format(outcome="False"))
    base = pytester.path / "base"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--basetemp", str(base))
    result.assert_outcomes(passed=3, failed=1)
    left = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    # the green module's two tmp_path folders and its module folder are gone; the failing module keeps
    # the failing test's folder and the module's run (its passing test's folder goes as it passes)
    assert [f for f in left if not f.startswith("caches/")] == ["test_second1/out.txt", "trained1/model.safetensors"]
    out = result.stdout.str()
    assert "temporary files left behind" in out and re.search(r"largest module folders.*test_green.py 100\.0 kB", out)
