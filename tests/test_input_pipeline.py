"""The input pipeline of issue 10: uint8 samples normalized on the device, one crop draw for CPU and
GPU decoding, automatic workers, pinned memory, loaders that leave the global RNG alone.

Every GPU test is the `cuda` case of a test whose `cpu` case runs the same code here (CI has no
GPU): `pytest -m gpu` on a GPU machine runs the cuda cases (benchmarks/device_check.sh).
"""

from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch
from datagen import make_jpeg_folder
from helpers import ROOT, fit_in_process, load_weights, max_abs_diff, read_metrics, tiny_config

from ddp_finetune.config import config_from_dict
from ddp_finetune.data.datasets import build_datasets
from ddp_finetune.data.loaders import build_loaders, plan_loaders
from ddp_finetune.data.sources import decide_classes, load_splits
from ddp_finetune.data.transforms import DeviceInput, EncodedBatch, draw_crop
from ddp_finetune.models.parts import IMAGENET_MEAN, IMAGENET_STD

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    # every 5th file a PNG: the device decodes the JPEGs, the workers decode the stray PNGs
    return make_jpeg_folder(tmp_path_factory.mktemp("jpeg") / "images", per_class=10, png_every=5)


def _datasets(folder, on_device, size=24, augment=True):
    cfg = config_from_dict({"data": {"path": str(folder), "image_size": size, "augment": augment, "val_fraction": 0.2}})
    splits = load_splits(cfg.data, cfg.seed)
    return build_datasets(cfg, splits, decide_classes(cfg, splits), on_device=on_device)


# --------------------------------------------------------------------------- the crop draw


def test_draw_crop_is_random_resized_crop_and_seeded():
    rng = random.Random(0)
    crops = [draw_crop(rng, 300, 400) for _ in range(2000)]
    for c in crops:
        assert 0 <= c.top and c.top + c.height <= 300 and 0 <= c.left and c.left + c.width <= 400
        assert 0.08 * 0.97 <= c.height * c.width / (300 * 400) <= 1.0
        assert 3 / 4 * 0.97 <= c.width / c.height <= 4 / 3 * 1.03 or c.width == 400 or c.height == 300
    assert 0.45 < sum(c.flip for c in crops) / len(crops) < 0.55
    assert len({(c.top, c.left, c.height, c.width) for c in crops}) > 1900
    # the same stream gives the same crop; a strip no allowed box fits gets the centre at the nearest ratio
    assert draw_crop(random.Random(7), 50, 60) == draw_crop(random.Random(7), 50, 60)
    strip = draw_crop(random.Random(1), 10, 1000)
    assert (strip.height, strip.width, strip.top) == (10, 13, 0) and strip.left == (1000 - 13) // 2


# --------------------------------------------------------------------------- GPU decoding == CPU decoding


@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_gives_the_cpu_paths_crops_and_pixels(jpeg_folder, device):
    """The GPU path's code (EncodedBatch.decode: decode_jpeg on a list, then train_view / eval_view)
    against the workers' CPU path, sample by sample, for epoch 1's augmentation and for evaluation."""
    cpu_train, cpu_val = _datasets(jpeg_folder, on_device=False)
    dev_train, dev_val = _datasets(jpeg_folder, on_device=True)
    keys = [(1, i) for i in range(len(cpu_train))]
    encoded = [dev_train[k][0] for k in keys]
    assert sum(e.data.ndim == 1 for e in encoded) >= len(keys) // 2, "the JPEGs travel as their files"
    assert any(e.data.ndim == 3 for e in encoded), "the stray PNG is decoded by the worker"
    expected = torch.stack([cpu_train[k][0] for k in keys])
    for (epoch, index), e in zip(keys, encoded):
        height, width = _decoded_size(cpu_train, index)  # the device path read it from the JPEG header
        assert e.crop == cpu_train.crop(epoch, index, height, width), "the crop is drawn once, from the same seed"

    got = EncodedBatch.collate(encoded).decode(device)
    assert got.dtype == torch.uint8 and got.device.type == device and got.shape == expected.shape
    _assert_near(got.cpu(), expected, exact=device == "cpu")

    val = EncodedBatch.collate([dev_val[i][0] for i in range(len(dev_val))]).decode(device)
    _assert_near(val.cpu(), torch.stack([cpu_val[i][0] for i in range(len(cpu_val))]), exact=device == "cpu")


