"""Model folders without training: a random-init model saved as training saves final/ (for the tests of
evaluate and predict on tasks and model families that need no trained weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import fresh_accelerate


def make_model_folder(root, name="resnet18", task="classification", class_names=("cat", "dog"), image_size=32, seed=0):
    """`root/run/final/` of model `name` with random weights, written by checkpoint.save_final_weights."""
    from ddp_finetune.config import config_from_dict
    from ddp_finetune.data.sources import Classes
    from ddp_finetune.distributed import make_accelerator
    from ddp_finetune.models import build_model
    from ddp_finetune.models.folder import model_files
    from ddp_finetune.training.checkpoint import save_final_weights

    root = Path(root)
    data = {"path": str(root / "data"), "image_size": image_size}
    if task == "segmentation":
        data["class_names"] = list(class_names)
    cfg = config_from_dict(
        {
            "output_dir": str(root / "run"),
            "task": task,
            "data": data,
            "model": {"name": name},
            "train": {"batch_size": 4},
        }
    )
    outputs = 1 if task == "binary" else len(class_names)
    kind = "mask" if task == "segmentation" else "index"
    classes = Classes(names=tuple(class_names), outputs=outputs, label_kind=kind)
    torch.manual_seed(seed)
    model, parts, _ = build_model(cfg.model, outputs, task, image_size=image_size)
    with fresh_accelerate():
        save_final_weights(make_accelerator(), model.eval(), cfg.output_dir, model_files(cfg, classes, parts))
    return Path(cfg.output_dir) / "final"
