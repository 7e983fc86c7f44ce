"""Loading weights into a built model: torchvision weights by name, or a local state-dict file.

torchvision weights are downloaded once into `$TORCH_HOME/hub/checkpoints`; a local `.pth` /
`.safetensors` file is loaded without its head (unless `model.load_head`). Every failure is a
`UserError` that names the file and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ddp_finetune.errors import UserError, first_line
from ddp_finetune.models.parts import LoadReport, under

LOCAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def is_local(weights: str) -> bool:
    """Whether `model.weights` names a file rather than a weights name."""
    return weights.lower().endswith(LOCAL_SUFFIXES) or os.sep in weights or weights.startswith(".")


# --------------------------------------------------------------------------- torchvision weights


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


def _enum_state(weights_enum) -> dict:
    path = cached_weights_path(weights_enum)
    if not path.exists():
        try:
            return weights_enum.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # no network, proxy, HTTP error ...
            raise UserError(
                f"could not download {weights_enum} ({first_line(exc)}); put {weights_enum.url} at {path} "
                "(or set TORCH_HOME to where it is cached), or use model.weights=null or a local file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cached weights file {path} is corrupt or incomplete ({first_line(exc)}); delete it and run again to re-download"
        ) from None


def load_enum(model: nn.Module, weights_enum, report: LoadReport) -> None:
    """The whole state of torchvision weights into `model` (strict: same architecture, same head)."""
    model.load_state_dict(_enum_state(weights_enum))
    report.source = str(cached_weights_path(weights_enum))


# --------------------------------------------------------------------------- local files


def load_state_file(path: str | Path) -> dict:
    """A state dict from a .pth/.pt/.bin (torch.save) or .safetensors file, unwrapped and cleaned."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"model.weights={str(path)!r}: file not found; give an existing .pth/.safetensors file or a weights name"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"weights file {p} is corrupt or not a state dict ({first_line(exc)[:200]}); delete or replace it"
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


def load_local(
    model: nn.Module, state: dict, path: str, heads: tuple[str, ...], load_head: bool, report: LoadReport
) -> None:
    """`state` (from `load_state_file(path)`) into `model`, whose `heads` (the replaced layers) are new.

    The head's entries are loaded only with `load_head` and when their shape fits; a backbone
    entry of the wrong shape means the file is of another architecture (an error).
    """
    own = model.state_dict()
    is_head = lambda k: any(under(k, h) for h in heads)  # noqa: E731
    filtered = {}
    for key, value in state.items():
        if is_head(key) and (not load_head or key not in own or own[key].shape != value.shape):
            report.skipped_head_keys.append(key)
            continue
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"weights file {path}: {key} has shape {tuple(value.shape)} but {type(model).__name__} expects "
                f"{tuple(own[key].shape)}; is model.name the architecture the file was saved from?"
            )
        filtered[key] = value
    result = model.load_state_dict(filtered, strict=False)
    report.missing_keys = [k for k in result.missing_keys if not is_head(k)]
    report.unexpected_keys = list(result.unexpected_keys)
    report.source = str(path)
    if len(filtered) - len(result.unexpected_keys) == 0:
        raise UserError(
            f"weights file {path} shares no parameter names with {type(model).__name__}; is model.name the architecture it was saved from?"
        )
