"""Check a config against this machine without training: what `ddp-finetune config` runs.

`Config.validate` checks values on their own; this checks what they point at: the model name
is a torchvision model of the task, the weights name or file exists, the data folder exists.
Each failure is the `UserError` a training run would stop with, so a config that passes here
fails later only on what needs the data read (columns, classes, masks) or the launcher
(a batch that does not divide by the number of processes).
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .errors import UserError


def check_inputs(cfg: Config) -> list[str]:
    """Raise `UserError` at the first problem; return one line per check that passed."""
    from .models import check_model_name, resolve_enum, segmenter_names

    check_model_name(cfg.model.name, cfg.task)
    kind = "segmenter" if cfg.model.name in segmenter_names() else "classifier"
    done = [f"model.name={cfg.model.name!r} is a torchvision {kind}"]

    weights = cfg.model.weights
    if weights is not None:
        if Path(weights).is_file():
            done.append(f"model.weights={weights!r} is a file")
        else:
            resolve_enum(cfg.model.name, weights)  # raises naming the valid names (and local files)
            done.append(f"model.weights={weights!r} is a weights name of {cfg.model.name}")

    source, path = cfg.data.source, cfg.data.path
    if source == "hub":
        done.append(f"data.path={path!r} is a Hub name (not checked: it is read at the start of training)")
    elif not Path(path).is_dir():
        what = "does not exist" if not Path(path).exists() else "is not a folder"
        raise UserError(f"data.path={path!r} {what}; give the folder of your images (data.source={source})")
    else:
        done.append(f"data.path={path!r} is a folder")
    return done
