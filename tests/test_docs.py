"""Keep the README and the launch files true."""

import re
from pathlib import Path

import yaml

from ddp_finetune.config import reference_rows, reference_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_config_reference_is_the_generated_one_whole():
    """Key, default and meaning of every key, from config.py's fields: regenerate with
    `python -m ddp_finetune.config README.md` after changing a field."""
    assert reference_table() in README, "README config reference is stale: run python -m ddp_finetune.config README.md"
    for key, default, doc in reference_rows():
        assert doc, f"config key {key} has no docstring: its meaning is the README's text"
        assert f"| `{key}` | `{default}` | {doc} |" in README


def test_ci_runs_the_readme_test_command():
    """CI is the newcomer: a new virtual environment inside the clone, then the README's line as it is."""
    command = "pip install -e '.[test]' && python -m pytest -q"
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert command in first_block.splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert command in lines, "CI must run the README's test command unchanged"
    made = [i for i, line in enumerate(lines) if re.fullmatch(r"python3? -m venv (\S+)", line)]
    assert len(made) == 1, "CI creates one virtual environment"
    venv = lines[made[0]].split()[-1]
    assert not Path(venv).is_absolute() and ".." not in venv, "inside the clone"
    assert f"rm -rf {venv}" in lines[: made[0]], "a fresh one: an earlier run's environment is removed first"
    activated = [i for i, line in enumerate(lines) if line in (f". {venv}/bin/activate", f"source {venv}/bin/activate")]
    assert activated and made[0] < activated[0] < lines.index(command), "the command runs inside it"
    assert "--system-site-packages" not in ci, "the machine's own packages must not be seen"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert f"{venv}/" in ignored or venv in ignored, "the environment is not committed"


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


def test_readme_pictures_are_in_the_repository():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert pictures and all((ROOT / p).is_file() for p in pictures), pictures


def test_every_document_a_source_file_cites_is_in_the_repository():
    """Docstrings and comments that send the reader to a document name one that exists here."""
    cited = set()
    for path in [*ROOT.glob("ddp_finetune/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("slurm/**/*.sh")]:
        text = path.read_text()
        gone = "PIT" + "FALLS"  # the shared notes outside the repository that docstrings used to cite
        assert gone not in text, f"{path} cites {gone}, which is not in the repository (docs/pitfalls.md is)"
        cited |= set(re.findall(r"\b((?:docs|benchmarks|slurm)/[\w./-]+\.(?:md|py|sh))\b", text))
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing
