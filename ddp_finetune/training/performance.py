"""How the model runs on the hardware: TF32 and cuDNN autotuning, channels_last, SyncBatchNorm,
torch.compile. Each is refused with one line where it cannot work.

    configure_backends(cuda, cfg.train.deterministic)              # once, before building anything
    model = convert_model(model, cfg, device_type, num_processes)    # before accelerator.prepare
    model = compile_model(prepared_model, cfg, device_type)          # after it

- On CUDA, TF32 matmuls and convolutions and `cudnn.benchmark` are on (what torchvision's
  references and timm do for speed); `train.deterministic: true` turns them off and asks torch for
  deterministic algorithms instead (bit-identical reruns on the same GPU, slower).
- Conv nets use channels_last on CUDA (inputs are converted by `transforms.DeviceInput`'s caller).
- `model.sync_bn: true` turns BatchNorm into SyncBatchNorm on CUDA, so BatchNorm statistics are
  those of the global batch and BatchNorm-training models keep the world-size promise on GPUs
  (`--sync-bn` in torchvision's references and timm). SyncBatchNorm needs CUDA: on a CPU it is an
  error pointing to `model.freeze_bn`, the CPU way to the same promise. timm's fused norm layers
  (`BatchNormAct2d`: BatchNorm + activation + drop in one module) go through timm's converter:
  torch's turns them into a plain SyncBatchNorm that silently drops the activation.
- `train.compile: true` wraps the prepared model in `torch.compile` (after DDP, as Accelerate does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys

import torch
from torch import nn

from ddp_finetune.errors import UserError

# the values cuBLAS is deterministic with (torch refuses a CUDA matmul under deterministic mode otherwise)
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def configure_backends(cuda: bool, deterministic: bool) -> None:
    """Process-wide switches, set both ways so an earlier run in the same process leaves nothing behind.

    `train.deterministic: true` means bit-identical reruns, so it is strict: an op without a
    deterministic kernel raises (turned into one line by `deterministic_refusals`) instead of
    warning and running nondeterministically (with `warn_only=True`, every torchvision segmenter's
    bilinear upsampling backward did). cuBLAS needs `CUBLAS_WORKSPACE_CONFIG` set before its first
    use in the process: set here, before anything runs on the device."""
    torch.use_deterministic_algorithms(deterministic)
    if deterministic and cuda and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _CUBLAS_DETERMINISTIC[0]
    if cuda:
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


_NO_DETERMINISTIC_KERNEL = re.compile(r"^(\S+) does not have a deterministic implementation")


@contextlib.contextmanager
def deterministic_refusals():
    """Under `train.deterministic: true`, an op without a deterministic kernel (torch raises when it
    runs) becomes one line naming the op, instead of a traceback from inside backward."""
    try:
        yield
    except RuntimeError as exc:
        found = _NO_DETERMINISTIC_KERNEL.match(str(exc))
        if not found:
            raise
        raise UserError(
            f"train.deterministic=true: the model or loss uses {found.group(1)}, which has no deterministic "
            "implementation on this device (torchvision's segmenters: bilinear upsampling backward and the "
            "2-D NLL loss on CUDA); set train.deterministic=false for this model"
        ) from None


def is_conv_net(model: nn.Module) -> bool:
    """Whether most of the model's compute is convolutions (channels_last helps those)."""
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and convs >= 0.2 * total


def convert_model(model: nn.Module, sync_bn: bool, device_type: str, num_processes: int) -> nn.Module:
    """SyncBatchNorm (model.sync_bn) and channels_last, before the model is wrapped."""
    if sync_bn:
        if device_type != "cuda":
            raise UserError(
                "model.sync_bn=true needs CUDA (torch's SyncBatchNorm only runs on GPUs); on a CPU set "
                "model.freeze_bn=true for the same training at every world size, or model.sync_bn=false"
            )
        if num_processes > 1:
            model = convert_sync_batchnorm(model)
    if device_type == "cuda" and is_conv_net(model):
        model = model.to(memory_format=torch.channels_last)
    return model


# BatchNorm classes whose forward is exactly BatchNorm's: torch's converter keeps what they compute
_PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm without changing what the model computes.

    torch's `convert_sync_batchnorm` rebuilds every `_BatchNorm` as a plain SyncBatchNorm, so a
    subclass that does more in its forward loses it: timm's `BatchNormAct2d` (EfficientNet,
    MobileNetV3, CSP nets...) holds the activation and drop path, and the converted model ran
    without them (issue 26: mobilenetv3_small_050's outputs moved by up to 57). timm's converter
    makes those `SyncBatchNormAct`s with the same activation; any other BatchNorm subclass is
    refused rather than converted into something else."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # exact types: timm's BatchNormAct2d is a BatchNorm2d subclass
    other = sorted({type(m).__name__ for m in norms if type(m) not in _PLAIN_BATCHNORM})
    if other:
        try:
            from timm.layers import BatchNormAct2d
            from timm.layers import convert_sync_batchnorm as timm_convert
        except ImportError:
            BatchNormAct2d, timm_convert = None, None
        unknown = sorted({type(m).__name__ for m in norms if type(m) not in (*_PLAIN_BATCHNORM, BatchNormAct2d)})
        if unknown or timm_convert is None:
            raise UserError(
                f"model.sync_bn=true: the model's {', '.join(unknown or other)} layers are BatchNorm with more in "
                "their forward, which SyncBatchNorm would drop; set model.sync_bn=false (or model.freeze_bn=true)"
            )
        return timm_convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def channels_last(device_type: str, model: nn.Module) -> bool:
    """Whether inputs should be channels_last (the model was converted by `convert_model`)."""
    return device_type == "cuda" and is_conv_net(model)


def check_compile(device_type: str) -> None:
    """One line when torch.compile cannot work here."""
    if not torch._dynamo.is_dynamo_supported():
        raise UserError(
            f"train.compile=true: torch.compile does not support Python {sys.version_info.major}."
            f"{sys.version_info.minor} with torch {torch.__version__}; set train.compile=false"
        )
    if device_type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise UserError(
            "train.compile=true on a CPU needs a C++ compiler (g++ or clang++) on PATH for torch.compile's "
            "code generation; install one (e.g. apt-get install g++) or set train.compile=false"
        )


def compile_model(model: nn.Module, device_type: str) -> nn.Module:
    check_compile(device_type)
    return torch.compile(model)
