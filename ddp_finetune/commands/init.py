"""`ddp-finetune init`: a commented starter config for a task.

    write_starter("my_run.yaml", "segmentation", ["data.path=my_masks"])

Each key carries its meaning and default as a comment, taken from the config's own field
docstrings (`config.reference_rows`), the text the README's config reference is made from: one
source of truth. The values are those of a validated `Config`, so the file always loads.
"""

from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

from ddp_finetune.config import Config, config_from_dict, flow_yaml, reference_rows
from ddp_finetune.errors import UserError
from ddp_finetune.files import temporary_path
from ddp_finetune.out_paths import file_out, writing

TASKS = ("classification", "segmentation", "binary", "multilabel")

# The keys a user usually sets; the file lists them in the reference's order.
COMMON_KEYS = (
    "output_dir",
    "seed",
    "task",
    "data.source",
    "data.path",
    "data.val_split",
    "data.image_size",
    "data.augment",
    "data.crop_scale",
    "data.policy",
    "data.color_jitter",
    "data.random_erasing",
    "data.mixup_alpha",
    "data.cutmix_alpha",
    "data.sampler",
    "data.num_workers",
    "model.name",
    "model.weights",
    "model.freeze_backbone",
    "model.drop_path_rate",
    "model.grad_checkpointing",
    "train.epochs",
    "train.batch_size",
    "train.mixed_precision",
    "optim.name",
    "optim.lr",
    "optim.head_lr",
    "optim.weight_decay",
    "optim.args",
    "schedule.name",
    "schedule.warmup_epochs",
    "loss.name",
    "checkpoint.resume",
    "log.report_to",
)
TASK_KEYS = {
    "segmentation": ("data.class_names", "model.freeze_bn", "loss.ignore_index"),
    "multilabel": ("data.label_column",),
}

# Fine-tuning from pretrained weights with a 10x faster head: the usual recipe, not the defaults.
_FINETUNE = {
    "output_dir": "runs/my_run",
    "model.weights": "DEFAULT",
    "train.epochs": 10,
    "optim.name": "adamw",
    "optim.lr": 0.0001,
    "optim.head_lr": 0.001,
    "optim.weight_decay": 0.05,
    "schedule.name": "CosineAnnealingLR",
    "schedule.warmup_epochs": 1,
}
STARTER_VALUES = {
    "classification": {**_FINETUNE, "data.path": "my_images", "model.name": "resnet50"},
    "binary": {**_FINETUNE, "data.path": "my_images", "model.name": "resnet50"},
    "multilabel": {**_FINETUNE, "data.source": "disk", "data.path": "my_dataset", "model.name": "resnet50"},
    "segmentation": {
        **_FINETUNE,
        "data.path": "my_masks",
        "data.image_size": 512,
        "model.name": "deeplabv3_resnet50",
        "train.batch_size": 8,
    },
}
# Where the data go: the one thing every newcomer must edit.
LAYOUTS = {
    "classification": "my_images/<class>/*.jpg, or my_images/train/<class>/*.jpg + my_images/validation/<class>/*.jpg",
    "binary": "my_images/<class>/*.jpg with exactly two class folders (label = index in sorted order: the second is 1)",
    "multilabel": "a dataset saved with datasets' save_to_disk whose data.label_column holds a list of class indices "
    "(or a multi-hot vector) per image; a Hub name with data.source: hub",
    "segmentation": "my_masks/images/<name>.jpg + my_masks/masks/<name>.png (one class index per pixel), "
    "optionally under train/ and validation/",
}


def starter_config(task: str, overrides: list[str] | tuple = ()) -> tuple[Config, list[str]]:
    """(the validated starter Config for `task` with `overrides` applied, the keys the file shows)."""
    if task not in TASKS:
        raise UserError(f"init --task {task!r} is not one of {', '.join(TASKS)}")
    values = {"task": task, **STARTER_VALUES[task]}
    tree: dict = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    cfg = config_from_dict(tree, overrides)
    starter = config_from_dict(tree)
    keys = [key for key, _, _ in reference_rows()]
    # an override shows whatever form it took (a.b=1, a.b.c=1 inside a dict, a={b: 1})
    overridden = {key for key in keys if _value(cfg, key) != _value(starter, key)}
    shown = {*COMMON_KEYS, *TASK_KEYS.get(task, ()), *overridden}
    return cfg, [key for key in keys if key in shown]


def _value(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def render_starter(task: str, out_name: str, overrides: list[str] | tuple = ()) -> str:
    """The commented YAML text of the starter config for `task`, meant to be saved as `out_name`."""
    cfg, keys = starter_config(task, overrides)
    docs = {key: (default, doc) for key, default, doc in reference_rows()}
    lines = [
        f"# ddp-finetune train {out_name}",
        f"# Starter config for task: {task}, written by `ddp-finetune init`. Edit it, check it with",
        f"# `ddp-finetune config {out_name}` (the resolved config, validated), then train. Every key and its",
        "# meaning: the README's config reference (these comments are the same text).",
        *textwrap.wrap(f"Data: {LAYOUTS[task]}.", width=98, initial_indent="# ", subsequent_indent="#   "),
    ]
    section = None
    for key in keys:
        head, _, name = key.rpartition(".")
        if head != section:
            lines.append("")
            if head:
                lines.append(f"{head}:")
            section = head
        indent = "  " if head else ""
        default, doc = docs[key]
        lines += textwrap.wrap(
            f"{doc} Default: {default}.",
            width=100 - len(indent),
            initial_indent=f"{indent}# ",
            subsequent_indent=f"{indent}# ",
        )
        lines.append(f"{indent}{name}: {flow_yaml(_value(cfg, key))}")
    return "\n".join(lines) + "\n"


DEFAULT_NAME = "my_run.yaml"  # what `init` writes, also inside a folder given as --out


def write_starter(out, task: str, overrides: list[str] | tuple = ()) -> Path:
    """Write the starter config to `out` (a folder or `dir/`: dir/my_run.yaml); refuses to overwrite an
    existing file (UserError)."""
    out = file_out(out, "--out", default_name=DEFAULT_NAME)
    if out.exists():  # checked before the text is rendered; the link below is what makes it race-free
        raise UserError(f"{out} already exists and init never overwrites; give another --out or delete it")
    text = render_starter(task, str(out), overrides)
    tmp = temporary_path(out)
    try:
        with writing(out):
            tmp.write_text(text)
            try:
                try:
                    os.link(tmp, out)  # atomic and never replaces: a config someone has edited stays
                except FileExistsError:
                    raise
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                        raise
                    with out.open("x") as f:  # a file system without hard links: exclusive create, not atomic
                        f.write(text)
            except FileExistsError:
                raise UserError(
                    f"{out} already exists and init never overwrites; give another --out or delete it"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