def _rejecting(real, bad: torch.Tensor):
    """`torchvision.io.decode_jpeg` as nvJPEG behaves with a file it cannot take: the call with that file
    raises, for a list as for the file alone (what a batched nvJPEG decode does)."""

    def decode_jpeg(input, *args, **kwargs):
        files = input if isinstance(input, list) else [input]
        if any(f.numel() == bad.numel() and torch.equal(f, bad) for f in files):
            raise RuntimeError("nvjpegDecodeBatched failed: 6 (unsupported JPEG)")
        return real(input, *args, **kwargs)

    return decode_jpeg


@pytest.mark.parametrize("device", DEVICES)
def test_a_jpeg_the_device_rejects_is_decoded_on_the_cpu_with_its_crop(jpeg_folder, device, monkeypatch, capsys):
    """issue 26 item 6: one file nvJPEG rejects failed the whole batch with a traceback naming no file.
    Now that image is decoded on the CPU (same crop), the batch is the one the workers would make,
    and the file is named once."""
    import torchvision.io

    cpu_train, _ = _datasets(jpeg_folder, on_device=False)
    dev_train, _ = _datasets(jpeg_folder, on_device=True)
    keys = [(1, i) for i in range(8)]
    encoded = [dev_train[k][0] for k in keys]
    bad = next(e for e in encoded if e.data.ndim == 1)
    assert bad.name.endswith(".jpg") and os.path.isfile(bad.name)
    expected = torch.stack([cpu_train[k][0] for k in keys])

    monkeypatch.setattr(torchvision.io, "decode_jpeg", _rejecting(torchvision.io.decode_jpeg, bad.data))
    capsys.readouterr()
    got = EncodedBatch.collate(encoded).decode(device)
    _assert_near(got.cpu(), expected, exact=device == "cpu")
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and bad.name in said[0] and "decoded on the CPU" in said[0], said
    again = EncodedBatch.collate(encoded).decode(device)  # said once per file
    assert torch.equal(again, got) and capsys.readouterr().err == ""


def test_a_file_no_decoder_reads_is_one_line_naming_it(jpeg_folder, monkeypatch):
    import torchvision.io

    from ddp_finetune.data.transforms import Crop, EncodedImage
    from ddp_finetune.errors import UserError

    junk = torch.tensor(list(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 8), dtype=torch.uint8)
    broken = EncodedImage(junk, Crop(0, 0, 8, 8, False), 8, name="/data/cats/broken.jpg")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", _rejecting(torchvision.io.decode_jpeg, junk))
    with pytest.raises(UserError, match="/data/cats/broken.jpg"):
        EncodedBatch.collate([broken]).decode("cpu")


def _decoded_size(dataset, index):
    from ddp_finetune.data.images import decode_rgb

    return decode_rgb(dataset.ds[index][dataset.image_column]).shape[-2:]


def _assert_near(got: torch.Tensor, expected: torch.Tensor, exact: bool):
    diff = (got.int() - expected.int()).abs().float()
    if exact:  # the same decoder and the same resize code on the CPU: the same pixels
        assert diff.max() == 0
    else:  # nvJPEG vs libjpeg-turbo, float vs fixed-point resize: about a grey level on photo-like images
        assert diff.mean() < 2.5, diff.mean()
    # a wrong crop or a missed flip is far from this: the check can fail
    assert (got.flip(-1).int() - expected.int()).abs().float().mean() > 10


# --------------------------------------------------------------------------- on the device


