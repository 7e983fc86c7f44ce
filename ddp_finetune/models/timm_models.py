"""timm models (`model.name: timm/<name>`, `pip install 'ddp-finetune[timm]'`): everything the package
knows about them, read from the model itself as timm's own training script does.

- the head: replaced with `model.reset_classifier(num_classes)`; its module names (the head
  group) from `pretrained_cfg["classifier"]`;
- the backbone blocks for layer decay: `model.group_matcher(coarse=False)` (timm's own layer
  decay grouping), input to output;
- normalization and the native image side: `pretrained_cfg` (`mean`, `std`, `input_size`);
  models with a fixed input size (ViT, Swin, ...) are set to `data.image_size` with
  `model.set_input_size`, which resamples position embeddings;
- `model.weights`: null (random init), `DEFAULT` (the pretrained tag of the name, e.g.
  `timm/resnet18.a1_in1k`, from the local Hugging Face cache or downloaded into it) or a local
  `.safetensors` / `.pth` file.
"""

from __future__ import annotations

import difflib
import os
import re

import torch
from torch import nn

from ddp_finetune.errors import UserError
from ddp_finetune.models import weights as W
from ddp_finetune.models.parts import IMAGENET_MEAN, IMAGENET_STD, Block, LoadReport, Parts, split_blocks, under

PREFIX = "timm/"
THIS_FILE = "ddp_finetune/models/timm_models.py"
_INSTALL = "install it with pip install 'ddp-finetune[timm]'"


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(f"model.name=timm/... needs timm; {_INSTALL}") from None
    return timm


def check_model_name(name: str, task: str | None = None) -> None:
    """`name` without `timm/`: any `timm.list_models()` name, optionally with a pretrained tag."""
    if task == "segmentation":
        raise UserError(
            f"model.name={PREFIX}{name} is a classifier; task=segmentation takes a torchvision segmenter "
            "(torchvision.models.list_models(torchvision.models.segmentation))"
        )
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise UserError(
            f"model.name={PREFIX}{name} is not a timm model{hint}; "
            "list them with: python -c 'import timm; print(timm.list_models(\"*resnet*\"))'"
        )
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        arch = name.split(".")[0]
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise UserError(f"model.name={PREFIX}{name}: {arch} has no such pretrained tag (tags: {tags})") from None


def build(
    name: str,
    weights: str | None,
    num_classes: int,
    load_head: bool,
    meta: bool,
    image_size: int | None,
    drop_path_rate: float | None = None,
    grad_checkpointing: bool = False,
):
    """(model, Parts, LoadReport) of timm model `name`; `meta`: the architecture only, no weights.

    `drop_path_rate` (null: the model's default) goes to `timm.create_model`; `grad_checkpointing`
    turns on timm's own switch (`set_grad_checkpointing`)."""
    timm = _timm()
    if weights is not None and weights != "DEFAULT" and not W.is_local(weights):
        raise UserError(
            f"model.weights={weights!r} for a timm model: use null, DEFAULT (the pretrained tag of model.name, "
            "e.g. timm/resnet18.a1_in1k) or a local .safetensors/.pth file"
        )
    report = LoadReport(weights=weights)
    kwargs = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    try:
        if weights == "DEFAULT" and not meta:
            model = _pretrained(timm, name, report, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:  # a model without stochastic depth
        if drop_path_rate is None:
            raise
        raise UserError(
            f"model.drop_path_rate={drop_path_rate}: {PREFIX}{name} does not take it ({W.first_line(exc)}); "
            "set model.drop_path_rate=null"
        ) from None
    if grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as exc:
            raise UserError(
                f"model.grad_checkpointing=true: {PREFIX}{name} has no gradient checkpointing in timm "
                f"({W.first_line(exc) or type(exc).__name__}); set it to false"
            ) from None
    cfg = dict(model.pretrained_cfg)  # read before set_input_size, which may change it
    heads = _head_names(model, cfg, name)
    state = W.load_state_file(weights) if weights not in (None, "DEFAULT") and not meta else None
    # a file saved at the native image size loads before resizing (which resamples it), one saved
    # at data.image_size (e.g. by a run of this package) after
    native_first = state is not None and _fits(model, state, heads)
    if native_first:
        model.reset_classifier(num_classes)
        W.load_local(model, state, weights, heads, load_head, report)
    _set_input_size(model, cfg, name, image_size)
    if not native_first:
        model.reset_classifier(num_classes)
        if state is not None:
            W.load_local(model, state, weights, heads, load_head, report)
    _check_heads(model, heads, name)
    report.heads = list(heads)
    parts = Parts(
        head_prefixes=heads,
        head_layers=heads,
        blocks=_blocks(model, heads),
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
        input_size=int(cfg["input_size"][-1]) if cfg.get("input_size") else None,
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        interpolation=_interpolation(cfg.get("interpolation")),
    )
    return model, parts, report


def _interpolation(name) -> str:
    """timm's `pretrained_cfg["interpolation"]` as a torchvision InterpolationMode value (bilinear when unknown)."""
    known = ("nearest", "bilinear", "bicubic")
    return name if name in known else "bilinear"


# --------------------------------------------------------------------------- head, blocks, size


def _head_names(model: nn.Module, cfg: dict, name: str) -> tuple[str, ...]:
    """The classifier's module names: `pretrained_cfg["classifier"]` (a name or a tuple of names)."""
    classifier = cfg.get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    if not heads:  # no pretrained config: find get_classifier()'s module by identity
        target = model.get_classifier()
        heads = tuple(n for n, m in model.named_modules() if m is target)
    if not heads:
        raise UserError(f"model.name={PREFIX}{name}: found no classifier module; {THIS_FILE} cannot handle it")
    return heads


def _check_heads(model: nn.Module, heads: tuple[str, ...], name: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    missing = [h for h in heads if not any(under(n, h) for n in names)]
    if missing:
        raise UserError(
            f"model.name={PREFIX}{name}: its classifier {missing} has no parameters after reset_classifier; "
            f"{THIS_FILE} cannot handle it"
        )


def _blocks(model: nn.Module, heads: tuple[str, ...]) -> tuple[Block, ...]:
    """Backbone blocks from timm's `group_matcher(coarse=False)`, in timm's input-to-output order
    (the groups of its own layer decay); models without one: their top-level children."""
    if not hasattr(model, "group_matcher"):
        return split_blocks(model, heads)
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=False)
    unit = _unit_namer(matcher)
    blocks: dict[str, tuple[str, ...]] = {}
    for i, names in sorted(group_parameters(model, matcher).items()):
        names = tuple(n for n in names if not any(under(n, h) for h in heads))
        if names:
            block = "+".join(dict.fromkeys(unit(n) for n in names))
            blocks[f"{block}#{i}" if block in blocks else block] = names
    return tuple(blocks.items())


def _unit_namer(matcher):
    """Parameter name -> the unit timm's matcher groups it by: the text its pattern matched
    (`layer1.0`, `blocks.11`, `stages.1.downsample`, `norm`), `stem` for the stem; its module
    for anything unmatched (a neck such as `head.norm`) or a callable matcher."""
    patterns: list[tuple[str, re.Pattern]] = []
    if isinstance(matcher, dict):
        for key, spec in matcher.items():
            specs = [spec] if isinstance(spec, str) else [s[0] for s in spec or ()]
            patterns += [(key, re.compile(p)) for p in specs]

    def unit(name: str) -> str:
        for key, pattern in patterns:
            found = pattern.match(name)
            if found:
                return "stem" if key == "stem" else found.group(0)
        return name.rpartition(".")[0] or name

    return unit


def _fits(model: nn.Module, state: dict, heads: tuple[str, ...]) -> bool:
    """Whether every backbone entry of `state` the model has fits its shape."""
    own = model.state_dict()
    return all(own[k].shape == v.shape for k, v in state.items() if k in own and not any(under(k, h) for h in heads))


def _set_input_size(model: nn.Module, cfg: dict, name: str, image_size: int | None) -> None:
    native = cfg.get("input_size", (3, None, None))[-1]
    if image_size is None or image_size == native:
        return
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(image_size, image_size))
    elif cfg.get("fixed_input_size"):
        raise UserError(f"model.name={PREFIX}{name} takes {native}px images only; set data.image_size={native}")


