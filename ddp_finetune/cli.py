"""The `ddp-finetune` command: `train`, `demo`, `lr-plot`.

    ddp-finetune train configs/digits_source.yaml train.epochs=3
    accelerate launch --config_file launch/cpu_2proc.yaml -m ddp_finetune train CONFIG [key=value ...]

Bad input prints one line and exits 2 (no traceback); a run stopped by a signal exits with
`preemption.EXIT_PREEMPTED` after writing its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_USER_ERROR, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddp-finetune", description="Fine-tune torchvision models on 1 CPU, N GPUs or SLURM."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) from a YAML config")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3 optim.lr=0.01")

    d = sub.add_parser("demo", help="offline transfer learning on scikit-learn's handwritten digits")
    d.add_argument("--out", default="runs/demo", help="output folder (data, runs, results table)")
    d.add_argument("overrides", nargs="*", help="key=value overrides applied to every run of the demo")

    lp = sub.add_parser("lr-plot", help="draw the learning rate of every parameter group, without training")
    lp.add_argument("config")
    lp.add_argument("overrides", nargs="*")
    lp.add_argument("--out", default="lr.png", help="PNG file to write")
    lp.add_argument(
        "--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (default: from the dataset)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from .config import load_config
            from .preemption import EXIT_PREEMPTED
            from .train import Preempted, fit

            cfg = load_config(args.config, args.overrides)
            try:
                fit(cfg)
            except Preempted:
                return EXIT_PREEMPTED
            return 0
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.overrides)
            return 0
        if args.command == "lr-plot":
            from .lr_plot import lr_plot_command

            lr_plot_command(args.config, args.overrides, args.out, args.steps_per_epoch)
            return 0
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"ddp-finetune: error: {prefix}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ddp-finetune: aborted", file=sys.stderr, flush=True)
        return 130
    finally:
        _teardown()
    return 1


def _teardown() -> None:
    """Done, preempted, bad input or a crash: no process group is left to interpreter shutdown."""
    if "torch.distributed" in sys.modules:  # nothing to tear down before torch is loaded
        from .distributed import destroy_process_group

        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
