"""The `ddp-finetune` command: one entry per subcommand in `COMMANDS`.

    ddp-finetune init --task classification --out my_run.yaml
    ddp-finetune config my_run.yaml train.epochs=3       # the resolved config, validated
    ddp-finetune train my_run.yaml train.epochs=3
    ddp-finetune train @digits_source                     # a config shipped inside the package
    ddp-finetune evaluate runs/x --split test             # after training: evaluate, predict, plot
    ddp-finetune pack images/ images.packed               # a folder as a sharded Arrow dataset (data.source=disk)
    accelerate launch --config_file launch/cpu_2proc.yaml -m ddp_finetune train CONFIG [key=value ...]

Every subcommand takes `key=value` config overrides, mixed with its options in any order, after
its CONFIG when it has one (evaluate and predict: overrides of the saved model's config). Adding a
subcommand is one `Command` in `COMMANDS`: a function that adds its options and a function that
runs it, and the paths it takes (`Positional`).

Bad input prints one line and exits 2 (no traceback): usage errors as well as `UserError`s. A
run stopped by a signal exits with `preemption.EXIT_PREEMPTED` after writing its checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddp_finetune import __version__
from ddp_finetune.config import SHIPPED_PREFIX, shipped_configs
from ddp_finetune.errors import EXIT_USER_ERROR, UserError

PROG = "ddp-finetune"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


@dataclass(frozen=True)
class Positional:
    """A positional argument of a command other than CONFIG and the overrides."""

    dest: str
    metavar: str
    help: str
    many: bool = False
    """One or more (the last positional only): the key=value tokens among them are the overrides."""


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int]
    """Runs the command from the parsed arguments (`args.config`, `args.overrides`, its options); returns the exit code."""
    add_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    """Adds the command's own options (never positionals: those are CONFIG, `positionals` and the overrides)."""
    takes_config: bool = True
    """The command's first positional is a CONFIG (a YAML path or @NAME)."""
    positionals: tuple[Positional, ...] = ()
    """Further positionals (paths), after CONFIG and before the overrides, mixed with them in any order."""


# --------------------------------------------------------------------------- the commands
# Imports stay inside the functions: `ddp-finetune -h` and usage errors must not wait for torch.


def _train(args) -> int:
    from ddp_finetune.config import load_config
    from ddp_finetune.training.loop import Preempted, fit
    from ddp_finetune.training.output_dir import follow_moved_run
    from ddp_finetune.training.preemption import EXIT_PREEMPTED

    cfg = follow_moved_run(args.config, load_config(args.config, args.overrides), args.overrides)
    try:
        fit(cfg)
    except Preempted:
        return EXIT_PREEMPTED
    return 0


def _config(args) -> int:
    from ddp_finetune.commands.preflight import check_inputs, what_trains
    from ddp_finetune.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    checked = check_inputs(cfg)
    # stdout: exactly the config.yaml a run writes (redirect it to keep it); stderr: what was checked
    print(dump_config(cfg), end="", flush=True)
    print(f"{PROG}: config is valid: " + "; ".join(checked), file=sys.stderr, flush=True)
    print(what_trains(cfg), file=sys.stderr, flush=True)
    return 0


def _init_options(parser) -> None:
    from ddp_finetune.commands.init import TASKS

    parser.add_argument("--task", default="classification", choices=TASKS, help="the task (default: %(default)s)")
    parser.add_argument("--out", default="my_run.yaml", help="file to write; never overwritten (default: %(default)s)")


def _init(args) -> int:
    from ddp_finetune.commands.init import write_starter

    out = write_starter(args.out, args.task, args.overrides)
    print(
        f"wrote {out} (task {args.task}); edit it (data.path first), check it with `{PROG} config {out}`, "
        f"then train with `{PROG} train {out}`",
        flush=True,
    )
    return 0


