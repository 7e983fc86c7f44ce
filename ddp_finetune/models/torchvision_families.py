"""Everything the package knows about torchvision's model families, in one table.

A family is a module of `torchvision.models` (`resnet`, `vision_transformer`,
`segmentation.deeplabv3`, ...); every model that module builds shares its head names, block
layout and auxiliary outputs. Adding a family is adding one `FAMILIES` entry here; the test
`tests/test_models.py::test_every_torchvision_model_resolves_to_parts` builds every torchvision
classifier and segmenter on the meta device and checks its entry.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from ddp_finetune.errors import UserError
from ddp_finetune.models import weights as W
from ddp_finetune.models.parts import LoadReport, Parts, split_blocks

THIS_FILE = "ddp_finetune/models/torchvision_families.py"


@dataclass(frozen=True)
class Family:
    heads: tuple[str, ...]
    """The head group: module names, main head first (auxiliary heads after it)."""
    head_layers: tuple[str, ...] = ()
    """The layers swapped for fresh ones with the new classes (Linear or 1x1 Conv2d); () means `heads`."""
    stem: tuple[str, ...] = ()
    """Modules that form the first backbone block, `stem` (layer decay)."""
    containers: tuple[str, ...] = ()
    """Modules whose children are backbone blocks of their own (`<container>.<child>`)."""
    own: tuple[str, ...] = ()
    """Modules inside another that form a block of their own (ViT's final `encoder.ln`)."""
    aux_weight: float = 0.0
    """Weight of each auxiliary output's loss."""
    kwargs: dict = field(default_factory=dict)
    """Builder keyword arguments (`torchvision.models.get_model(name, **kwargs)`)."""
    init_weights: bool = False
    """The builder takes `init_weights` (GoogLeNet, Inception: their own init for a random start)."""


# GoogLeNet / Inception v3 keep their auxiliary classifiers, trained with weight 0.3 as in the
# GoogLeNet paper. Segmenters never download ImageNet backbone weights on their own
# (`weights_backbone=None`: the weights are ours to load), and DeepLabV3 / FCN keep their
# auxiliary FCN head (`aux_loss=True`, as torchvision's COCO weights), weight 0.5 as in
# torchvision's segmentation reference. The main head's registration order puts it last in
# every family, so the blocks (registration order) run input to output.
_SEGMENTER_HEADS = dict(
    heads=("classifier", "aux_classifier"),
    head_layers=("classifier.4", "aux_classifier.4"),  # DeepLabHead / FCNHead: a Sequential, 1x1 conv last
    stem=("backbone.conv1", "backbone.bn1"),  # ResNet backbones; MobileNetV3's are `backbone.<i>`
    containers=("backbone",),
    aux_weight=0.5,
    kwargs={"weights_backbone": None, "aux_loss": True},
)
FAMILIES: dict[str, Family] = {
    "alexnet": Family(heads=("classifier.6",), containers=("features",)),
    "convnext": Family(heads=("classifier.2",), containers=("features",)),  # classifier.0: LayerNorm2d
    "densenet": Family(heads=("classifier",), containers=("features",)),
    "efficientnet": Family(heads=("classifier.1",), containers=("features",)),
    "googlenet": Family(
        heads=("fc", "aux1.fc2", "aux2.fc2"), aux_weight=0.3, kwargs={"aux_logits": True}, init_weights=True
    ),
    "inception": Family(heads=("fc", "AuxLogits.fc"), aux_weight=0.3, kwargs={"aux_logits": True}, init_weights=True),
    "maxvit": Family(heads=("classifier.5",), containers=("blocks",)),
    "mnasnet": Family(heads=("classifier.1",), containers=("layers",)),
    "mobilenetv2": Family(heads=("classifier.1",), containers=("features",)),
    "mobilenetv3": Family(heads=("classifier.3",), containers=("features",)),
    "regnet": Family(heads=("fc",), containers=("trunk_output",)),
    "resnet": Family(heads=("fc",), stem=("conv1", "bn1")),  # also ResNeXt, Wide ResNet
    "shufflenetv2": Family(heads=("fc",)),
    "squeezenet": Family(heads=("classifier.1",), containers=("features",)),  # a 1x1 conv
    "swin_transformer": Family(heads=("head",), containers=("features",)),
    "vgg": Family(heads=("classifier.6",), containers=("features",)),
    "vision_transformer": Family(
        heads=("heads.head",),
        stem=("class_token", "conv_proj", "encoder.pos_embedding"),
        containers=("encoder.layers",),
        own=("encoder.ln",),
    ),
    "segmentation.deeplabv3": Family(**_SEGMENTER_HEADS),
    "segmentation.fcn": Family(**_SEGMENTER_HEADS),
    "segmentation.lraspp": Family(  # no auxiliary head; its two branches end in class convs
        heads=("classifier",),
        head_layers=("classifier.low_classifier", "classifier.high_classifier"),
        containers=("backbone",),
        kwargs={"weights_backbone": None},
    ),
}


# --------------------------------------------------------------------------- names


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def segmenter_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def check_model_name(name: str, task: str | None = None) -> None:
    """Segmenters only with task segmentation, classifiers only with the other tasks (None: either)."""
    classifiers, segmenters = classifier_names(), segmenter_names()
    if task == "segmentation":
        if name in classifiers:
            raise UserError(
                f"model.name={name!r} is a classifier but task=segmentation needs a segmenter; use one of {', '.join(segmenters)}"
            )
        names, kind, listing = segmenters, "segmentation model", "torchvision.models.segmentation"
    else:
        if task is not None and name in segmenters:
            raise UserError(
                f"model.name={name!r} is a segmentation model but task={task}; set task=segmentation or pick a classifier"
            )
        names = classifiers + (segmenters if task is None else [])
        kind, listing = "classifier", "torchvision.models"
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"model.name={name!r} is not a torchvision {kind}{hint} (nor timm/<name>); "
            f"list them with: python -c 'import torchvision; print(torchvision.models.list_models({listing}))'"
        )


