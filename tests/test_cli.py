"""The command line: bad input (exit 2, one line naming the problem and the fix, no traceback),
help and version, options mixed with overrides, `ddp-finetune config`."""

import importlib.metadata

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import run_cli, tiny_config

from ddp_finetune.commands.cli import COMMANDS, build_parser, main, parse
from ddp_finetune.config import dump_config, load_config


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


# --------------------------------------------------------------------------- the command line itself


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp-finetune: error: "), proc.stderr
    return lines[0]


def test_no_command_prints_the_help_as_a_usage_error():
    proc = run_cli(check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: ddp-finetune") and all(name in proc.stderr for name in COMMANDS)


def test_help_and_version_exit_0():
    proc = run_cli("-h")
    assert proc.stdout.startswith("usage: ddp-finetune") and all(name in proc.stdout for name in COMMANDS)
    for name in COMMANDS:
        assert run_cli(name, "-h").stdout.startswith(f"usage: ddp-finetune {name}")
    assert run_cli("--version").stdout == f"ddp-finetune {importlib.metadata.version('ddp-finetune')}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "the following arguments are required: CONFIG; see `ddp-finetune train -h`"),
        (["trian", "x.yaml"], "unknown command 'trian' (did you mean 'train'?)"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["lr-plot", "x.yaml", "--outt", "lr.png"], "unrecognized arguments: --outt"),
        (["train", "train.epochs=3", "x.yaml"], "the CONFIG comes first"),
        (["evaluate", "train.eval_batch_size=4", "runs/x"], "the RUN_OR_MODEL comes first"),
        (
            ["predict", "runs/x", "train.eval_batch_size=4", "--out", "p.csv"],
            "the following arguments are required: INPUT",
        ),
        (["predict", "runs/x", "a.jpg"], "the following arguments are required: --out"),
        (["plot", "--out", "c.png"], "the following arguments are required: RUN"),
        (["init", "--task", "regression"], "argument --task: invalid choice: 'regression'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, message):
    assert message in _one_error_line(run_cli(*argv, check=False))


def _option_example(action) -> tuple[list[str], object]:
    """(tokens that set the option to a value other than its default, the parsed value)."""
    if action.nargs == 0:
        return [action.option_strings[0]], action.const
    if action.choices:
        value = list(action.choices)[-1]
    elif action.type is int:
        value = (action.default or 0) + 2
    else:
        value = 0.25 if action.type is float else "somewhere"
    return [action.option_strings[0], str(value)], value


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_overrides_before_between_and_after_its_options(name):
    _, parsers = build_parser()
    options = [a for a in parsers[name]._actions if a.option_strings and a.dest != "help"]
    config = ["my.yaml"] if COMMANDS[name].takes_config else []
    firsts = [p for p in COMMANDS[name].positionals if not p.many]
    config += [f"{p.metavar.lower()}_path" for p in firsts]
    many = [p for p in COMMANDS[name].positionals if p.many]
    mixed, expected = ["a.b=1"], {}
    for action in options:
        tokens, expected[action.dest] = _option_example(action)
        assert expected[action.dest] != action.default
        mixed += [*tokens, f"{action.dest}.x=2"]
    # a command's paths (predict's INPUT..., plot's RUN...) may sit anywhere among the overrides too
    paths = [f"path{i}" for i, token in enumerate(mixed) if "=" in token] if many else []
    if many:
        mixed = [t for i, token in enumerate(mixed) for t in ([token, f"path{i}"] if "=" in token else [token])]
    args = parse([name, *config, *mixed, "c=3"])
    assert args.command == name and args.overrides == [t for t in mixed if "=" in t] + ["c=3"]
    assert {dest: getattr(args, dest) for dest in expected} == expected
    if COMMANDS[name].takes_config:
        assert args.config == "my.yaml"
    for p in firsts:
        assert getattr(args, p.dest) == f"{p.metavar.lower()}_path"
    for p in many:
        assert getattr(args, p.dest) == paths


def test_lr_plot_with_overrides_after_its_options(tmp_path, image_folder):
    # the command line of the bug report: an override after --out used to be "unrecognized"
    config = tiny_config(tmp_path, image_folder)
    out = tmp_path / "lr.png"
    proc = run_cli("lr-plot", config, "--out", out, "train.epochs=3", "--steps-per-epoch", "5", "optim.lr=0.1")
    assert "5 optimizer steps/epoch x 3 epochs" in proc.stdout and out.stat().st_size > 0


def test_a_user_error_on_a_launched_rank_names_the_rank(tmp_path):
    proc = run_cli("train", tmp_path / "nope.yaml", check=False, env={"RANK": "1"})
    assert _one_error_line(proc).startswith("ddp-finetune: error: [rank 1] config file")


# --------------------------------------------------------------------------- ddp-finetune config


def test_config_prints_the_yaml_a_run_writes_and_validates_it(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    proc = run_cli("config", config, "train.epochs=1", "optim.lr=0.05")
    cfg = load_config(config, ["train.epochs=1", "optim.lr=0.05"])
    assert proc.stdout == dump_config(cfg)
    assert proc.stderr.startswith("ddp-finetune: config is valid") and str(image_folder) in proc.stderr


def test_config_prints_what_trains_per_block(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder, model={"freeze": ["layer1.*"], "freeze_blocks": 0})
    proc = run_cli("config", config, "model.unfreeze_every=1", "train.epochs=3")
    rows = {line.split()[0]: line for line in proc.stderr.splitlines() if line.startswith("  ")}
    assert "what trains" in proc.stderr and rows["head"].endswith("epoch 0")
    assert (
        rows["layer1"].endswith("epoch 1") and rows["stem"].endswith("epoch 2") and rows["layer2"].endswith("epoch 0")
    )
    plain = run_cli("config", config, "model.freeze=null", "model.freeze_blocks=null")
    assert "what trains: every parameter (11,177,538) from epoch 0" in plain.stderr  # 2 classes: no data read


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=resnet181", "model.name='resnet181' is not a torchvision classifier (did you mean"),
        ("model.name=fcn_resnet50", "is a segmentation model but task=classification"),
        ("model.weights=IMAGENET1K_V9", "model.weights='IMAGENET1K_V9' is not a weights name of resnet18"),
        ("data.path=/nowhere/at/all", "data.path='/nowhere/at/all' does not exist"),
        ("train.epochs=0", "train.epochs=0 must be a positive number"),
        ("model.freeze=[layer9]", "model.freeze pattern 'layer9' matches no parameter; closest names: layer"),
        ("model.freeze_blocks=7", "model.freeze_blocks=7 but the model has 4 blocks after its stem"),
    ],
)
def test_config_refuses_what_a_run_would_refuse(tmp_path, image_folder, override, message):
    proc = run_cli("config", tiny_config(tmp_path, image_folder), override, check=False)
    assert message in _one_error_line(proc) and proc.stdout == ""
