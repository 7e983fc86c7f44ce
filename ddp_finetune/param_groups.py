"""Optimizer parameter groups (backbone / head, weight decay, layer decay) and freezing.

    prefixes = head_prefixes(cfg.model.name)             # from models.py
    groups = build_param_groups(model, prefixes, cfg.optim)
    optimizer = make_optimizer(groups, cfg.optim)
    print0(describe_groups(groups))

The groups are a partition of *all* the model's parameters, frozen ones included, and they are
created once, before training. Gradual unfreezing that adds a group later breaks torch schedulers
(the new group is not scheduled), DDP (parameters it did not register) and resume (the saved
optimizer has fewer groups) — PITFALLS, "Gradual unfreezing". Here a frozen backbone keeps its
group; freezing happens on the gradients instead:

- `freeze_backbone` without `unfreeze_at_epoch`: `apply_static_freeze` sets `requires_grad=False`
  on the backbone before the model is wrapped (DDP never sees it, backward skips it: cheapest).
- with `unfreeze_at_epoch`: every parameter keeps `requires_grad=True` (DDP registers them all at
  wrap time), and while `backbone_frozen(epoch, cfg.model)` the loop drops the backbone's grads (`clear_grads`)
  after backward. Optimizers skip parameters whose `.grad` is None, so the backbone weights stay
  bit-identical and no momentum / AdamW state accumulates until the unfreeze epoch.

Each group dict carries, besides what torch reads (`params`, `lr`, `weight_decay`):
`name` (e.g. `backbone`, `head_no_decay`, `backbone.layer4`), `role` (`backbone` or `head`),
`depth` (1 for the backbone block nearest the head, growing towards the input; 0 for the head)
and `base_lr` (the lr the schedules multiply). Torch keeps extra keys in the optimizer's
state_dict, so they survive a resume.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

NO_DECAY_SUFFIX = "_no_decay"

# Modules whose every parameter (scale and shift) is a normalization parameter. `_NormBase` covers
# BatchNorm*, SyncBatchNorm and InstanceNorm*; torchvision's LayerNorm2d subclasses nn.LayerNorm.
_NORM_TYPES = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)

# Containers whose children are the blocks for layer decay (input-to-output order):
# ViT's encoder layers, `features` (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, Swin,
# DenseNet, SqueezeNet), RegNet's `trunk_output`, MaxViT's `blocks`, MNASNet's `layers`, and a
# segmenter's `backbone` (ResNet's layers, MobileNetV3's feature blocks). Checked in this order.
_EXPANDED_CONTAINERS = ("encoder.layers", "features", "trunk_output", "blocks", "layers", "backbone")

# ViT's patch embedding, class token and position embedding form its stem; its final norm is a
# block of its own (it sits inside `encoder`, after the layers).
_VIT_STEM = ("class_token", "conv_proj", "encoder.pos_embedding")
_VIT_FINAL_NORM = "encoder.ln"


# --------------------------------------------------------------------------- names


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP / DataParallel / torch.compile wrappers (their names add a prefix)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_head(name: str, head_prefixes: list[str]) -> bool:
    """Whether parameter `name` belongs to the replaced head."""
    return any(_under(name, p) for p in head_prefixes)


def _check_head_prefixes(names: list[str], head_prefixes: list[str], model: nn.Module) -> None:
    # A prefix may match nothing (googlenet without aux logits has no `aux1.fc2`), but a head
    # that matches no parameter at all would silently train everything at the backbone lr.
    if not any(is_head(n, head_prefixes) for n in names):
        tops = ", ".join(n for n, _ in model.named_children())
        raise UserError(
            f"head prefixes {head_prefixes} match no parameter of {type(model).__name__} "
            f"(its top-level modules: {tops}); models.head_prefixes needs an entry for this model"
        )


def backbone_blocks(model: nn.Module, head_prefixes: list[str]) -> list[tuple[str, list[str]]]:
    """The backbone as (block name, parameter names) in input-to-output order, for layer decay.

    - ResNet / ResNeXt / Wide ResNet: `stem` (conv1, bn1), `layer1` ... `layer4`.
    - `features` models (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, Swin, DenseNet,
      SqueezeNet): each child of `features` (`features.0`, ...), then whatever the model has
      between the features and the head (Swin's `norm`, ConvNeXt's `classifier` LayerNorm,
      MobileNetV3 / VGG's `classifier` hidden layers).
    - ViT: `stem` (conv_proj, class_token, pos_embedding), each `encoder.layers.<layer>`,
      `encoder.ln`.
    - RegNet: `stem`, each `trunk_output.<block>`; MaxViT: `stem`, each `blocks.<i>`;
      MNASNet: each `layers.<i>`.
    - segmenters (DeepLabV3, FCN, LR-ASPP): ResNet backbones `stem`, `backbone.layer1` ...
      `backbone.layer4`; MobileNetV3 backbones each `backbone.<i>`.
    - anything else: its top-level children (GoogLeNet's aux branches `aux1`, `aux2` come after
      `inception5b` there, in registration order).

    Order is the order parameters are registered, which torchvision keeps input-to-output.
    """
    model = unwrap(model)
    names = [n for n, _ in model.named_parameters()]
    _check_head_prefixes(names, head_prefixes, model)
    tops = {n for n, _ in model.named_children()}
    resnet_stem = ("conv1", "bn1") if {"conv1", "bn1", "layer1"} <= tops else ()
    inner = getattr(model, "backbone", None)  # a segmenter's ResNet backbone: its own stem
    if isinstance(inner, nn.Module) and {"conv1", "bn1", "layer1"} <= {n for n, _ in inner.named_children()}:
        resnet_stem = ("backbone.conv1", "backbone.bn1")
    blocks: dict[str, list[str]] = {}
    for name in names:
        if not is_head(name, head_prefixes):
            blocks.setdefault(_block_of(name, resnet_stem), []).append(name)
    return list(blocks.items())


def _block_of(name: str, resnet_stem: tuple[str, ...]) -> str:
    if any(_under(name, p) for p in _VIT_STEM + resnet_stem):
        return "stem"
    if _under(name, _VIT_FINAL_NORM):
        return _VIT_FINAL_NORM
    for container in _EXPANDED_CONTAINERS:
        if name.startswith(container + "."):
            child = name[len(container) + 1 :].split(".")[0]
            return f"{container}.{child}"
    return name.split(".")[0]


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of normalization parameters and of every bias."""
    ids = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or pname == "bias":
                ids.add(id(p))
    return ids


# --------------------------------------------------------------------------- groups


def build_param_groups(model: nn.Module, head_prefixes: list[str], optim_cfg) -> list[dict]:
    """Optimizer groups: a partition of all parameters into backbone and head groups.

    - `head` at `optim.head_lr` (null: `optim.lr`); the backbone at `optim.lr`.
    - `optim.layer_decay`: one group per backbone block (`backbone.<block>`, see
      `backbone_blocks`) at `optim.lr x layer_decay^depth`, depth 1 for the block nearest the head.
    - `optim.no_decay_norm_bias` with `optim.weight_decay > 0`: normalization weights and all
      biases move to a `<group>_no_decay` twin with weight decay 0 and the same lr. (With weight
      decay 0 there is nothing to split.)

    Empty groups are left out. Order: backbone groups input-to-output, then the head.
    """
    model = unwrap(model)
    named = list(model.named_parameters())  # shared parameters appear once
    names = [n for n, _ in named]
    by_name = dict(named)
    _check_head_prefixes(names, head_prefixes, model)

    head_lr = optim_cfg.lr if optim_cfg.head_lr is None else optim_cfg.head_lr
    head_names = [n for n in names if is_head(n, head_prefixes)]
    # (group name, role, depth, lr, parameter names)
    specs: list[tuple[str, str, int, float, list[str]]] = []
    if optim_cfg.layer_decay is None:
        backbone_names = [n for n in names if not is_head(n, head_prefixes)]
        specs.append(("backbone", "backbone", 1, optim_cfg.lr, backbone_names))
    else:
        blocks = backbone_blocks(model, head_prefixes)
        for i, (block, block_names) in enumerate(blocks):
            depth = len(blocks) - i
            lr = optim_cfg.lr * optim_cfg.layer_decay**depth
            specs.append((f"backbone.{block}", "backbone", depth, lr, block_names))
    specs.append(("head", "head", 0, head_lr, head_names))

    split = optim_cfg.no_decay_norm_bias and optim_cfg.weight_decay > 0
    no_decay = _no_decay_ids(model) if split else set()
    groups = []
    for name, role, depth, lr, members in specs:
        decay = [by_name[n] for n in members if id(by_name[n]) not in no_decay]
        plain = [by_name[n] for n in members if id(by_name[n]) in no_decay]
        for suffix, params, wd in (("", decay, optim_cfg.weight_decay), (NO_DECAY_SUFFIX, plain, 0.0)):
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lr,
                        "base_lr": lr,
                        "weight_decay": wd,
                        "name": name + suffix,
                        "role": role,
                        "depth": depth,
                    }
                )
    return groups


