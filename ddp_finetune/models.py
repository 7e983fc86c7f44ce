"""Build a torchvision classifier or segmenter by name, load its weights, replace its head.

    model, report = build_model(cfg.model, num_classes=5, task=cfg.task)

Weights come from the torchvision enum (downloaded once into `$TORCH_HOME/hub/checkpoints`),
from a local `.pth` / `.safetensors` state dict, or nowhere (random init).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from .errors import UserError

_LOCAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


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
            f"model.name={name!r} is not a torchvision {kind}{hint}; "
            f"list them with: python -c 'import torchvision; print(torchvision.models.list_models({listing}))'"
        )


def builder_kwargs(name: str, weights: str | None) -> dict:
    """Keyword arguments for `torchvision.models.get_model(name, weights=None, ...)`.

    GoogLeNet / Inception v3 keep their auxiliary heads. Segmenters never download ImageNet
    backbone weights on their own (`weights_backbone=None`: the weights are ours to load), and
    DeepLabV3 / FCN keep their auxiliary FCN head (`aux_loss=True`, as torchvision's COCO weights).
    """
    kwargs: dict = {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = True
        if weights is None:
            kwargs["init_weights"] = True
    if name in segmenter_names():
        kwargs["weights_backbone"] = None
        if not name.startswith("lraspp"):  # LR-ASPP has no auxiliary head and rejects aux_loss
            kwargs["aux_loss"] = True
    return kwargs


# --------------------------------------------------------------------------- heads


def _aux_roots(model: nn.Module) -> list[str]:
    """Auxiliary classifiers of GoogLeNet (aux1, aux2) and Inception v3 (AuxLogits)."""
    return [n for n in ("aux1", "aux2", "AuxLogits") if getattr(model, n, None) is not None]


def _last_classifier_layer(module: nn.Module, prefix: str = "") -> str:
    """Name of the last Linear (or SqueezeNet's final 1x1 conv) in registration order."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    if last is None:  # SqueezeNet: classifier = Dropout, Conv2d(512, classes, 1), ReLU, AvgPool
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Conv2d) and name.startswith("classifier"):
                last = name
    if last is None:
        raise UserError(f"found no classifier layer in {type(module).__name__}; this model family is not supported")
    return f"{prefix}{last}" if prefix else last


def is_segmenter(model: nn.Module) -> bool:
    from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3

    return isinstance(model, (DeepLabV3, FCN, LRASPP))


def head_prefixes(model: nn.Module) -> list[str]:
    """Module names of the head group (the `head` parameter group): the main head first, then aux heads.

    For classifiers these are the layers `replace_head` swaps: the last Linear in registration
    order (ResNet/RegNet/ResNeXt `fc`, VGG/AlexNet/MobileNet/EfficientNet/ConvNeXt
    `classifier.<last>`, DenseNet `classifier`, ViT `heads.head`, Swin `head`, MaxViT
    `classifier.5`), SqueezeNet's `classifier.1` conv, plus GoogLeNet's `aux1.fc2`/`aux2.fc2`
    and Inception's `AuxLogits.fc`.
    For segmenters, the whole decoder heads: `classifier` (DeepLabV3's ASPP head, FCN's and
    LR-ASPP's heads) and `aux_classifier` (DeepLabV3 / FCN); `head_layers` lists the layers swapped.
    """
    if is_segmenter(model):
        return ["classifier"] + (["aux_classifier"] if getattr(model, "aux_classifier", None) is not None else [])
    aux = _aux_roots(model)
    main_model = model
    if aux:
        # registration order puts GoogLeNet's `fc` last, but be explicit
        main = "fc"
    else:
        main = _last_classifier_layer(main_model)
    heads = [main]
    for root in aux:
        heads.append(_last_classifier_layer(getattr(model, root), prefix=root + "."))
    return heads


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    raise UserError(f"cannot replace a head of type {type(old).__name__}")


def head_layers(model: nn.Module) -> list[str]:
    """The layers `replace_head` swaps for fresh ones: the final 1x1 convs of a segmenter's heads
    (DeepLabV3 / FCN `classifier.4`, `aux_classifier.4`; LR-ASPP `classifier.low_classifier`,
    `classifier.high_classifier`), a classifier's `head_prefixes`."""
    if not is_segmenter(model):
        return head_prefixes(model)
    if hasattr(model.classifier, "low_classifier"):  # LR-ASPP: its two branches' class convs
        return ["classifier.low_classifier", "classifier.high_classifier"]
    return [f"{root}.4" for root in head_prefixes(model)]  # DeepLabHead / FCNHead: Sequential, conv last


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap every head layer for a fresh one with `num_classes` outputs; returns their names."""
    names = head_layers(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _new_layer(getattr(parent, attr), num_classes))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return names


# --------------------------------------------------------------------------- weights


def _is_local(weights: str) -> bool:
    return weights.lower().endswith(_LOCAL_SUFFIXES) or os.sep in weights or weights.startswith(".")


def resolve_enum(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    members = list(enum.__members__)
    if weights not in enum.__members__:
        raise UserError(
            f"model.weights={weights!r} is not a weights name of {name} (valid: {', '.join(members)}) "
            "nor a local .pth/.safetensors file"
        )
    return enum[weights]


def cached_weights_path(weights_enum) -> Path:
    """Where torchvision keeps the downloaded file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights_enum.url).path)


