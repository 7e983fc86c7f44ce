"""Keep the README and the launch files true."""

import re
from pathlib import Path

import yaml

from ddp_finetune.config import reference_rows

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_documents_every_config_key_with_its_default():
    for key, default, _ in reference_rows():
        assert f"| `{key}` | `{default}` |" in README, f"README config reference is missing or stale for {key}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = "pip install -e '.[test]'", "python -m pytest -q"
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert f"{install} && {test}" in first_block
    assert install in ci and re.search(rf"^{re.escape(test)}$", ci, re.M)


def test_readme_opens_with_demo_and_tests():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "ddp-finetune demo" in first_block


def test_launch_files_start_with_their_command_and_parse():
    files = sorted((ROOT / "launch").glob("*.yaml"))
    assert {f.name for f in files} >= {"1gpu.yaml", "1node_ngpu.yaml", "multi_node.yaml", "cpu_2proc.yaml"}
    for f in files:
        text = f.read_text()
        assert text.startswith("#") and "accelerate launch --config_file launch/" + f.name in text, f
        cfg = yaml.safe_load(text)
        assert cfg["distributed_type"] in ("NO", "MULTI_GPU") and cfg["num_processes"] >= 1