def family_of(name: str) -> Family:
    """The `FAMILIES` entry of a torchvision model name (its builder's module)."""
    module = torchvision.models.get_model_builder(name).__module__.removeprefix("torchvision.models.")
    if module not in FAMILIES:
        raise UserError(
            f"model.name={name!r} (torchvision.models.{module}) needs an entry in {THIS_FILE}; "
            "add its heads and blocks there"
        )
    return FAMILIES[module]


# --------------------------------------------------------------------------- build


def build(
    name: str,
    weights: str | None,
    num_classes: int,
    load_head: bool,
    meta: bool,
    drop_path_rate: float | None = None,
    grad_checkpointing: bool = False,
):
    """(model, Parts, LoadReport) of torchvision model `name`; `meta`: the architecture only, no weights.

    `drop_path_rate`: the builder's `stochastic_depth_prob` (EfficientNet, ConvNeXt, Swin, MaxViT...);
    `grad_checkpointing`: DenseNet's `memory_efficient`; other models refuse either with one line."""
    family = family_of(name)
    kwargs = dict(family.kwargs)
    if drop_path_rate is not None:
        kwargs["stochastic_depth_prob"] = drop_path_rate
    if grad_checkpointing:
        if not name.startswith("densenet"):
            raise UserError(
                f"model.grad_checkpointing=true: torchvision's {name} has no checkpointing switch (DenseNet's "
                "memory_efficient is the one); use a timm/ model for it, or set it to false"
            )
        kwargs["memory_efficient"] = True
    if family.init_weights:
        # nothing to initialize on the meta device; with weights to load, torchvision's default
        if meta:
            kwargs["init_weights"] = False
        elif weights is None:
            kwargs["init_weights"] = True
    enum = None if weights is None or W.is_local(weights) else W.resolve_enum(name, weights)
    report = LoadReport(weights=weights)
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        if drop_path_rate is None or "stochastic_depth_prob" not in str(exc):
            raise
        raise UserError(
            f"model.drop_path_rate={drop_path_rate}: torchvision's {name} has no stochastic depth "
            "(EfficientNet, ConvNeXt, Swin, MaxViT... have); set model.drop_path_rate=null"
        ) from None
    if enum is not None and not meta:
        W.load_enum(model, enum, report)  # the whole model, head included, then the head is swapped
    heads = tuple(h for h in family.heads if _has_module(model, h))
    if not heads or heads[0] != family.heads[0]:
        raise UserError(f"model.name={name!r} has no module {family.heads[0]!r}; fix its entry in {THIS_FILE}")
    layers = family.head_layers or heads
    layers = tuple(layer for layer in layers if _has_module(model, layer))
    replace_head(model, layers, num_classes)
    report.heads = list(layers)
    if weights is not None and enum is None and not meta:
        W.load_local(model, W.load_state_file(weights), weights, layers, load_head, report)
    blocks = split_blocks(model, heads, family.stem, family.containers, family.own)
    parts = Parts(head_prefixes=heads, head_layers=layers, blocks=blocks, aux_weight=family.aux_weight)
    if enum is not None:
        parts = _with_enum_preprocessing(parts, enum)
    return model, parts, report


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    raise UserError(f"cannot replace a head of type {type(old).__name__}; fix the head_layers in {THIS_FILE}")


def replace_head(model: nn.Module, layers: tuple[str, ...], num_classes: int) -> None:
    """Swap every head layer for a fresh one with `num_classes` outputs."""
    for name in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _new_layer(getattr(parent, attr), num_classes))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def _with_enum_preprocessing(parts: Parts, enum) -> Parts:
    """Normalization and image side of torchvision weights (their `transforms()`)."""
    try:
        t = enum.transforms()
    except Exception:  # transforms without normalization stats
        return parts
    size = getattr(t, "crop_size", None) or getattr(t, "resize_size", None)
    return dataclasses.replace(parts, mean=tuple(t.mean), std=tuple(t.std), input_size=int(size[0]) if size else None)


# --------------------------------------------------------------------------- outputs


def split_outputs(outputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, aux logits) for plain tensors, GoogLeNet/Inception training outputs and
    segmenters' `{"out": (N, C, H, W), "aux": (N, C, H, W)}` dicts."""
    if isinstance(outputs, torch.Tensor):
        return outputs, []
    if isinstance(outputs, dict):
        return outputs["out"], [outputs["aux"]] if outputs.get("aux") is not None else []
    logits = outputs.logits
    aux = [
        getattr(outputs, n)
        for n in ("aux_logits", "aux_logits2", "aux_logits1")
        if getattr(outputs, n, None) is not None
    ]
    return logits, aux