# --------------------------------------------------------------------------- pretrained weights


def _pretrained(timm, name: str, report: LoadReport, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained=True)` (timm adapts the checkpoint to the model), with
    a one-line error naming the repository and where the file must go when it is not there."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    url = cfg.url if cfg is not None else None
    if not repo and not url:
        raise UserError(
            f"model.name={PREFIX}{name} has no pretrained weights in timm (tagged ones: "
            f"python -c 'import timm; print(timm.list_pretrained(\"{name.split('.')[0]}.*\"))'); "
            "use model.weights=null or a local file"
        )
    if repo:
        where, advice = _hub_advice(repo, cfg.hf_hub_filename)
        if _offline_without_file(repo, cfg.hf_hub_filename):
            raise UserError(
                f"model.weights=DEFAULT: the weights of {PREFIX}{name} ({where}) are not in the local cache "
                f"and HF_HUB_OFFLINE is set; {advice}, or use model.weights=null"
            )
    else:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        where, advice = url, f"put {url} at {path} (or set TORCH_HOME to where it is cached)"
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except TypeError:
        raise
    except Exception as exc:  # no network, HTTP error, truncated file ...
        raise UserError(
            f"model.weights=DEFAULT: could not load the weights of {PREFIX}{name} from {where} ({W.first_line(exc)}); "
            f"{advice}, or use model.weights=null"
        ) from None
    report.source = f"hf-hub:{repo}" if repo else url
    return model


def _offline_without_file(repo: str, filename: str | None) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    files = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]  # what timm looks for
    cached = [try_to_load_from_cache(repo_id, f, revision=revision or None) for f in files]
    return constants.HF_HUB_OFFLINE and not any(isinstance(c, str) for c in cached)


def _hub_advice(repo: str, filename: str | None) -> tuple[str, str]:
    """(the repository, how to get its file into the Hugging Face cache or use it directly)."""
    from huggingface_hub import constants

    file = filename or "model.safetensors"
    repo_id, _, revision = repo.partition("@")
    cache = constants.HF_HUB_CACHE
    url = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{file}"
    advice = (
        f"with network, fill the Hugging Face cache {cache} (HF_HUB_CACHE) with: huggingface-cli download {repo_id} {file}; "
        f"or download {url} and set model.weights to that file"
    )
    return f"the Hugging Face Hub repo {repo_id}", advice
