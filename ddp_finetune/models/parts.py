"""What the rest of the package knows about a model: its `Parts`, and what loading its weights did.

`build_model` returns both; the family files (`torchvision_families.py`, `timm_models.py`) fill
them in, and nothing outside `models/` looks at a model's module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Block = tuple[str, tuple[str, ...]]  # (block name, its parameter names)


def under(name: str, prefix: str) -> bool:
    """Whether module or parameter `name` is `prefix` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Parts:
    """A built model's parts, by parameter / module name of the bare (unwrapped) model.

    The parameters are a partition: every parameter is either under a head prefix or in
    exactly one backbone block.
    """

    head_prefixes: tuple[str, ...]
    """Modules whose parameters form the head group (`optim.head_lr`), main head first."""
    head_layers: tuple[str, ...]
    """The layers `build_model` replaced with fresh ones for the new classes (inside the head)."""
    blocks: tuple[Block, ...]
    """The backbone as (block name, parameter names), input to output, for `optim.layer_decay`."""
    aux_weight: float = 0.0
    """Weight of each auxiliary output's loss (GoogLeNet, Inception, DeepLabV3, FCN); 0 when none."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Normalization mean the weights expect (ImageNet's unless the weights say otherwise)."""
    std: tuple[float, ...] = IMAGENET_STD
    """Normalization std the weights expect."""
    input_size: int | None = None
    """Image side the weights were trained at (timm's `pretrained_cfg`, torchvision's crop size); None: unknown."""
    crop_pct: float = 0.875
    """Evaluation: the centre crop's fraction of the resized image (timm's `pretrained_cfg`; torchvision's 0.875)."""
    interpolation: str = "bilinear"
    """Evaluation: the resize's interpolation (`bilinear`, `bicubic`, ...; timm's `pretrained_cfg`)."""

    def is_head(self, name: str) -> bool:
        """Whether parameter or module `name` belongs to the head."""
        return any(under(name, p) for p in self.head_prefixes)

    def backbone_names(self) -> list[str]:
        return [n for _, names in self.blocks for n in names]


@dataclass
class LoadReport:
    """What `build_model` loaded into the model (printed at the start of a run)."""

    weights: str | None = None
    """`model.weights` as asked: None (random init), a weights name, or a file."""
    source: str | None = None
    """Where the weights came from (file path, cache path, or Hugging Face Hub repo)."""
    missing_keys: list[str] = field(default_factory=list)
    """Backbone entries the weights did not have (they keep their random init)."""
    unexpected_keys: list[str] = field(default_factory=list)
    """Entries of the weights the model does not have (ignored)."""
    skipped_head_keys: list[str] = field(default_factory=list)
    """Head entries of the weights left out: the new head starts fresh for the new classes."""
    heads: list[str] = field(default_factory=list)
    """The layers replaced for the new classes (`Parts.head_layers`)."""

    def describe(self) -> str | None:
        """One line for the start of a run; None without weights."""
        if not self.weights:
            return None
        msg = f"weights: {self.weights}; new head {', '.join(self.heads)}"
        if self.missing_keys:
            msg += f"; missing {len(self.missing_keys)} keys (e.g. {self.missing_keys[0]})"
        if self.unexpected_keys:
            msg += f"; unexpected {len(self.unexpected_keys)} keys (e.g. {self.unexpected_keys[0]})"
        if self.skipped_head_keys:
            msg += f"; head keys not loaded: {', '.join(self.skipped_head_keys)}"
        return msg


def split_blocks(
    model: nn.Module,
    head_prefixes: tuple[str, ...],
    stem: tuple[str, ...] = (),
    containers: tuple[str, ...] = (),
    own: tuple[str, ...] = (),
) -> tuple[Block, ...]:
    """The backbone's parameters (everything outside the head) grouped into blocks.

    A parameter's block is, by the first rule that matches: `stem` when under one of `stem`;
    the module itself when under one of `own`; `<container>.<child>` when inside one of
    `containers` (checked in order); else its top-level module. Blocks come in registration
    order, which is input-to-output in torchvision and timm.
    """
    blocks: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():  # shared parameters appear once
        if any(under(name, h) for h in head_prefixes):
            continue
        blocks.setdefault(_block_of(name, stem, containers, own), []).append(name)
    return tuple((block, tuple(names)) for block, names in blocks.items())


def _block_of(name: str, stem: tuple[str, ...], containers: tuple[str, ...], own: tuple[str, ...]) -> str:
    if any(under(name, p) for p in stem):
        return "stem"
    for prefix in own:
        if under(name, prefix):
            return prefix
    for container in containers:
        if name.startswith(container + "."):
            child = name[len(container) + 1 :].split(".")[0]
            return f"{container}.{child}"
    return name.split(".")[0]


def generic_parts(model: nn.Module, head_prefixes: list[str] | tuple[str, ...]) -> Parts:
    """Parts of any `nn.Module` given its head: the backbone blocks are its top-level children.

    For a model built outside `build_model` (a custom module, a test's toy model).
    """
    heads = tuple(head_prefixes)
    return Parts(head_prefixes=heads, head_layers=heads, blocks=split_blocks(model, heads))
