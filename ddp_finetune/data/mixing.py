"""Mixup and CutMix, per sample, with partners from the same *global* batch.

    mixing = Mixing.from_config(cfg.data)              # None when both alphas are 0
    partners = mixing.partners(seed, epoch, batch)     # the sampler: one partner per sample of a global batch
    x, t = mixing.mix(a, b, t_a, t_b, rng)             # the dataset: both images as the model would see them

Why not mix a batch on the device, as timm's `Mixup` does: a rank holds only its slice of the
global batch, and with gradient accumulation only a micro-batch of it, so the partners would
depend on the world size and `train.grad_accum`. Here `loaders.EpochSampler`, which knows each
optimizer step's whole global batch, draws every sample's partner from it with the sample's own
seeded stream (`transforms.MIX_STREAM`), and the dataset loads the partner's image itself (with
the partner's own crop and photometric draws) and mixes the pair. A sample is then mixed the same
way at every world size, accumulation, worker count and restart: N processes train as 1 process
with `grad_accum` N.

The images stay uint8: a Mixup blend is rounded to the nearest integer (at most 0.5 / 255 off
the exact blend, less than JPEG's own error), its target uses the exact weight. CutMix's weight
is the pasted box's true area fraction, as in timm (`correct_lam`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ddp_finetune.data.transforms import MIX_STREAM, sample_rng

MIX_DRAW_STREAM = MIX_STREAM + 1  # the dataset's draws (Mixup or CutMix, weight, box); the sampler's are MIX_STREAM


@dataclass(frozen=True)
class Mixing:
    """`data.mixup_alpha`, `data.cutmix_alpha`, `data.mix_prob`, `data.mix_switch_prob`."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @classmethod
    def from_config(cls, d) -> Mixing | None:
        if d.mixup_alpha <= 0 and d.cutmix_alpha <= 0:
            return None
        return cls(d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob)

    def partners(self, seed: int, epoch: int, batch: list[int], repeats: list[int]) -> list[int]:
        """For each position of one global batch (sample indices, their repeat counts), the position of
        its partner in the batch, or -1 when the sample is not mixed. Drawn from each sample's own
        stream: the same at every world size and accumulation."""
        out = []
        for pos, (index, repeat) in enumerate(zip(batch, repeats)):
            rng = sample_rng(seed, epoch, index, MIX_STREAM, repeat)
            if len(batch) < 2 or rng.random() >= self.prob:
                out.append(-1)
                continue
            other = rng.randrange(len(batch) - 1)  # any other position of the batch
            out.append(other + (other >= pos))
        return out

    def mix(
        self, a: torch.Tensor, b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (3, S, S) images `a` (the sample) and `b` (its partner) with float targets mixed."""
        cutmix = self.mixup_alpha <= 0 or (self.cutmix_alpha > 0 and rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = rng.betavariate(alpha, alpha)
        if cutmix:
            height, width = a.shape[-2:]
            top, bottom, left, right = cut_box(rng, height, width, lam)
            x = a.clone()
            x[:, top:bottom, left:right] = b[:, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        else:
            x = (lam * a.float() + (1 - lam) * b.float()).round_().clamp_(0, 255).to(torch.uint8)
        return x, lam * t_a + (1 - lam) * t_b


def cut_box(rng: random.Random, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019): sides sqrt(1 - lam) of the image's, centred uniformly, clipped."""
    cut = math.sqrt(1 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, height)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, width)
    return top, bottom, left, right


def mix_rng(seed: int, epoch: int, index: int, repeat: int) -> random.Random:
    """The dataset's stream of one sample's mixing draws (independent of the sampler's partner draw)."""
    return sample_rng(seed, epoch, index, MIX_DRAW_STREAM, repeat)
