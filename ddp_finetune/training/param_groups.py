"""Optimizer parameter groups: backbone / head, weight decay, layer decay.

    model, parts, _ = build_model(cfg.model, num_classes, cfg.task)   # models/
    groups = build_param_groups(model, parts, cfg.optim)
    optimizer = make_optimizer(groups, cfg.optim)
    print0(describe_groups(groups))

The groups are a partition of *all* the model's parameters, frozen ones included, created once
before training (why: freeze.py). Which parameters are the head and which blocks the backbone
has come from `parts` (models/); this module knows no model family.

Each group dict carries, besides what torch reads (`params`, `lr`, `weight_decay`):
`name` (e.g. `backbone`, `head_no_decay`, `backbone.layer4`), `role` (`backbone` or `head`),
`depth` (1 for the backbone block nearest the head, growing towards the input; 0 for the head)
and `base_lr` (the lr the schedules multiply). Torch keeps extra keys in the optimizer's
state_dict, so they survive a resume.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ddp_finetune.config.optimizers import optimizer_class
from ddp_finetune.errors import UserError, first_line
from ddp_finetune.models import Parts

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


def _check_parts(model: nn.Module, parts: Parts) -> None:
    names = [n for n, _ in model.named_parameters()]
    # A prefix may match nothing (googlenet without aux logits has no `aux1.fc2`), but a head
    # that matches no parameter at all would silently train everything at the backbone lr.
    if not any(parts.is_head(n) for n in names):
        tops = ", ".join(n for n, _ in model.named_children())
        raise UserError(
            f"head prefixes {list(parts.head_prefixes)} match no parameter of {type(model).__name__} "
            f"(its top-level modules: {tops}); build the model and its parts with models.build_model"
        )
    backbone = [n for n in names if not parts.is_head(n)]
    if sorted(backbone) != sorted(parts.backbone_names()):
        raise ValueError(f"parts.blocks do not partition the backbone of {type(model).__name__}")


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of normalization parameters and of every bias."""
    ids = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or pname == "bias":
                ids.add(id(p))
    return ids


# --------------------------------------------------------------------------- groups


def build_param_groups(model: nn.Module, parts: Parts, optim_cfg) -> list[dict]:
    """Optimizer groups: a partition of all parameters into backbone and head groups.

    - `head` at `optim.head_lr` (null: `optim.lr`); the backbone at `optim.lr`.
    - `optim.layer_decay`: one group per backbone block (`backbone.<block>`, from
      `parts.blocks`) at `optim.lr x layer_decay^depth`, depth 1 for the block nearest the head.
    - `optim.no_decay_norm_bias` with `optim.weight_decay > 0`: normalization weights and all
      biases move to a `<group>_no_decay` twin with weight decay 0 and the same lr. (With weight
      decay 0 there is nothing to split.)

    Empty groups are left out. Order: backbone groups input-to-output, then the head.
    """
    _check_parts(model, parts)
    named = list(model.named_parameters())  # shared parameters appear once
    names = [n for n, _ in named]
    by_name = dict(named)

    head_lr = optim_cfg.lr if optim_cfg.head_lr is None else optim_cfg.head_lr
    head_names = [n for n in names if parts.is_head(n)]
    # (group name, role, depth, lr, parameter names)
    specs: list[tuple[str, str, int, float, list[str]]] = []
    if optim_cfg.layer_decay is None:
        backbone_names = [n for n in names if not parts.is_head(n)]
        specs.append(("backbone", "backbone", 1, optim_cfg.lr, backbone_names))
    else:
        blocks = parts.blocks
        for i, (block, block_names) in enumerate(blocks):
            depth = len(blocks) - i
            lr = optim_cfg.lr * optim_cfg.layer_decay**depth
            specs.append((f"backbone.{block}", "backbone", depth, lr, list(block_names)))
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
    """Any `torch.optim` optimizer by `optim.name`, with `optim.args` as keyword arguments; lr and weight decay
    come per group. SGD takes `optim.momentum`, optimizers with betas (Adam, AdamW, NAdam, ...) `optim.betas`,
    unless `optim.args` sets them.

    `fused=True`: torch's fused kernels where the optimizer has them (SGD, Adam, AdamW, Adagrad; CPU
    and CUDA), which can skip a step on the device when handed `found_inf` (guards.NonFiniteGuard);
    the others run torch's default implementation (foreach on CUDA) and the guard skips their
    non-finite steps from the host. SGD's momentum buffers then start at zero rather
    than at the first gradient, so a skipped first step leaves no uninitialized buffer behind; with
    dampening 0 the first real step gives the same buffer (0.9 x 0 + g = g).
    """
    cls = optimizer_class(optim_cfg.name)
    accepted = inspect.signature(cls.__init__).parameters
    args = dict(getattr(optim_cfg, "args", None) or {})
    for key in ("params", "lr", "weight_decay"):
        if key in args:
            raise UserError(f"optim.args.{key} is set per group by the package; use optim.{key} instead")
    if optim_cfg.weight_decay > 0 and "weight_decay" not in accepted:
        raise UserError(f"optim.weight_decay={optim_cfg.weight_decay} is not taken by {cls.__name__}; set it to 0")
    kwargs = {"lr": optim_cfg.lr}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = optim_cfg.weight_decay
    if cls is torch.optim.SGD:
        kwargs["momentum"] = optim_cfg.momentum
    if "betas" in accepted:
        kwargs["betas"] = tuple(optim_cfg.betas)
    kwargs.update(args)
    if fused and "fused" in accepted and "fused" not in args:
        kwargs["fused"] = True
    try:
        optimizer = cls(groups, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        shown = {k: v for k, v in kwargs.items() if k != "fused"}
        raise UserError(
            f"optim.name={optim_cfg.name} cannot be built with {shown} ({first_line(exc)}); fix optim.args"
        ) from None
    if getattr(optimizer, "_step_supports_amp_scaling", False) and cls is torch.optim.SGD and kwargs["momentum"]:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # a backbone frozen for the whole run never steps
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def restore_fused(optimizer: torch.optim.Optimizer) -> None:
    """Give a loaded optimizer back the kernels it was built with (call after `load_state_dict`).

    `load_state_dict` takes every group setting from the checkpoint, `fused` included: an fp16 run's
    unfused optimizer, resumed under bf16 or no precision (fused, stepped with the guard's
    `found_inf`), failed at its first step with "Expected grad_scale and found_inf to be None"
    (issue 26 item 2). The constructor's choice is kept in `optimizer.defaults`; this puts it back
    in the groups, moves AdamW's `step` counters where that kernel wants them (fused: float32 on
    the parameter's device; unfused: on the CPU, where reading it costs no host sync), and gives
    fused SGD the zero momentum buffers `make_optimizer` starts it with."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        if "fused" not in group:
            continue
        group["fused"] = fused
        on_device = fused or bool(group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)
            if fused and isinstance(optimizer, torch.optim.SGD) and group["momentum"] and p.requires_grad:
                if optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


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
