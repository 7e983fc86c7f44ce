"""The values a loss option may take: checked in one place, for the functions, the modules and the config.

    check_options("tversky", "binary", {"alpha": 0.3, "beta": -1.0}, owner="tversky_loss")
    # UserError: tversky_loss: beta=-1.0 must be >= 0

The same rules answer a config (`owner="loss.name=tversky"`, `prefix="loss."`), so the message
names the key the user wrote. Checks on Python values only: nothing here waits for a device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from ddp_finetune.errors import UserError
from ddp_finetune.losses.batch import MODES


def show_value(value, prefix: str) -> str:
    """A value as the user wrote it: YAML's `null`/`true` for config keys, Python's for arguments."""
    if prefix and (value is None or isinstance(value, bool)):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _limit(low: float, high: float | None = None, high_open: bool = False):
    def rule(value) -> str | None:
        bad = value < low or (high is not None and (value > high or (high_open and value == high)))
        if not bad:
            return None
        return f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"

    return rule


# option -> its rule; `alpha` depends on the loss (below)
_RULES = {
    "smooth": _limit(0.0),
    "beta": _limit(0.0),
    "gamma": _limit(0.0),
    "label_smoothing": _limit(0.0, 1.0, high_open=True),
}
_ALPHA = {"focal": _limit(0.0, 1.0), "tversky": _limit(0.0)}


def weight_list(class_weights: Sequence[float] | Tensor | None) -> list[float] | None:
    """Class weights as Python floats (a tensor is read once, here)."""
    if class_weights is None:
        return None
    values = class_weights.reshape(-1).tolist() if isinstance(class_weights, Tensor) else class_weights
    return [float(v) for v in values]


def check_options(loss: str, mode: str | None, options: dict, owner: str, prefix: str = "") -> None:
    """Raise a one-line UserError for the first option of `loss` (a `LOSSES` name) out of its range.

    `mode` None (not known yet, e.g. a config without its task) skips the mode-dependent checks.
    """

    def fail(text: str) -> UserError:
        return UserError(f"{owner}: {text}")

    if mode is not None and mode not in MODES:
        raise fail(f"{prefix}mode={mode!r} is not one of {', '.join(MODES)}")
    for key, value in options.items():
        rule = _ALPHA.get(loss) if key == "alpha" else _RULES.get(key)
        if rule is None:
            continue
        if value is None and key == "alpha" and loss == "focal":
            continue  # no alpha balancing
        if value is None:
            raise fail(f"{prefix}{key}={show_value(value, prefix)} but {loss} needs a number, e.g. {prefix}{key}=0.3")
        requirement = rule(value)
        if requirement:
            raise fail(f"{prefix}{key}={show_value(value, prefix)} must be {requirement}")
    weights = weight_list(options.get("class_weights"))
    if weights is None:
        return
    if not all(math.isfinite(v) and v >= 0 for v in weights) or sum(weights) <= 0:
        raise fail(f"{prefix}class_weights={weights} must be finite, >= 0 and not all 0")
    if loss == "focal" and mode is not None and mode != "multiclass":
        raise fail(
            f"{prefix}class_weights are not used by focal in {mode} mode (it balances classes with {prefix}alpha); "
            "remove them"
        )