@pytest.mark.parametrize("device", DEVICES)
def test_device_input_normalizes_casts_and_lays_out_on_the_device(device):
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = (x.double() / 255 - mean.double()) / std.double()

    out = DeviceInput(IMAGENET_MEAN, IMAGENET_STD, device=device)(x)
    assert out.dtype == torch.float32 and out.device.type == device
    assert (out.cpu().double() - reference).abs().max() < 1e-5

    half = DeviceInput(IMAGENET_MEAN, IMAGENET_STD, device=device, dtype=torch.bfloat16, channels_last=True)(x)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert (half.cpu().double() - reference).abs().max() < 2e-2
    with pytest.raises(TypeError, match="uint8"):
        DeviceInput(IMAGENET_MEAN, IMAGENET_STD, device=device)(x.float())


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_uint8_pinned_on_cuda_and_survive_workers(jpeg_folder, device):
    cfg = config_from_dict({"data": {"path": str(jpeg_folder), "image_size": 24}, "train": {"batch_size": 4}})
    cuda = device == "cuda"
    train, val = _datasets(jpeg_folder, on_device=False)
    plan = plan_loaders(1, cuda=cuda)
    assert plan.pin_memory == cuda and plan.prefetch == 4
    x, _ = next(iter(build_loaders(cfg, train, val, plan)[0]))
    assert x.dtype == torch.uint8 and x.is_pinned() == cuda

    # the device-decoding batch crosses the worker process and decodes as without workers
    dev_train, dev_val = _datasets(jpeg_folder, on_device=True)
    with_workers, _ = next(iter(build_loaders(cfg, dev_train, dev_val, plan)[0]))
    without, _ = next(iter(build_loaders(cfg, dev_train, dev_val, plan_loaders(0, cuda=cuda))[0]))
    assert isinstance(with_workers, EncodedBatch) and len(with_workers) == 4
    assert torch.equal(with_workers.decode(device), without.decode(device))


def test_loaders_leave_the_global_rng_alone(jpeg_folder):
    """A DataLoader draws its workers' base seed each time an iterator is made: from its own generator
    here, so training (dropout) sees the same global random stream whether or not a run resumed."""
    cfg = config_from_dict({"data": {"path": str(jpeg_folder), "image_size": 24}, "train": {"batch_size": 4}})
    train, val = _datasets(jpeg_folder, on_device=False)
    for workers in (0, 1):
        train_dl, val_dl, _ = build_loaders(cfg, train, val, plan_loaders(workers, cuda=False))
        torch.manual_seed(5)
        before = torch.random.get_rng_state()
        next(iter(train_dl)), next(iter(val_dl))
        assert torch.equal(torch.random.get_rng_state(), before), f"num_workers={workers}"


# --------------------------------------------------------------------------- workers: auto


