"""The names of a loss's modes and accumulations: plain Literals, no torch, so the config can type its
`loss:` fields with them (config imports losses, never the reverse)."""

from typing import Literal

Mode = Literal["binary", "multilabel", "multiclass"]
"""How a built-in loss reads the logits: a sigmoid (binary: one channel; multilabel: per channel) or a softmax over channels."""

Accumulation = Literal["exact", "micro_batch"]
"""How a region loss (dice, dice_bce, iou, tversky) combines the micro-batches of one optimizer step."""
