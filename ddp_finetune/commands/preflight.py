"""Check a config against this machine without training: what `ddp-finetune config` runs.

`Config.validate` checks values on their own; this checks what they point at: the model builds
for the task with that weights name (on the meta device), a weights file exists, the data
folder exists.
Each failure is the `UserError` a training run would stop with, so a config that passes here
fails later only on what needs the data read (columns, classes, masks) or the launcher
(a batch that does not divide by the number of processes).
"""

from __future__ import annotations

from pathlib import Path

from ddp_finetune.config import Config
from ddp_finetune.errors import UserError


def check_inputs(cfg: Config) -> list[str]:
    """Raise `UserError` at the first problem; return one line per check that passed."""
    from ddp_finetune.models import build_model
    from ddp_finetune.models.weights import is_local
    from ddp_finetune.training.freeze import plan_freeze

    # the architecture on the meta device: model name, task and weights name checked by the code
    # that builds the run, in milliseconds, with no weights read or downloaded
    model, parts, _ = build_model(
        cfg.model, cfg.model.num_classes or 2, cfg.task, image_size=cfg.data.image_size, meta=True
    )
    done = [f"model.name={cfg.model.name!r} builds for task={cfg.task}"]
    if cfg.model.freezes_anything():  # the patterns and block count against the model's own names
        plan_freeze(cfg.model, parts, model, cfg.train.epochs)
        done.append("model.freeze / freeze_blocks match the model")

    weights = cfg.model.weights
    if weights is not None and is_local(weights):
        if not Path(weights).is_file():
            raise UserError(
                f"model.weights={weights!r}: file not found; give an existing .pth/.safetensors file or a weights name"
            )
        done.append(f"model.weights={weights!r} is a file")
    elif weights is not None:
        done.append(f"model.weights={weights!r} is a weights name of the model (fetched at the start of training)")

    source, path = cfg.data.source, cfg.data.path
    if source == "hub":
        done.append(f"data.path={path!r} is a Hub name (not checked: it is read at the start of training)")
    elif not Path(path).is_dir():
        what = "does not exist" if not Path(path).exists() else "is not a folder"
        raise UserError(f"data.path={path!r} {what}; give the folder of your images (data.source={source})")
    else:
        done.append(f"data.path={path!r} is a folder")
    return done


def what_trains(cfg: Config) -> str:
    """The table of what trains, per block, from the model built on the meta device (`freeze.FreezePlan`)."""
    from ddp_finetune.models import build_model
    from ddp_finetune.training.freeze import plan_freeze

    model, parts, _ = build_model(
        cfg.model, cfg.model.num_classes or 2, cfg.task, image_size=cfg.data.image_size, meta=True
    )
    return plan_freeze(cfg.model, parts, model, cfg.train.epochs).describe()
