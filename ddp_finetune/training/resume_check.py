"""Does a checkpoint fit the run that wants to resume from it? One line when it does not.

    check_fits(accelerator, checkpoint_folder, config_text)   # before accelerator.load_state

A checkpoint holds `config.yaml`, the config that saved it. Resuming after a change that alters
the model (`model.name`, the number of classes, the task) would fail inside `load_state_dict`
with a multi-kilobyte list of keys; here the weights file's keys and shapes are compared with
the model's first, and the error names the differing keys and the config keys that differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddp_finetune import distributed as dist_utils
from ddp_finetune.errors import UserError

# keys a resumed run may change without changing what the checkpoint holds
_FREE_TO_CHANGE = (
    "output_dir",
    "checkpoint.",
    "log.",
    "train.max_steps",
    "train.epochs",
    "train.dist_timeout_minutes",
    "data.num_workers",
    "data.bad_images",
)
_SHOWN = 3
CLASS_NAMES_KEY = "class_names"  # trainer_state.json: the run's classes in index order (since checkpoints hold it)


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved_text: str, current_text: str) -> list[str]:
    """`key: <saved> there, <current> here` for each config key that differs (free-to-change keys left out)."""
    saved, current = _flat(yaml.safe_load(saved_text)), _flat(yaml.safe_load(current_text))
    return [
        f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here"
        for k in sorted(saved.keys() | current.keys())
        if saved.get(k) != current.get(k) and not k.startswith(_FREE_TO_CHANGE)
    ]


def _saved_config(folder: Path) -> str:
    path = folder / "config.yaml"
    return path.read_text() if path.is_file() else ""


def check_fits(accelerator, folder, config_text: str) -> None:
    """Raise a UserError when the checkpoint's weights do not fit the prepared model; print the
    config keys that differ when they do (a resumed run usually means the same config)."""
    folder = Path(folder)
    diffs = config_differences(_saved_config(folder), config_text)
    mismatch = _weights_mismatch(accelerator, folder)
    if mismatch:
        because = f"; the config differs in {'; '.join(diffs[:5])}" if diffs else ""
        raise UserError(
            f"checkpoint {folder} holds a different model ({mismatch}){because}; resume with the config it was "
            f"saved with ({folder / 'config.yaml'}), or start the new model in a new output_dir"
        )
    if diffs:
        dist_utils.print0(f"resuming with a config that differs from the checkpoint's in {'; '.join(diffs)}")


def load_failure(folder, exc: Exception, config_text: str) -> UserError:
    """The one-line error for a `load_state` failure that the weights check did not foresee
    (e.g. an optimizer whose parameter groups changed)."""
    from ddp_finetune.errors import first_line

    folder = Path(folder)
    diffs = config_differences(_saved_config(folder), config_text)
    because = f"; the config differs in {'; '.join(diffs[:5])}" if diffs else ""
    return UserError(
        f"checkpoint {folder} does not fit this run ({first_line(exc)[:200]}){because}; resume with the config it "
        f"was saved with ({folder / 'config.yaml'}), or use a new output_dir"
    )


def _weights_mismatch(accelerator, folder: Path) -> str | None:
    """Keys missing / unexpected / of another shape between model.safetensors and the prepared model."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    models = getattr(accelerator, "_models", [])
    if not weights.is_file() or len(models) != 1:
        return None
    with safe_open(str(weights), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    here = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    missing = sorted(here.keys() - saved.keys())
    unexpected = sorted(saved.keys() - here.keys())
    reshaped = sorted(k for k in saved.keys() & here.keys() if saved[k] != here[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} of this model's keys are not in it, e.g. {', '.join(missing[:_SHOWN])}")
    if unexpected:
        parts.append(f"{len(unexpected)} of its keys are not in this model, e.g. {', '.join(unexpected[:_SHOWN])}")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} keys have other shapes, e.g. {k} {list(saved[k])} there, {list(here[k])} here")
    return "; ".join(parts) or None


def check_classes(folder, names, data_path) -> None:
    """The run's classes are the checkpoint's, by name and order: a class folder replaced by another (same
    count, same shapes) would otherwise train on, and model.json name classes half the run never saw.
    Checkpoints saved before the names were kept are not checked here (the weights' shapes still are)."""
    import json

    state_file = Path(folder) / "trainer_state.json"
    try:
        saved = json.loads(state_file.read_text()).get(CLASS_NAMES_KEY)
    except (OSError, ValueError, AttributeError):
        return  # resolve_resume verified the checkpoint; an unreadable state is load_checkpoint's to report
    if saved is None or list(saved) == list(names):
        return
    gone = [n for n in saved if n not in names]
    new = [n for n in names if n not in saved]
    what = "; ".join(
        part
        for part in (
            f"gone: {', '.join(gone[: _SHOWN * 2])}" if gone else "",
            f"new: {', '.join(new[: _SHOWN * 2])}" if new else "",
            "same classes in another order" if not gone and not new else "",
        )
        if part
    )
    raise UserError(
        f"checkpoint {folder} was trained on the classes ({', '.join(saved[:10])}), data.path={str(data_path)!r} "
        f"has ({', '.join(list(names)[:10])}) ({what}); resume with the data it was trained on, or start the new "
        "classes in a new output_dir"
    )
