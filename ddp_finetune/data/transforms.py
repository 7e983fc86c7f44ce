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

import functools
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

EVAL_CROP_FRACTION = 0.875  # evaluation: shorter side to size / 0.875, then the centre size x size (torchvision's)
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: area fraction and aspect ratio range
CROP_RATIO = (3 / 4, 4 / 3)


# Independent streams of one sample (`sample_seed`'s `stream`): the crop and flip, the photometric
# transforms (policy, colour jitter, random erasing), and the Mixup / CutMix draws
CROP_STREAM, PHOTOMETRIC_STREAM, MIX_STREAM = 0, 1, 2


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0, repeat: int = 0) -> int:
    """A 64-bit seed for one sample's random transform, a hash of (seed, epoch, index).

    numpy's SeedSequence mixes the triple, so distinct triples give unrelated streams: no two
    samples of any epoch or run seed share a crop (a linear formula such as
    seed*a + epoch*b + index makes (epoch e, index i+b) collide with (epoch e+1, index i)).
    `stream` picks one of the sample's independent streams (`CROP_STREAM`, ...); `repeat` counts
    earlier draws of the same index in the epoch (`data.sampler: balanced` draws with replacement),
    so a repeated sample is augmented anew. Both 0: the triple alone, as before they existed.
    """
    words = [seed, epoch, int(index)] + ([stream, repeat] if stream or repeat else [])
    low, high = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0, repeat: int = 0) -> random.Random:
    """One sample's random stream: it depends on (seed, epoch, index) only, not on which rank, worker or
    restart loads the sample, and it leaves torch's global RNG alone (dropout draws from that one)."""
    return random.Random(sample_seed(seed, epoch, index, stream, repeat))


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


POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment", "augmix")


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of `data.*`: the crop box and flip (`draw_crop`, drawn in the workers
    and applied by either decoding path), then torchvision v2's photometric transforms on the image.

        aug = Augmentation.from_config(cfg.data)
        crop = aug.draw_crop(sample_rng(seed, epoch, index), h, w)
        x = aug.photometric(train_view(image, crop, size), sample_seed(seed, epoch, index, PHOTOMETRIC_STREAM))

    The v2 transforms draw from torch's global RNG; `photometric` runs them in a fork of it seeded
    from the sample's own stream, so they too depend on (seed, epoch, index) only, and the global
    RNG (dropout's) is left as it was.
    """

    scale: tuple[float, float] = CROP_SCALE
    ratio: tuple[float, float] = CROP_RATIO
    hflip: bool = True
    policy: str = "none"
    policy_magnitude: int | None = None
    policy_ops: int = 2
    color_jitter: float = 0.0
    random_erasing: float = 0.0

    @classmethod
    def from_config(cls, d) -> Augmentation:
        return cls(
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            hflip=d.hflip,
            policy=d.policy,
            policy_magnitude=d.policy_magnitude,
            policy_ops=d.policy_ops,
            color_jitter=d.color_jitter,
            random_erasing=d.random_erasing,
        )

    @property
    def has_photometric(self) -> bool:
        return self.policy != "none" or self.color_jitter > 0 or self.random_erasing > 0

    def draw_crop(self, rng: random.Random, height: int, width: int) -> Crop:
        crop = draw_crop(rng, height, width, self.scale, self.ratio)
        # the coin is drawn either way: turning flips off leaves every crop where it was
        return crop if self.hflip else Crop(crop.top, crop.left, crop.height, crop.width, False)

    @functools.cached_property
    def transforms(self):
        """The v2 photometric transforms in order (policy, colour jitter, random erasing), or None."""
        if not self.has_photometric:
            return None
        from torchvision.transforms import v2

        steps = []
        if self.policy == "randaugment":
            magnitude = 9 if self.policy_magnitude is None else self.policy_magnitude
            steps.append(v2.RandAugment(num_ops=self.policy_ops, magnitude=magnitude))
        elif self.policy == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        elif self.policy == "autoaugment":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
        elif self.policy == "augmix":
            steps.append(v2.AugMix(severity=3 if self.policy_magnitude is None else self.policy_magnitude))
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        if self.random_erasing > 0:
            steps.append(v2.RandomErasing(p=self.random_erasing, value=0))
        return v2.Compose(steps)

    def photometric(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """`transforms` applied to a uint8 (3, S, S) image with torch's RNG forked and seeded by `seed`."""
        if not self.has_photometric:
            return image
        from torchvision import tv_tensors

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transforms(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def train_view(image: torch.Tensor, crop: Crop, size: int, mask: bool = False) -> torch.Tensor:
    """The crop resized to size x size (antialiased bilinear; masks nearest), flipped if drawn so.
    `image`: uint8 (C, H, W) or a (H, W) mask, on any device."""
    from torchvision.transforms.v2 import functional as F

    x = _typed(image, mask)
    x = F.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [size, size], antialias=True)
    if crop.flip:
        x = F.horizontal_flip(x)
    return x.as_subclass(torch.Tensor)


def eval_view(
    image: torch.Tensor,
    size: int,
    mask: bool = False,
    crop_fraction: float = EVAL_CROP_FRACTION,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Shorter side to size / crop_fraction, then the centre size x size (torchvision's evaluation transform;
    timm models pass their `pretrained_cfg`'s `crop_pct` and `interpolation`; masks are always nearest)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    how = InterpolationMode.NEAREST if mask else InterpolationMode(interpolation)
    x = F.resize(_typed(image, mask), [int(round(size / crop_fraction))], interpolation=how, antialias=True)
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

    from ddp_finetune.data.images import decode_rgb
    from ddp_finetune.errors import UserError, first_line

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
