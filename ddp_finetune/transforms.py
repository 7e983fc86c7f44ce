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
from dataclasses import dataclass, field

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
    image a worker decoded because nvJPEG cannot take it (uint8 (3, H, W)); its `Crop` (None: evaluation);
    `name`: its file (or row), for the line that says nvJPEG could not decode it."""

    data: torch.Tensor
    crop: Crop | None
    size: int
    name: str = "an image"


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
    names: list[str] = field(default_factory=list)

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
            names=[s.name for s in samples],
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device, non_blocking: bool = False) -> EncodedBatch:
        return self  # stays on the host: the decoder copies the (compressed, small) files itself

    def pin_memory(self, device=None) -> EncodedBatch:
        # the loader's pinning thread: the images the workers decoded, so their copy to the device
        # does not make the host wait (the JPEG files stay pageable: the decoder reads them on the host)
        self.decoded = {i: image.pin_memory() for i, image in self.decoded.items()}
        return self

    def decode(self, device) -> torch.Tensor:
        """uint8 (N, 3, S, S) on `device`: the JPEGs decoded together (nvJPEG on CUDA), then each sample's view."""
        jpegs = [i for i, n in enumerate(self.lengths) if n]
        parts = torch.split(self.files, [self.lengths[i] for i in jpegs]) if jpegs else []
        device = torch.device(device)
        # non_blocking: pinned (see pin_memory) -> queued on the stream, no host wait; unpinned -> a plain copy
        images = {i: image.to(device, non_blocking=True) for i, image in self.decoded.items()}
        names = self.names or [f"image {i} of the batch" for i in range(len(self))]
        if jpegs:
            images.update(zip(jpegs, _decode_jpegs(list(parts), [names[i] for i in jpegs], device)))
        rows = self.crops.tolist() if self.crops is not None else [None] * len(self)  # a host tensor: no sync
        views = []
        for i, row in enumerate(rows):
            crop = Crop(*row[:4], bool(row[4])) if row is not None else None
            views.append(train_view(images[i], crop, self.size) if crop else eval_view(images[i], self.size))
        return torch.stack(views)


_FELL_BACK: set[str] = set()  # files already reported as decoded on the CPU (once per file and process)


def _decode_jpegs(parts: list[torch.Tensor], names: list[str], device: torch.device) -> list[torch.Tensor]:
    """The JPEG files decoded on `device` (nvJPEG on CUDA), all at once; one that the device's decoder
    rejects (nvJPEG refuses some files PIL and libjpeg-turbo read: unusual chroma subsampling,
    arithmetic coding) fails the whole call, so then each file is tried alone and a rejected one is
    decoded on the CPU like the workers' images (same pixels size, so the same crop), said once per
    file on stderr. A file no decoder reads (the start-up check decodes every image, so only one
    changed since) is a UserError naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(parts, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for data, name in zip(parts, names):
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            out.append(_decode_on_cpu(data, name, exc).to(device, non_blocking=True))
    return out


def _decode_on_cpu(data: torch.Tensor, name: str, exc: RuntimeError) -> torch.Tensor:
    import sys

    from .errors import UserError, first_line
    from .images import decode_rgb

    try:
        image = decode_rgb({"bytes": data.numpy().tobytes(), "path": None}, name)
    except UserError:
        raise
    except Exception as cpu_exc:
        raise UserError(
            f"{name} does not decode ({first_line(cpu_exc)}); replace or remove the file, or set data.bad_images=skip "
            "and restart so the start-up check drops it"
        ) from None
    if name not in _FELL_BACK:
        _FELL_BACK.add(name)
        print(
            f"ddp-finetune: nvJPEG cannot decode {name} ({first_line(exc)[:160]}); decoded on the CPU instead",
            file=sys.stderr,
            flush=True,
        )
    # pinned, so the copy to the device is queued rather than waited for
    return image.pin_memory() if torch.cuda.is_available() else image


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
