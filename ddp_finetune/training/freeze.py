"""What trains when: frozen parameters (`model.freeze`, `model.freeze_blocks`, `model.freeze_backbone`),
gradual unfreezing (`model.unfreeze_at_epoch`, `model.unfreeze_every`) and BatchNorm statistics
(`model.freeze_bn`): one plan, and one policy object that acts at a few named moments of the run.

    plan = plan_freeze(cfg.model, parts, model, cfg.train.epochs)   # pure: names -> epoch they train from
    print(plan.table())                                             # what trains, per block
    freeze = BackboneFreeze(cfg.model, parts, model, epochs)
    freeze.before_wrap(model)                 # before accelerator.prepare / DDP
    ...
    freeze.start_epoch(model, epoch)          # model.train(), then the frozen BatchNorms to eval
    loss.backward()
    if accelerator.sync_gradients:
        freeze.after_backward(epoch)          # before clipping and optimizer.step()

The plan gives every parameter the epoch it trains from: 0 (not frozen), an epoch (frozen until
then), or None (frozen for the whole run). It is made per unit: the model's own blocks (`Parts.blocks`,
the ones `optim.layer_decay` counts; `stem` first where the family has one) and the head.
`unfreeze_at_epoch: E` unfreezes everything frozen at E; `unfreeze_every: N` unfreezes one frozen
unit more every N epochs from the head down (ULMFiT), the first at E (or at N without E).

Why the optimizer groups exist from step 0: gradual unfreezing that adds a group later breaks
torch schedulers (the new group is not scheduled), DDP (parameters it did not register) and
resume (the saved optimizer has fewer groups) — docs/pitfalls.md, "Gradual unfreezing". Here frozen
parameters keep their groups (param_groups.py); freezing happens on the gradients instead:

- frozen for the whole run: `before_wrap` sets `requires_grad=False` before the model is wrapped
  (DDP never sees them, backward skips them: cheapest).
- frozen until an epoch: they keep `requires_grad=True` (DDP registers them all at wrap time),
  and until their epoch `after_backward` drops their grads. Optimizers skip parameters whose
  `.grad` is None, so the weights stay bit-identical (no weight decay either) and no momentum /
  AdamW state accumulates until they unfreeze; clipping measures the trained gradients only.
  The unfreeze epoch is a function of the epoch alone, so a resume across it is exact.

A frozen module is frozen entirely: the BatchNorms whose parameters are all frozen keep their
running statistics (eval mode) while frozen, while the BatchNorms of trained modules (a
segmenter's head: DeepLabV3's ASPP, LR-ASPP's `cbr`) keep learning theirs. `model.freeze_bn`
fixes every BatchNorm, the whole run.

The policy lists the parameters and BatchNorms once, on the bare model. Moving a model to a
device and wrapping it (DDP, torch.compile) keep its parameter and module objects — the
optimizer, built before wrapping, relies on the same — so the objects listed are the ones the
wrapped model trains, and no wrapper's name prefix matters.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from torch import nn

from ddp_finetune.errors import UserError
from ddp_finetune.models import Parts
from ddp_finetune.models.parts import under

HEAD_UNIT = "head"


@dataclass(frozen=True)
class Unit:
    """A block of the model (or its head) and when its frozen parameters train."""

    name: str
    params: tuple[str, ...]
    """All the unit's parameter names."""
    frozen: tuple[str, ...]
    """The ones frozen at the start."""
    count: int
    """Number of parameter elements in the unit."""
    frozen_count: int
    """Of which frozen at the start."""
    trains_from: int | None
    """Epoch from which the frozen ones train (None: never; 0 when nothing is frozen)."""


