"""Build a model by name, load its weights, replace its head, and say what its parts are.

    model, parts, report = build_model(cfg.model, num_classes=5, task=cfg.task)
    logits, aux = split_outputs(model(x))   # loss = loss(logits) + parts.aux_weight * sum(aux losses)

`Parts` (parts.py) is everything the rest of the package knows about a model: the head group,
the replaced layers, the backbone blocks for layer decay, the auxiliary-loss weight and the
normalization its weights expect. `LoadReport` says what was loaded.

Where model knowledge lives:
- torchvision classifiers and segmenters: one entry per family in `torchvision_families.py`;
- timm models (`model.name: timm/<name>`): `timm_models.py`, which reads timm's own methods;
- weights (torchvision names, local `.pth` / `.safetensors`): `weights.py`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

from torch import nn

from ddp_finetune.models import timm_models, torchvision_families
from ddp_finetune.models.parts import IMAGENET_MEAN, IMAGENET_STD, LoadReport, Parts, generic_parts
from ddp_finetune.models.torchvision_families import split_outputs

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadReport",
    "Parts",
    "build_model",
    "check_model_name",
    "generic_parts",
    "split_outputs",
]


def check_model_name(name: str, task: str | None = None) -> None:
    """A `UserError` unless `name` is a model this package builds for `task` (None: any task)."""
    if name.startswith(timm_models.PREFIX):
        timm_models.check_model_name(name.removeprefix(timm_models.PREFIX), task)
    else:
        torchvision_families.check_model_name(name, task)


def build_model(
    model_cfg, num_classes: int, task: str | None = None, *, image_size: int | None = None, meta: bool = False
) -> tuple[nn.Module, Parts, LoadReport]:
    """The configured model with a new head for `num_classes`, its `Parts`, and what was loaded.

    `task` checks the model's kind (segmenters only with `segmentation`); None accepts either.
    `image_size` (`data.image_size`): timm models with a fixed input size (ViT, Swin, ...) are
    set to it; None keeps their native size. torchvision models take any size they accept.
    `meta=True` builds the same architecture with the same `Parts` on the meta device (no
    memory, no weights loaded: the lr plot's groups).
    """
    name = model_cfg.name
    check_model_name(name, task)
    weights, load_head = model_cfg.weights, model_cfg.load_head
    # model.drop_path_rate / grad_checkpointing (absent from configs made before they existed)
    extras = dict(
        drop_path_rate=getattr(model_cfg, "drop_path_rate", None),
        grad_checkpointing=getattr(model_cfg, "grad_checkpointing", False),
    )
    with _empty_weights() if meta else nullcontext():
        if name.startswith(timm_models.PREFIX):
            arch = name.removeprefix(timm_models.PREFIX)
            return timm_models.build(arch, weights, num_classes, load_head, meta, image_size, **extras)
        return torchvision_families.build(name, weights, num_classes, load_head, meta, **extras)


@contextmanager
def _empty_weights():
    """Parameters on the meta device, everything else as usual.

    Accelerate's `init_empty_weights` rather than `torch.device("meta")`: some builders compute
    their layout from real tensors (RegNet's widths, timm's drop-path rates call `.tolist()`).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init warnings about meta tensors, GoogLeNet's init_weights
        yield
