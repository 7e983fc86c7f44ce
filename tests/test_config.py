"""Config parsing, overrides, validation, and every config shipped under ddp_finetune/configs/."""

import re
from pathlib import Path

import pytest
import yaml

from ddp_finetune.config import (
    Config,
    config_from_dict,
    dump_config,
    load_config,
    reference_rows,
    shipped_configs,
)
from ddp_finetune.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "ddp_finetune" / "configs"


def test_defaults_and_nested_values():
    cfg = config_from_dict({"data": {"path": "x"}, "train": {"epochs": 3, "batch_size": 16}})
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 16
    assert cfg.optim.name == "sgd" and cfg.loss.name == "cross_entropy"


def test_overrides_win_and_are_typed():
    cfg = config_from_dict(
        {"data": {"path": "x"}}, ["train.epochs=5", "optim.lr=1e-3", "model.weights=null", "data.augment=false"]
    )
    assert cfg.train.epochs == 5
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.weights is None and cfg.data.augment is False


def test_dict_override_values():
    cfg = config_from_dict({"data": {"path": "x"}}, ["schedule.args={T_max: 7}", "schedule.args.eta_min=0.001"])
    assert cfg.schedule.args == {"T_max": 7, "eta_min": 0.001}


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({"data": {"path": "x"}, "trian": {}}, [], "unknown config key 'trian'"),
        ({"data": {"path": "x"}}, ["train.epoch=3"], "did you mean 'epochs'"),
        ({"data": {"path": "x"}}, ["train.epochs=three"], "train.epochs='three' has the wrong type; expected int"),
        ({"data": {"path": "x"}}, ["data.augment=3"], "expected bool"),
        (
            {"data": {"path": "x"}},
            ["train.batch_size=10", "train.grad_accum=3"],
            "does not divide by train.grad_accum=3",
        ),
        ({"data": {"path": "x"}}, ["train.mixed_precision=fp8"], "train.mixed_precision='fp8' is not one of"),
        ({"data": {"path": "x"}}, ["optim.lr=-1"], "optim.lr=-1.0 is negative"),
        ({"data": {"path": "x"}}, ["epochs"], "not of the form key=value"),
        ({}, [], "data.path is not set"),
        (
            {"data": {"path": "x"}},
            ["model.freeze_backbone=true", "model.unfreeze_at_epoch=4", "train.epochs=2"],
            "unfreeze_at_epoch=4 is not before",
        ),
    ],
)
def test_bad_values_are_one_line_user_errors(values, overrides, message):
    with pytest.raises(UserError) as info:
        config_from_dict(values, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as info:
        config_from_dict({"data": {"path": "x", "colour": 1}})
    assert "data.image_size" in str(info.value) and "data.augment" in str(info.value)


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_config(bad)


def test_dump_round_trips():
    cfg = config_from_dict(
        {"data": {"path": "x"}}, ["optim.head_lr=0.1", "schedule.name=StepLR", "schedule.args={step_size: 3}"]
    )
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_reference_covers_every_key():
    rows = reference_rows()
    keys = {k for k, _, _ in rows}
    assert {
        "output_dir",
        "data.path",
        "train.batch_size",
        "optim.head_lr",
        "checkpoint.resume",
        "log.report_to",
    } <= keys
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


def test_shipped_configs_are_the_yaml_files_of_the_package_folder():
    assert shipped_configs() == sorted(p.stem for p in CONFIGS.rglob("*.yaml"))
    assert {"digits_source", "digits_target", "segmentation_example"} <= set(shipped_configs())


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_by_path_and_by_name(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(f"@{path.stem}") == cfg
    text = path.read_text()
    assert text.startswith("# ddp-finetune "), "each config starts with the command that runs it"
    assert f"@{path.stem}" in text.split("\n\n")[0], "the header names the config as users type it"


def test_missing_config_names_only_configs_that_exist(tmp_path):
    for name in (str(tmp_path / "nope.yaml"), "@nope"):
        with pytest.raises(UserError) as info:
            load_config(name)
        named = re.findall(r"@\w+", str(info.value))
        assert named and set(named) - {"@nope"} == {f"@{n}" for n in shipped_configs()}
        assert "configs/" not in str(info.value)