@dataclass(frozen=True)
class FreezePlan:
    """Per unit (blocks input to output, then the head): what is frozen, and until when."""

    units: tuple[Unit, ...]
    epochs: int

    def trains_from(self) -> dict[str, int | None]:
        """Parameter name -> the epoch it trains from (0: from the start; None: never)."""
        out: dict[str, int | None] = {}
        for unit in self.units:
            frozen = set(unit.frozen)
            for name in unit.params:
                out[name] = unit.trains_from if name in frozen else 0
        return out

    @property
    def any_frozen(self) -> bool:
        return any(u.frozen for u in self.units)

    def unfreezes(self) -> list[tuple[int, list[str]]]:
        """(epoch, the units that start training then), in order, for epochs within the run."""
        by_epoch: dict[int, list[str]] = {}
        for u in self.units:
            if u.frozen and u.trains_from is not None:
                by_epoch.setdefault(u.trains_from, []).append(u.name)
        return sorted(by_epoch.items())

    def describe(self) -> str:
        """The start-up lines: the table when anything is frozen, else one line."""
        if self.any_frozen:
            return self.table()
        return f"what trains: every parameter ({sum(u.count for u in self.units):,}) from epoch 0"

    def table(self) -> str:
        """What trains: one line per unit with its parameter count, frozen part and first epoch."""
        width = max([len(u.name) for u in self.units] + [5])
        lines = [f"what trains ({len(self.units)} units, input to output; epochs 0..{self.epochs - 1}):"]
        lines.append(f"  {'block':<{width}}  {'params':>12}  {'status':<26}  trains from")
        for u in self.units:
            if not u.frozen:
                status, start = "trains", "epoch 0"
            else:
                status = "frozen" if u.frozen_count == u.count else f"partly frozen ({u.frozen_count:,} of {u.count:,})"
                if u.trains_from is None:
                    start = "never (frozen all run)"
                else:
                    start = f"epoch {u.trains_from}"
            lines.append(f"  {u.name:<{width}}  {u.count:>12,}  {status:<26}  {start}")
        total = sum(u.count for u in self.units)
        trained = sum(u.count - u.frozen_count for u in self.units)
        lines.append(f"  {'total':<{width}}  {total:>12,}  trainable from epoch 0: {trained:,}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the plan


def _matches(name: str, pattern: str) -> bool:
    """A glob on the parameter name (`layer1.*`), or a module / parameter name it is under (`layer1`)."""
    return fnmatch.fnmatchcase(name, pattern) or under(name, pattern)


def _closest(pattern: str, names: list[str]) -> list[str]:
    """The parameter or module names most like `pattern` (its glob characters ignored)."""
    modules = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    candidates = sorted(set(names) | modules)
    bare = pattern.replace("*", "").replace("?", "").strip(".")
    close = difflib.get_close_matches(bare, candidates, n=3, cutoff=0.3)
    return close or candidates[:3]


def _frozen_names(model_cfg, parts: Parts, names: list[str]) -> set[str]:
    """The parameters frozen at the start: the union of `freeze_backbone`, `freeze` and `freeze_blocks`."""
    frozen: set[str] = set()
    patterns = model_cfg.freeze
    if model_cfg.freeze_backbone or patterns == "backbone":
        frozen |= {n for n in names if not parts.is_head(n)}
    if isinstance(patterns, list):
        for pattern in patterns:
            hits = {n for n in names if _matches(n, pattern)}
            if not hits:
                raise UserError(
                    f"model.freeze pattern {pattern!r} matches no parameter; closest names: "
                    f"{', '.join(_closest(pattern, names))} (patterns are globs on parameter names, e.g. 'layer1.*', "
                    "or module names, e.g. 'layer1')"
                )
            frozen |= hits
    k = model_cfg.freeze_blocks
    if k is not None:
        blocks = list(parts.blocks)
        stem = blocks[:1] if blocks and blocks[0][0] == "stem" else []
        rest = blocks[len(stem) :]
        if k > len(rest):
            shown = ", ".join(b for b, _ in rest[:6]) + (", ..." if len(rest) > 6 else "")
            raise UserError(
                f"model.freeze_blocks={k} but the model has {len(rest)} blocks after its stem ({shown}); "
                f"use 0..{len(rest)} or model.freeze=backbone"
            )
        for _, block_names in stem + rest[:k]:
            frozen |= set(block_names)
    return frozen


def plan_freeze(model_cfg, parts: Parts, model: nn.Module, epochs: int) -> FreezePlan:
    """Every parameter's first training epoch, per unit (works on a `meta` model: names and sizes only)."""
    named = list(model.named_parameters())  # shared parameters appear once
    names = [n for n, _ in named]
    sizes = {n: p.numel() for n, p in named}
    frozen = _frozen_names(model_cfg, parts, names) if model_cfg.freezes_anything() else set()
    head = tuple(n for n in names if parts.is_head(n))
    members = [(block, tuple(block_names)) for block, block_names in parts.blocks] + [(HEAD_UNIT, head)]
    members = [(u, ns) for u, ns in members if ns]
    # the frozen units from the head down: each unfreezes at its own epoch under unfreeze_every
    e, every = model_cfg.unfreeze_at_epoch, model_cfg.unfreeze_every
    head_down = [u for u, ns in reversed(members) if frozen.intersection(ns)]
    if every:
        first = e if e is not None else every
        starts = {u: first + i * every for i, u in enumerate(head_down)}
    else:
        starts = dict.fromkeys(head_down, e)
    # a unit whose turn comes after the last epoch is frozen for the whole run (requires_grad=False: cheaper)
    starts = {u: None if s is None or s >= epochs else s for u, s in starts.items()}
    units = []
    for unit, unit_names in members:
        unit_frozen = tuple(n for n in unit_names if n in frozen)
        units.append(
            Unit(
                name=unit,
                params=unit_names,
                frozen=unit_frozen,
                count=sum(sizes[n] for n in unit_names),
                frozen_count=sum(sizes[n] for n in unit_frozen),
                trains_from=starts.get(unit) if unit_frozen else 0,
            )
        )
    if all(u.trains_from is None and u.frozen_count == u.count for u in units):
        raise UserError(
            "model.freeze / freeze_blocks / freeze_backbone freeze every parameter for the whole run, so nothing "
            "would train; leave the head (or more) out of model.freeze, or unfreeze within train.epochs"
        )
    return FreezePlan(units=tuple(units), epochs=epochs)


# --------------------------------------------------------------------------- the policy


class BackboneFreeze:
    """When parameters and BatchNorm statistics are frozen, and the few things that does."""

    def __init__(self, model_cfg, parts: Parts, model: nn.Module | None = None, epochs: int | None = None):
        self.model_cfg = model_cfg
        self.freeze_bn: bool = bool(model_cfg.freeze_bn)
        self.parts = parts
        self.epochs = epochs
        self.plan: FreezePlan | None = None
        self._starts: dict[str, int | None] = {}
        self._until: list[tuple[nn.Parameter, int]] = []  # frozen until an epoch: (param, epoch), by before_wrap
        self._bn: list[tuple[nn.Module, int | None]] = []  # every BatchNorm and the epoch its statistics train from
        if model is not None:
            self._make_plan(model)

    def _make_plan(self, model: nn.Module) -> None:
        epochs = self.epochs if self.epochs is not None else 1 << 30
        self.plan = plan_freeze(self.model_cfg, self.parts, model, epochs)
        self._starts = self.plan.trains_from()

    @property
    def whole_run(self) -> bool:
        """Everything frozen stays frozen for the whole run: `requires_grad=False` before wrapping."""
        return self._need_plan().any_frozen and all(s in (0, None) for s in self._starts.values())

    def _need_plan(self) -> FreezePlan:
        if self.plan is None:
            raise RuntimeError("BackboneFreeze needs the model: pass it, or call before_wrap first")
        return self.plan

    def frozen(self, epoch: int) -> bool:
        """Whether any parameter is frozen during `epoch` (0-based)."""
        self._need_plan()
        return any(s is None or s > epoch for s in self._starts.values())

    def before_wrap(self, model: nn.Module) -> int:
        """List the frozen parameters and the BatchNorms on the bare model; those frozen for the whole
        run get `requires_grad=False`. Returns how many parameters that was."""
        if self.plan is None:
            self._make_plan(model)
        starts = self._starts
        never = 0
        self._until = []
        for name, p in model.named_parameters():
            start = starts[name]
            if start is None:
                p.requires_grad_(False)
                never += 1
            elif start > 0:
                self._until.append((p, start))
        self._bn = []
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._bn.append((module, _module_start(name, module, starts)))
        return never

    def start_epoch(self, model: nn.Module, epoch: int) -> int:
        """`model.train()` for `epoch`, then BatchNorms with fixed statistics back to eval mode:
        all with `freeze_bn`, else those of frozen modules while frozen. Returns how many.

        Only BatchNorm: LayerNorm / GroupNorm have no running statistics, and dropout must stay
        in train mode.
        """
        model.train()
        fixed = [m for m, start in self._bn if self.freeze_bn or start is None or start > epoch]
        for module in fixed:
            module.eval()
        return len(fixed)

    def after_backward(self, epoch: int) -> int:
        """Frozen until a later epoch: `.grad = None`. Call when the gradients are synchronized,
        before clipping and `optimizer.step()`. Returns how many had one."""
        dropped = 0
        for p, start in self._until:
            if start > epoch and p.grad is not None:
                p.grad = None
                dropped += 1
        return dropped


def _module_start(name: str, module: nn.Module, starts: dict[str, int | None]) -> int | None:
    """The epoch a module's statistics train from: when the first of its parameters does (a module
    is frozen while all its parameters are; a BatchNorm without affine parameters follows the
    module around it)."""
    own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
    if not own:
        parent = name.rpartition(".")[0]
        own = [n for n in starts if parent and under(n, parent)]
    values = [starts[n] for n in own if n in starts]
    if not values:
        return 0
    trained = [v for v in values if v is not None]
    return min(trained) if trained else None