def _demo_options(parser) -> None:
    from ddp_finetune.commands.demo import DEFAULT_OUT, DEMO_TASKS

    parser.add_argument(
        "--task",
        default="classification",
        choices=DEMO_TASKS,
        help="classification: transfer learning on scikit-learn's digits; segmentation: LR-ASPP on generated shapes",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder: data, runs, results table (default: "
        + ", ".join(f"{path} for {task}" for task, path in DEFAULT_OUT.items())
        + ")",
    )
    parser.add_argument(
        "--seeds",
        default="0-4",
        help="classification: the seeds of the target runs, e.g. 0-4 or 0,3 (default: %(default)s); "
        "each seed's top-1 and the mean, min and max go to summary.json",
    )


def _demo(args) -> int:
    from ddp_finetune.commands.demo import run_demo

    run_demo(args.out, args.overrides, task=args.task, seeds=args.seeds)
    return 0


def _lr_plot_options(parser) -> None:
    parser.add_argument("--out", default="lr.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (default: from the dataset)"
    )


def _lr_plot(args) -> int:
    from ddp_finetune.commands.lr_plot import lr_plot_command

    lr_plot_command(args.config, args.overrides, args.out, args.steps_per_epoch)
    return 0


_MODEL = Positional("model", "RUN_OR_MODEL", "a run folder (output_dir) or its final/ model folder")


def _evaluate_options(parser) -> None:
    parser.add_argument(
        "--data", default=None, help="folder of images or dataset saved with save_to_disk (default: the run's data)"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to score (default: the run's validation split; with --data its only split or `test`)",
    )
    parser.add_argument("--out", default=None, help="folder for eval.json and the picture (default: RUN/eval/SPLIT)")


def _evaluate(args) -> int:
    from ddp_finetune.inference.evaluate import evaluate_model

    evaluate_model(args.model, data=args.data, split=args.split, out=args.out, overrides=args.overrides)
    return 0


def _predict_options(parser) -> None:
    parser.add_argument("--out", required=True, help="CSV file (classification tasks) or folder (segmentation masks)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image in the CSV (default: %(default)s)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="binary / multilabel: probability above which a class is predicted (default: the model's, 0.5)",
    )
    parser.add_argument("--overlay", action="store_true", help="segmentation: also write the masks over the images")
    parser.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")


def _predict(args) -> int:
    from ddp_finetune.inference.predict import Options, predict

    opts = Options(top_k=args.top_k, threshold=args.threshold, overlay=args.overlay, strict=args.strict)
    predict(args.model, args.inputs, args.out, opts, overrides=args.overrides)
    return 0


def _export_options(parser) -> None:
    from ddp_finetune.inference.export import DEFAULT_ATOL, DEFAULT_OPSET, FORMATS, OUTPUTS, PREPROCESSING

    parser.add_argument("--format", required=True, choices=list(FORMATS), help="onnx, or torch.export's program (.pt2)")
    parser.add_argument("--out", default=None, help="the artifact's file (default: RUN/export/FORMAT/model.onnx|.pt2)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--batch", default="dynamic", help="`dynamic` or a fixed batch size (default: %(default)s)")
    parser.add_argument(
        "--preprocessing",
        default="include",
        choices=PREPROCESSING,
        help="include: the graph takes uint8 NCHW images and normalizes them; none: normalized float (default: %(default)s)",
    )
    parser.add_argument(
        "--output", default="logits", choices=OUTPUTS, help="segmenters: logits or the class map (default: %(default)s)"
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help="largest logit difference to PyTorch accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--images", default=None, help="folder of images to verify on (default: the run's validation split)"
    )


def _export(args) -> int:
    from ddp_finetune.inference.export import ExportOptions, export_model

    opts = ExportOptions(
        out=args.out,
        opset=args.opset,
        batch=args.batch,
        preprocessing=args.preprocessing,
        output=args.output,
        atol=args.atol,
        images=args.images,
    )
    export_model(args.model, args.format, opts, overrides=args.overrides)
    return 0


def _plot_options(parser) -> None:
    parser.add_argument("--out", default="curves.png", help="PNG file to write (default: %(default)s)")


def _plot(args) -> int:
    from ddp_finetune.commands.plot import plot_command

    if args.overrides:
        raise UserError(f"plot takes no key=value overrides (got {' '.join(args.overrides)}); give run folders")
    plot_command(args.runs, args.out)
    return 0


def _check_invariance_options(parser) -> None:
    from ddp_finetune.commands.check_invariance import TOLERANCE

    parser.add_argument("--procs", type=int, default=2, help="processes of the N-process run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of each run (default: %(default)s)")
    parser.add_argument("--out", default=None, help="keep the three runs in this new folder (default: a temporary one)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="largest relative difference called rounding (default: %(default)s)",
    )


def _check_invariance(args) -> int:
    from ddp_finetune.commands.check_invariance import check_invariance_command

    return check_invariance_command(args.config, args.overrides, args.procs, args.steps, args.out, args.tolerance)


def _pack_options(parser) -> None:
    from ddp_finetune.data.pack import TASKS

    parser.add_argument(
        "--task",
        default="classification",
        choices=TASKS,
        help="classification: class folders (also for binary); segmentation: images/ + masks/ (default: %(default)s)",
    )
    parser.add_argument(
        "--max-shard-size", default="500MB", help="size of each Arrow file of OUT (default: %(default)s)"
    )


def _pack(args) -> int:
    from ddp_finetune.data.pack import pack_folder

    if args.overrides:
        raise UserError(f"pack takes no key=value overrides (got {' '.join(args.overrides)}); give FOLDER and OUT")
    report = pack_folder(args.folder, args.out, task=args.task, max_shard_size=args.max_shard_size)
    rows = ", ".join(f"{n} {split}" for split, n in report.rows.items())
    print(
        f"packed {rows} images ({report.bytes / 2**20:.1f} MiB) into {report.out} in {report.seconds:.1f} s; "
        f"train from it with data.source=disk data.path={report.out}",
        flush=True,
    )
    return 0


def _sweep_options(parser) -> None:
    parser.add_argument("--out", required=True, help="the sweep folder: sweep.json, one output_dir per element")
    parser.add_argument("--seeds", default=None, help="seeds to sweep, last: 0-2 or 0,5,7 (default: the config's seed)")
    parser.add_argument(
        "--max-parallel", type=int, default=None, help="elements at once (default: 1 here; no limit with --slurm)"
    )
    parser.add_argument("--slurm", default=None, metavar="TEMPLATE", help="submit one job array with slurm/*.sbatch")
    parser.add_argument(
        "--sbatch",
        default="",
        metavar="OPTIONS",
        help="with --slurm: more sbatch options, e.g. '-p gpu --time=2:00:00'",
    )


def _sweep(args) -> int:
    from ddp_finetune.commands.sweep import sweep_command

    return sweep_command(args.config, args.overrides, args.seeds, args.out, args.slurm, args.max_parallel, args.sbatch)


def _sweep_report_options(parser) -> None:
    parser.add_argument("--metric", default=None, help="validation metric (default: val/top1, val/mean_iou, ...)")
    parser.add_argument(
        "--mode", choices=("max", "min"), default=None, help="best is the max or min (default: by metric)"
    )


def _sweep_report(args) -> int:
    from ddp_finetune.commands.sweep import report_command

    if args.overrides:
        raise UserError(f"sweep-report takes no key=value overrides (got {' '.join(args.overrides)})")
    return report_command(args.sweep_dir, args.metric, args.mode)


def _sweep_element(args) -> int:
    from ddp_finetune.commands.sweep import element_args

    if args.overrides:
        raise UserError(f"sweep-element takes no key=value overrides (got {' '.join(args.overrides)})")
    try:
        index = int(args.index)
    except ValueError:
        raise UserError(f"element index {args.index!r} is not a number (SLURM_ARRAY_TASK_ID)") from None
    print("\n".join(element_args(args.manifest, index)), flush=True)
    return 0


COMMANDS: dict[str, Command] = {
    "init": Command("write a commented starter config for a task", _init, _init_options, takes_config=False),
    "config": Command("print the resolved config a run would write, and validate it, without training", _config),
    "train": Command("train (or resume) from a config", _train),
    "demo": Command(
        "offline demo: transfer learning on handwritten digits, or --task segmentation",
        _demo,
        _demo_options,
        takes_config=False,
    ),
    "lr-plot": Command("draw the learning rate of every parameter group, without training", _lr_plot, _lr_plot_options),
    "evaluate": Command(
        "score a trained model on a split, as training evaluates: eval.json, a confusion matrix, a table",
        _evaluate,
        _evaluate_options,
        takes_config=False,
        positionals=(_MODEL,),
    ),
    "predict": Command(
        "run a trained model on images, folders or saved datasets: a CSV, or PNG masks for segmentation",
        _predict,
        _predict_options,
        takes_config=False,
        positionals=(_MODEL, Positional("inputs", "INPUT", "image files, folders of images, saved datasets", True)),
    ),
    "check-invariance": Command(
        "train a few steps of a config on 1 process and on N, and say whether they train the same (exit 0) or not (1)",
        _check_invariance,
        _check_invariance_options,
    ),
    "export": Command(
        "export a trained model to ONNX or torch.export's program, verified against PyTorch on real images",
        _export,
        _export_options,
        takes_config=False,
        positionals=(_MODEL,),
    ),
    "plot": Command(
        "draw the training curves of one or more runs, overlaid: loss, metrics, learning rates, images/s",
        _plot,
        _plot_options,
        takes_config=False,
        positionals=(Positional("runs", "RUN", "run folders (output_dir), each with its metrics.jsonl", True),),
    ),
    "pack": Command(
        "write an image folder as an Arrow dataset (image bytes inside, sharded) that data.source=disk trains from",
        _pack,
        _pack_options,
        takes_config=False,
        positionals=(
            Positional("folder", "FOLDER", "the image folder, as data.path would give it"),
            Positional("out", "OUT", "the new dataset folder (never overwritten)"),
        ),
    ),
    "sweep": Command(
        "run a grid of trainings (key=v1,v2 ..., --seeds): here, K at a time, or as one SLURM job array; resumable",
        _sweep,
        _sweep_options,
    ),
    "sweep-report": Command(
        "results of a sweep: per setting the metric's mean, std, min, max over seeds; results.csv, .md, .png",
        _sweep_report,
        _sweep_report_options,
        takes_config=False,
        positionals=(Positional("sweep_dir", "SWEEP_DIR", "the --out folder of a sweep"),),
    ),
    "sweep-element": Command(
        "print the config and overrides of one sweep element, one a line (what a SLURM array task trains)",
        _sweep_element,
        takes_config=False,
        positionals=(
            Positional("manifest", "SWEEP_JSON", "a sweep's sweep.json (or its folder)"),
            Positional("index", "INDEX", "the element's index (SLURM_ARRAY_TASK_ID)"),
        ),
    ),
}


# --------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, like a UserError, with where to find the usage
        self.exit(EXIT_USER_ERROR, f"{PROG}: error: {message}; see `{self.prog} -h`\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the top-level parser, one parser per command in `COMMANDS`)."""
    top = _Parser(
        prog=PROG,
        description="Fine-tune torchvision models on 1 CPU, N GPUs or SLURM: the same config gives the same training.",
        epilog=f"""A first run on your images:
  {PROG} init --out my_run.yaml        # then edit it: data.path first
  {PROG} config my_run.yaml            # the resolved config, validated, no training
  {PROG} train my_run.yaml
After training (RUN is the run's output_dir):
  {PROG} evaluate RUN [--data held_out/]
  {PROG} predict RUN photos/ --out predictions.csv
  {PROG} plot RUN [RUN ...] --out curves.png
  {PROG} export RUN --format onnx
A grid of runs, resumable, here or as one SLURM job array (--slurm slurm/cpu.sbatch):
  {PROG} sweep my_run.yaml optim.lr=0.01,0.03 --seeds 0-2 --out sweeps/lr
  {PROG} sweep-report sweeps/lr        # results.csv, results.md, results.png
Configs shipped inside the package are @NAME, e.g. `{PROG} train @digits_source`.
Help on a command: {PROG} COMMAND -h""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    shipped = ", ".join(SHIPPED_PREFIX + name for name in shipped_configs())
    parsers = {}
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.takes_config:
            p.add_argument(
                "config", metavar="CONFIG", help=f"YAML config file, or a config shipped inside the package: {shipped}"
            )
        for pos in command.positionals:
            p.add_argument(pos.dest, metavar=pos.metavar, nargs="+" if pos.many else None, help=pos.help)
        command.add_options(p)
        p.add_argument(
            "overrides",
            nargs="*",
            default=[],  # without a default argparse requires a '*' positional
            metavar="key=value",
            help="config overrides, anywhere among the options, e.g. train.epochs=3 optim.lr=0.01",
        )
        parsers[name] = p
    return top, parsers


def parse(argv: list[str]) -> argparse.Namespace | None:
    """The parsed arguments of a command line; None when no command was given.

    Usage errors exit 2 with one line. A command's options and overrides are parsed with
    `parse_intermixed_args`, so `key=value` may come before, between or after the options.
    """
    top, parsers = build_parser()
    first = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    top.parse_args(argv[:first])  # -h and --version exit here; an unknown option is a usage error
    if first == len(argv):
        return None
    name = argv[first]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        top.error(f"unknown command {name!r}{hint}; the commands are {', '.join(COMMANDS)}")
    args = parsers[name].parse_intermixed_args(argv[first + 1 :])
    args.command = name
    if COMMANDS[name].takes_config and _is_override(args.config):
        # `train a.b=1 my.yaml`: argparse took the override for the config
        parsers[name].error(f"the CONFIG comes first, before the key=value overrides (got {args.config!r} there)")
    for pos in COMMANDS[name].positionals:
        _split_overrides(parsers[name], args, pos)
    return args


def _is_override(token: str) -> bool:
    return bool(_OVERRIDE.match(token)) and not Path(token).exists()


def _split_overrides(parser, args, pos: Positional) -> None:
    """A `many` positional took every token after it: move the key=value ones to the overrides."""
    value = getattr(args, pos.dest)
    if not pos.many:
        if _is_override(value):
            parser.error(f"the {pos.metavar} comes first, before the key=value overrides (got {value!r} there)")
        return
    args.overrides = [t for t in value if _is_override(t)] + args.overrides
    setattr(args, pos.dest, [t for t in value if not _is_override(t)])
    if not getattr(args, pos.dest):
        parser.error(f"the following arguments are required: {pos.metavar}")


def _error_prefix() -> str:
    from ddp_finetune.distributed import launched_rank

    rank = launched_rank()
    return f"[rank {rank}] " if rank else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parse(argv)
    except SystemExit as exc:  # -h, --version (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    if args is None:
        # `ddp-finetune` alone: a usage error that shows what there is to do
        build_parser()[0].print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return COMMANDS[args.command].run(args)
    except UserError as exc:
        print(f"{PROG}: error: {_error_prefix()}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr, flush=True)
        return 130
    finally:
        _teardown()


def _teardown() -> None:
    """Done, preempted, bad input or a crash: no process group is left to interpreter shutdown."""
    if "torch.distributed" in sys.modules:  # nothing to tear down before torch is loaded
        from ddp_finetune.distributed import destroy_process_group

        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