def _load_enum_state(weights_enum) -> dict:
    path = cached_weights_path(weights_enum)
    if not path.exists():
        try:
            return weights_enum.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # no network, proxy, HTTP error ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"could not download {weights_enum} ({reason}); put {weights_enum.url} at {path} "
                "(or set TORCH_HOME to where it is cached), or use model.weights=null or a local file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cached weights file {path} is corrupt or incomplete ({reason}); delete it and run again to re-download"
        ) from None


def load_state_file(path: str | Path) -> dict:
    """A state dict from a .pth/.pt/.bin (torch.save) or .safetensors file, unwrapped and cleaned."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"model.weights={str(path)!r}: file not found; give an existing .pth/.safetensors file or a torchvision weights name"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"weights file {p} is corrupt or not a state dict ({reason[:200]}); delete or replace it"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"weights file {p} does not hold a state dict of tensors; save it with torch.save(model.state_dict(), ...)"
        )
    # weights saved from a DDP- or torch.compile-wrapped model
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def build_model(model_cfg, num_classes: int, task: str | None = None) -> tuple[nn.Module, dict]:
    """The model with its head replaced for `num_classes`, and a report of what was loaded.

    `task` checks the model's kind (segmenters only with `segmentation`); None accepts either.
    """
    name, weights = model_cfg.name, model_cfg.weights
    check_model_name(name, task)
    kwargs = builder_kwargs(name, weights)
    report = {"weights": weights, "missing_keys": [], "unexpected_keys": [], "skipped_head_keys": []}

    if weights is None or _is_local(weights):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        heads = replace_head(model, num_classes)
        if weights is not None:
            _load_local(model, weights, heads, model_cfg.load_head, report)
    else:
        enum = resolve_enum(name, weights)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        state = _load_enum_state(enum)
        model.load_state_dict(state)
        report["normalization"] = _enum_normalization(enum)
        heads = replace_head(model, num_classes)
    report["heads"] = heads
    return model, report


def _load_local(model: nn.Module, path: str, heads: list[str], load_head: bool, report: dict) -> None:
    state = load_state_file(path)
    own = model.state_dict()
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    filtered = {}
    for key, value in state.items():
        if is_head(key) and (not load_head or key not in own or own[key].shape != value.shape):
            report["skipped_head_keys"].append(key)
            continue
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"weights file {path}: {key} has shape {tuple(value.shape)} but {type(model).__name__} expects "
                f"{tuple(own[key].shape)}; is model.name the architecture the file was saved from?"
            )
        filtered[key] = value
    result = model.load_state_dict(filtered, strict=False)
    report["missing_keys"] = [k for k in result.missing_keys if not is_head(k)]
    report["unexpected_keys"] = list(result.unexpected_keys)
    matched = len(filtered) - len(result.unexpected_keys)
    if matched == 0:
        raise UserError(
            f"weights file {path} shares no parameter names with {type(model).__name__}; is model.name the architecture it was saved from?"
        )


def _enum_normalization(weights_enum) -> dict | None:
    try:
        t = weights_enum.transforms()
        return {"mean": list(t.mean), "std": list(t.std)}
    except Exception:  # transforms without normalization stats
        return None


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
