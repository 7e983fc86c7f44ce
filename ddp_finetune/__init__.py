"""Fine-tune torchvision and timm models with Hugging Face Accelerate; the same config gives the same
training on 1 CPU process, N GPUs or N SLURM nodes.

A library as well as a command (`ddp-finetune`):

    from ddp_finetune import load_config, fit, load_model_folder

    cfg = load_config("my_run.yaml", ["train.epochs=3"])   # or Config(...) built in Python
    summary = fit(cfg)                                      # what `ddp-finetune train` runs
    loaded = load_model_folder(cfg.output_dir)              # final/: the model, its classes, its config

These names are the public API (README, "Python"); each is imported on first use, so
`ddp-finetune -h` does not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # the config
    "Config": "ddp_finetune.config",
    "DataConfig": "ddp_finetune.config",
    "ModelConfig": "ddp_finetune.config",
    "TrainConfig": "ddp_finetune.config",
    "OptimConfig": "ddp_finetune.config",
    "ScheduleConfig": "ddp_finetune.config",
    "LossConfig": "ddp_finetune.config",
    "CheckpointConfig": "ddp_finetune.config",
    "LogConfig": "ddp_finetune.config",
    "load_config": "ddp_finetune.config",
    "config_from_dict": "ddp_finetune.config",
    "dump_config": "ddp_finetune.config",
    # training
    "fit": "ddp_finetune.training.loop",
    "Preempted": "ddp_finetune.training.loop",
    # after training
    "load_model_folder": "ddp_finetune.models.folder",
    "LoadedModel": "ddp_finetune.models.folder",
    # the parts a custom loop reuses
    "build_model": "ddp_finetune.models",
    "build_loss": "ddp_finetune.losses",
    "UserError": "ddp_finetune.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddp_finetune' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
