"""What happens to an image between its file and the model: crop, flip, resize, normalize.

    rng = sample_rng(seed, epoch, index)          # one sample's random stream
    crop = draw_crop(rng, height, width)          # RandomResizedCrop's box + the flip: drawn once
    x = train_view(image_uint8, crop, size)       # the same code on CPU workers and on the GPU
    inputs = DeviceInput(mean, std, device)(x_batch)   # uint8 -> normalized float, on the device

Samples leave the data workers as uint8 (3, S, S): a quarter of float32's bytes through shared
memory, pinning and the host-to-device copy. Conversion to float, normalization and the cast to
the mixed-precision dtype happen on the device inside the step (`DeviceInput`). With
`data.decode: gpu`, the workers only read JPEG files and draw the crop; `EncodedBatch.decode`
decodes the batch on the device and applies the same `train_view` with the same `Crop`.

Augmentation is seeded per (seed, epoch, sample index), so a sample is cropped and flipped the
same way whichever rank, worker, restart or decoding device handles it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

EVAL_CROP_FRACTION = 0.875  # evaluation: shorter side to size / 0.875, then the centre size x size (torchvision's)
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: area fraction and aspect ratio range
CROP_RATIO = (3 / 4, 4 / 3)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample's random transform, a hash of (seed, epoch, index).

    numpy's SeedSequence mixes the triple, so distinct triples give unrelated streams: no two
    samples of any epoch or run seed share a crop (a linear formula such as
    seed*a + epoch*b + index makes (epoch e, index i+b) collide with (epoch e+1, index i)).
    """
    low, high = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """One sample's random stream: it depends on (seed, epoch, index) only, not on which rank, worker or
    restart loads the sample, and it leaves torch's global RNG alone (dropout draws from that one)."""
    return random.Random(sample_seed(seed, epoch, index))


