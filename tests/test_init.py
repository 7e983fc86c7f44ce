"""`ddp-finetune init`: a commented starter config per task, and the README's first run on one's
own images: init -> edit -> config -> train."""

import re

import pytest
from helpers import ROOT, read_summary, run_cli

from ddp_finetune.commands.init import (
    COMMON_KEYS,
    LAYOUTS,
    STARTER_VALUES,
    TASK_KEYS,
    TASKS,
    render_starter,
    starter_config,
)
from ddp_finetune.config import load_config, reference_rows

REFERENCE = {key: (default, doc) for key, default, doc in reference_rows()}


def _commented_keys(text: str) -> dict[str, str]:
    """{dotted key: the comment block above it, joined into one line} of a starter file."""
    found, comment, section = {}, [], ""
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.removeprefix("#").strip())
        elif stripped.endswith(":") and not line.startswith(" "):
            section, comment = stripped[:-1], []
        elif stripped:
            name = stripped.split(":", 1)[0]
            found[f"{section}.{name}" if line.startswith(" ") else name] = " ".join(comment)
            comment = []
        else:
            comment = []
    return found


@pytest.mark.parametrize("task", TASKS)
def test_init_writes_a_starter_whose_comments_are_the_reference(tmp_path, task):
    out = tmp_path / f"{task}.yaml"
    proc = run_cli("init", "--task", task, "--out", out)
    assert f"wrote {out}" in proc.stdout
    text = out.read_text()
    assert text.startswith(f"# ddp-finetune train {out}\n")
    keys = _commented_keys(text)
    assert set(keys) == {*COMMON_KEYS, *TASK_KEYS.get(task, ())}
    for key, comment in keys.items():
        default, doc = REFERENCE[key]
        assert comment == f"{doc} Default: {default}.", key
    cfg = load_config(out)
    assert cfg == starter_config(task)[0] and cfg.task == task


def test_init_refuses_to_overwrite(tmp_path):
    out = tmp_path / "mine.yaml"
    out.write_text("data: {path: my_edited_folder}\n")
    proc = run_cli("init", "--out", out, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "already exists and init never overwrites" in proc.stderr
    assert out.read_text() == "data: {path: my_edited_folder}\n"


def test_init_takes_overrides_among_its_options(tmp_path):
    out = tmp_path / "seg.yaml"
    run_cli(
        "init", "data.path=my_masks", "--task", "segmentation", "model.name=fcn_resnet50", "--out", out,
        "schedule.args.T_max=7", "loss={name: focal, gamma: 1.5}",
    )  # fmt: skip
    cfg = load_config(out)
    assert (cfg.task, cfg.data.path, cfg.model.name) == ("segmentation", "my_masks", "fcn_resnet50")
    assert (cfg.schedule.args, cfg.loss.name, cfg.loss.gamma) == ({"T_max": 7}, "focal", 1.5)
    bad = run_cli("init", "--out", tmp_path / "bad.yaml", "train.epoch=3", check=False)
    assert bad.returncode == 2 and "did you mean 'epochs'" in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()


def test_the_starter_tables_name_real_config_keys():
    listed = {*COMMON_KEYS, *(k for keys in TASK_KEYS.values() for k in keys)}
    listed |= {k for values in STARTER_VALUES.values() for k in values}
    assert listed <= set(REFERENCE)
    assert set(STARTER_VALUES) == set(LAYOUTS) == set(TASKS)


@pytest.mark.slow
def test_first_run_on_ones_own_images_init_edit_config_train(tmp_path, image_folder):
    # the README's path, command by command
    config = tmp_path / "my_run.yaml"
    run_cli("init", "--out", config)
    before = run_cli("config", config, check=False)
    assert before.returncode == 2 and "data.path='my_images' does not exist" in before.stderr

    text = config.read_text()  # the edit a user makes: their folder, a small model, an offline start
    edits = {
        "  path: my_images": f"  path: {image_folder}",
        "  name: resnet50": "  name: resnet18",
        "  weights: DEFAULT": "  weights: null",
        "output_dir: runs/my_run": f"output_dir: {tmp_path / 'run'}",
    }
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    small = ["data.image_size=16", "train.epochs=1", "train.batch_size=6", "log.progress_bar=false"]

    resolved = run_cli("config", config, *small)
    run_cli("train", config, *small)
    assert (tmp_path / "run" / "config.yaml").read_text() == resolved.stdout
    assert read_summary(tmp_path / "run")["epochs"] == 1


def test_the_readme_shows_what_init_writes():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# ddp-finetune train my_run.yaml\n.*?)```", readme, re.S).group(1)
    shown = [line for line in block.splitlines() if line.strip() != "..."]
    written = render_starter("classification", "my_run.yaml").splitlines()
    at = 0
    for line in shown:  # the README's excerpt: lines of the real file, in order, with "..." for the rest
        assert line in written[at:], line
        at = written.index(line, at) + 1