def make_optimizer(groups: list[dict], optim_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (with `optim.momentum`) or AdamW (with `optim.betas`); lr and weight decay come per group.

    `fused=True`: torch's fused kernels (CPU and CUDA), which can skip a step on the device when
    handed `found_inf` (guards.NonFiniteGuard). SGD's momentum buffers then start at zero rather
    than at the first gradient, so a skipped first step leaves no uninitialized buffer behind; with
    dampening 0 the first real step gives the same buffer (0.9 x 0 + g = g).
    """
    if optim_cfg.name == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay, fused=fused
        )
        if fused and optim_cfg.momentum:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad:  # a backbone frozen for the whole run never steps
                        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return optimizer
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay, fused=fused
        )
    raise UserError(f"optim.name={optim_cfg.name!r} is not one of sgd, adamw")


def lr_log(optimizer: torch.optim.Optimizer, per_block: bool = False) -> dict[str, float]:
    """Current learning rates to log: `lr/head` and `lr/backbone`.

    With layer decay, `lr/backbone` is the lr of the backbone block nearest the head (depth 1,
    e.g. ResNet's `layer4`), the largest backbone lr. `per_block=True` adds `lr/<group name>`
    for every group (no-decay twins merged: they share the lr).
    """
    groups = optimizer.param_groups
    out: dict[str, float] = {}
    head = [g for g in groups if g.get("role") == "head"]
    backbone = [g for g in groups if g.get("role") == "backbone"]
    if head:
        out["lr/head"] = float(head[0]["lr"])
    if backbone:
        out["lr/backbone"] = float(min(backbone, key=lambda g: g.get("depth", 1))["lr"])
    if per_block or not (head or backbone):
        for i, g in enumerate(groups):
            name = str(g.get("name", f"group{i}")).removesuffix(NO_DECAY_SUFFIX)
            out.setdefault(f"lr/{name}", float(g["lr"]))
    return out


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, parameter count, lr, weight decay (printed at start)."""
    lines = [f"parameter groups ({len(groups)}):"]
    width = max((len(str(g.get("name", ""))) for g in groups), default=0)
    for i, g in enumerate(groups):
        count = sum(p.numel() for p in g["params"])
        frozen = " (frozen)" if g["params"] and not any(p.requires_grad for p in g["params"]) else ""
        name = str(g.get("name", f"group{i}"))
        lines.append(
            f"  {name:<{width}}  {count:>12,} params  lr {g['lr']:.4g}  weight_decay {g['weight_decay']:.4g}{frozen}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- freezing


def uses_static_freeze(model_cfg) -> bool:
    """`freeze_backbone` for the whole run: freeze with requires_grad=False before wrapping."""
    return bool(model_cfg.freeze_backbone) and model_cfg.unfreeze_at_epoch is None


def backbone_frozen(epoch: int, model_cfg) -> bool:
    """Whether the backbone is frozen during `epoch` (0-based)."""
    if not model_cfg.freeze_backbone:
        return False
    return model_cfg.unfreeze_at_epoch is None or epoch < model_cfg.unfreeze_at_epoch


def backbone_params(model: nn.Module, head_prefixes: list[str]) -> list[nn.Parameter]:
    """Every parameter outside the head, in registration order (the loop lists them once)."""
    return [p for name, p in unwrap(model).named_parameters() if not is_head(name, head_prefixes)]


def apply_static_freeze(model: nn.Module, head_prefixes: list[str]) -> int:
    """requires_grad=False on every backbone parameter; call before wrapping. Returns how many."""
    params = backbone_params(model, head_prefixes)
    for p in params:
        p.requires_grad_(False)
    return len(params)


def clear_grads(params: list[nn.Parameter]) -> int:
    """Set `.grad = None` on these parameters. Returns how many had a gradient."""
    dropped = 0
    for p in params:
        if p.grad is not None:
            p.grad = None
            dropped += 1
    return dropped


def drop_frozen_grads(model: nn.Module, head_prefixes: list[str]) -> int:
    """Set `.grad = None` on every backbone parameter. Returns how many had a gradient.

    Call after backward and before gradient clipping / `optimizer.step()` while
    `backbone_frozen(epoch, ...)` (the loop does `clear_grads` on `backbone_params` listed once).
    Optimizers skip parameters without a gradient, so the backbone weights and optimizer state do
    not change, and clipping measures the head's gradient only.
    (BatchNorm running statistics still update in train mode; `set_bn_eval` stops that.)
    """
    return clear_grads(backbone_params(model, head_prefixes))


def set_bn_eval(model: nn.Module, head_prefixes: list[str] | None = None) -> int:
    """Put BatchNorm layers in eval mode (fixed running statistics); call after each `model.train()`.

    `head_prefixes=None`: every BatchNorm (`model.freeze_bn`). Given the head's prefixes: only the
    backbone's BatchNorms (a frozen backbone), so the BatchNorms inside a trained head (DeepLabV3's
    ASPP, FCN's head, LR-ASPP's `cbr`) keep learning their statistics.
    Returns how many layers were switched. Only BatchNorm: LayerNorm / GroupNorm have no
    running statistics, and dropout must stay in train mode.
    """
    count = 0
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if head_prefixes is not None and is_head(name, head_prefixes):
                continue
            module.eval()
            count += 1
    return count