@dataclass(frozen=True)
class Crop:
    """One training sample's augmentation: the box of the decoded image to keep, and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_row(self) -> list[int]:
        return [self.top, self.left, self.height, self.width, int(self.flip)]


def draw_crop(rng: random.Random, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO) -> Crop:
    """RandomResizedCrop's box (Inception-style: a random area fraction and aspect ratio, 10 tries, then
    the centre at the nearest allowed ratio) and a fair-coin horizontal flip, from one sample's `rng`.

    The only place augmentation draws random numbers: the CPU and the GPU decoding paths both use it.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return Crop(top, left, h, w, rng.random() < 0.5)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return Crop((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def train_view(image: torch.Tensor, crop: Crop, size: int, mask: bool = False) -> torch.Tensor:
    """The crop resized to size x size (antialiased bilinear; masks nearest), flipped if drawn so.
    `image`: uint8 (C, H, W) or a (H, W) mask, on any device."""
    from torchvision.transforms.v2 import functional as F

    x = _typed(image, mask)
    x = F.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [size, size], antialias=True)
    if crop.flip:
        x = F.horizontal_flip(x)
    return x.as_subclass(torch.Tensor)


def eval_view(image: torch.Tensor, size: int, mask: bool = False) -> torch.Tensor:
    """Shorter side to size / 0.875, then the centre size x size (torchvision's evaluation transform)."""
    from torchvision.transforms.v2 import functional as F

    x = F.resize(_typed(image, mask), [int(round(size / EVAL_CROP_FRACTION))], antialias=True)
    return F.center_crop(x, [size, size]).as_subclass(torch.Tensor)


def _typed(image: torch.Tensor, mask: bool):
    from torchvision import tv_tensors

    # v2 picks the interpolation by type: bilinear for images, nearest for masks (no blended class values)
    return tv_tensors.Mask(image) if mask else tv_tensors.Image(image)


# --------------------------------------------------------------------------- on the device


@dataclass
class EncodedImage:
    """One sample for the device to decode (`data.decode: gpu`): a JPEG file's bytes (1-D uint8), or the
    image a worker decoded because nvJPEG cannot take it (uint8 (3, H, W)); its `Crop` (None: evaluation)."""

    data: torch.Tensor
    crop: Crop | None
    size: int


@dataclass
class EncodedBatch:
    """A batch of `EncodedImage`s as few tensors: the JPEG files end to end in `files` (one shared-memory
    block from the worker, not one per file), each sample's file length (0: decoded by the worker, in
    `decoded`), the crops as rows (N, 5) or None for the evaluation view."""

    files: torch.Tensor
    lengths: list[int]
    decoded: dict[int, torch.Tensor]
    crops: torch.Tensor | None
    size: int

    @classmethod
    def collate(cls, samples: list[EncodedImage]) -> EncodedBatch:
        files = [s.data for s in samples if s.data.ndim == 1]
        crops = [s.crop.as_row() for s in samples if s.crop is not None]
        return cls(
            files=torch.cat(files) if files else torch.empty(0, dtype=torch.uint8),
            lengths=[s.data.numel() if s.data.ndim == 1 else 0 for s in samples],
            decoded={i: s.data for i, s in enumerate(samples) if s.data.ndim != 1},
            crops=torch.tensor(crops, dtype=torch.int64) if crops else None,
            size=samples[0].size,
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device, non_blocking: bool = False) -> EncodedBatch:
        return self  # stays on the host: the decoder copies the (compressed, small) files itself

    def pin_memory(self, device=None) -> EncodedBatch:
        return self

    def decode(self, device) -> torch.Tensor:
        """uint8 (N, 3, S, S) on `device`: the JPEGs decoded together (nvJPEG on CUDA), then each sample's view."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, n in enumerate(self.lengths) if n]
        parts = torch.split(self.files, [self.lengths[i] for i in jpegs]) if jpegs else []
        images = dict(self.decoded)
        if jpegs:
            decoded = decode_jpeg(list(parts), mode=ImageReadMode.RGB, device=device)
            images.update(zip(jpegs, decoded))
        rows = self.crops.tolist() if self.crops is not None else [None] * len(self)
        views = []
        for i, row in enumerate(rows):
            image = images[i].to(device)
            crop = Crop(*row[:4], bool(row[4])) if row is not None else None
            views.append(train_view(image, crop, self.size) if crop else eval_view(image, self.size))
        return torch.stack(views)


class DeviceInput:
    """The model's input from a uint8 batch, on the device, inside the step: float, normalized with the
    model's mean / std, cast to the mixed-precision dtype, channels_last when the model is.

        run.prepare_input(x)   # x: uint8 (N, 3, S, S) or an EncodedBatch -> float (N, 3, S, S) on the device
    """

    def __init__(self, mean, std, device="cpu", dtype=torch.float32, channels_last: bool = False):
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        # (x / 255 - mean) / std as one multiply-add on the uint8 values
        self.scale, self.shift = 1 / std, -mean / std

    def __call__(self, batch) -> torch.Tensor:
        if isinstance(batch, EncodedBatch):
            batch = batch.decode(self.device)
        if batch.dtype != torch.uint8:
            raise TypeError(f"DeviceInput takes uint8 image batches, got {batch.dtype}")
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # on the uint8 values: a quarter of the bytes
        x = x.float().mul_(self.scale).add_(self.shift)  # elementwise ops keep the memory format
        return x if self.dtype == torch.float32 else x.to(self.dtype)


def device_input(mean, std, device, mixed_precision: str = "no", channels_last: bool = False) -> DeviceInput:
    """The `DeviceInput` of a model trained with `mean` / `std` under `train.mixed_precision`: inputs in the
    autocast dtype, channels_last when the model is. Training, `evaluate` and `predict` all build theirs here."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return DeviceInput(mean, std, device=device, dtype=dtype, channels_last=channels_last)


def whole_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to size x size (antialiased bilinear): what `predict` shows a segmenter,
    whose mask is then resized back to the image's own size."""
    from torchvision.transforms.v2 import functional as F

    return F.resize(_typed(image, False), [size, size], antialias=True).as_subclass(torch.Tensor)