def test_auto_workers_share_this_process_cpus_with_the_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    plan = plan_loaders("auto", cuda=True)
    assert (plan.workers, plan.prefetch, plan.pin_memory) == (15, 2, True)
    assert "15 workers per rank (auto: 16 CPUs (this process's CPU affinity), minus 1" in plan.describe()

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    plan = plan_loaders("auto", cuda=True)
    assert plan.workers == 3 and "16 CPUs (this process's CPU affinity) / 4 processes on this node" in plan.describe()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # the job's share, not the node's
    plan = plan_loaders("auto", cuda=True)
    assert plan.workers == 1 and plan.prefetch == 4 and "8 CPUs (SLURM_CPUS_PER_TASK=8)" in plan.describe()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    plan = plan_loaders("auto", cuda=True)
    assert plan.workers == 0 and plan.prefetch is None and "in the training process" in plan.describe()
    assert plan_loaders(3, cuda=False).describe().startswith("data loading: 3 workers per rank (data.num_workers=3)")
    # a CPU run leaves the cores its torch threads compute on to them
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("torch.get_num_threads", lambda: 4)
    plan = plan_loaders("auto", cuda=False)
    assert plan.workers == 12 and "minus 4 for the training process's torch threads" in plan.describe()


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "device, precision", [("cpu", "bf16"), pytest.param("cuda", "fp16", marks=pytest.mark.gpu)], ids=["cpu", "cuda"]
)
def test_training_on_device_decoded_jpegs_with_synchronized_dice(tmp_path, jpeg_folder, monkeypatch, device, precision):
    """decode: gpu with a worker, mixed precision (fp16 with GradScaler on CUDA) and the rank-synchronized
    Dice loss, against the same run decoding on the CPU. On CPU the device path is forced (a CPU run
    would fall back) and its pixels are the CPU path's, so the training is bit-identical."""
    from ddp_finetune.training import run as run_module

    if device == "cpu":
        monkeypatch.setattr(run_module, "decide_decode", lambda cfg, splits, cuda: (cfg.data.decode == "gpu", "forced"))
    sections = dict(
        task="binary",
        data={"augment": True, "image_size": 24, "num_workers": 1},
        loss={"name": "dice"},
        train={"epochs": 2, "batch_size": 4, "mixed_precision": precision},
    )
    on_cpu = fit_in_process(tiny_config(tmp_path / "cpu", jpeg_folder, **sections), "data.decode=cpu")
    on_dev = fit_in_process(tiny_config(tmp_path / "dev", jpeg_folder, **sections), "data.decode=gpu")
    assert on_dev["mixed_precision"] == precision and on_dev["steps"] == on_cpu["steps"] == 6
    assert torch.isfinite(torch.tensor(on_dev["val"]["loss"]))
    first = [
        next(r["loss"] for r in read_metrics(tmp_path / n / "run") if r["split"] == "train") for n in ("cpu", "dev")
    ]
    if device == "cpu":
        assert max_abs_diff(load_weights(tmp_path / "cpu" / "run"), load_weights(tmp_path / "dev" / "run")) == 0
    else:  # nvJPEG's pixels are within a grey level of libjpeg-turbo's: the first loss agrees closely
        assert first[1] == pytest.approx(first[0], rel=2e-2)


def test_start_up_lines_say_how_data_is_loaded_and_decoded(tmp_path, jpeg_folder, capsys):
    config = tiny_config(tmp_path, jpeg_folder, data={"image_size": 24, "num_workers": "auto"}, train={"epochs": 1})
    fit_in_process(config, "data.decode=gpu")
    out = capsys.readouterr().out
    cpus, keep = len(os.sched_getaffinity(0)), 1 if torch.cuda.is_available() else torch.get_num_threads()
    n = max(0, cpus - keep)
    workers = f"{n} worker{'s' if n > 1 else ''} per rank" if n else "in the training process"
    assert f"data loading: {workers} (auto: {cpus} CPUs (this process's CPU affinity), minus {keep} " in out
    if not torch.cuda.is_available():
        assert out.count("data.decode=gpu, but there is no CUDA device: decoded by the CPU workers") == 1
    else:
        assert out.count("JPEG files decoded on the GPU (nvJPEG)") == 1


# --------------------------------------------------------------------------- the GPU benchmark's seam, on CPU


def test_gpu_benchmark_synthetic_run_still_fits_the_package(tmp_path, image_folder, monkeypatch):
    """benchmarks/gpu.py gives `fit` in-memory uint8 datasets (`fit(train_data=...)`) to time the package against
    the raw loop; it only runs on a lent GPU, so this runs its package side on the CPU: a refactor that
    moves the seam or changes what a dataset must yield fails here, not on the GPU machine."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_benchmark", gpu)  # its dataclasses look their module up
    spec.loader.exec_module(gpu)
    args = argparse.Namespace(warmup=0, steps=2 * gpu.WINDOW, model="resnet18", size=16, batch=4)
    result = gpu.package_run(args, tmp_path, "synthetic", image_folder, ["data.num_workers=0"], synthetic=True)
    assert math.isfinite(result["images_per_second"]) and result["images_per_second"] > 0
    # the in-memory dataset was the one trained on: batch x (steps + 1) samples, not the image folder's 24
    assert f"data: {4 * (2 * gpu.WINDOW + 1)} train images" in (tmp_path / "synthetic.log").read_text()
