"""How the model runs on the hardware: channels_last, SyncBatchNorm, torch.compile, TF32 switches.

The CUDA variants are the same tests with device "cuda" (skipped without a GPU), so the CPU runs
keep their code paths alive."""

import os

import pytest
import torch
import torchvision
from helpers import fit_in_process, load_weights, max_abs_diff, run_cli, tiny_config

from ddp_finetune.errors import UserError
from ddp_finetune.training import performance

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])]


def test_conv_nets_are_told_apart_from_transformers():
    assert performance.is_conv_net(torchvision.models.resnet18())
    assert performance.is_conv_net(torchvision.models.mobilenet_v3_small())
    assert not performance.is_conv_net(torchvision.models.vit_b_16())


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_only_for_conv_nets_on_cuda(device):
    model = performance.convert_model(torchvision.models.resnet18().to(device), False, device, 1)
    conv = model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == (device == "cuda")
    assert performance.channels_last(device, model) == (device == "cuda")
    vit = performance.convert_model(torchvision.models.vit_b_16().to(device), False, device, 1)
    assert not performance.channels_last(device, vit)


@pytest.mark.parametrize("device", DEVICES)
def test_sync_bn_needs_cuda_and_several_processes(device):
    model = torchvision.models.resnet18().to(device)
    if device == "cpu":
        with pytest.raises(UserError, match="model.freeze_bn=true"):
            performance.convert_model(model, True, device, 2)
        return
    converted = performance.convert_model(model, True, device, 2)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    # one process: nothing to synchronize, plain BatchNorm stays
    single = performance.convert_model(torchvision.models.resnet18().to(device), True, device, 1)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in single.modules())


def test_sync_bn_on_cpu_is_one_line_exit_2(tmp_path, image_folder):
    proc = run_cli("train", tiny_config(tmp_path, image_folder), "model.sync_bn=true", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "model.freeze_bn" in lines[0], proc.stderr[-2000:]


def test_deterministic_switch_is_set_both_ways():
    try:
        performance.configure_backends(cuda=False, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        performance.configure_backends(cuda=False, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(performance.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        performance.check_compile("cpu")


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, image_folder):
    """torch.compile (inductor, CPU code generation) trains the same model as eager, up to kernel rounding."""
    sections = dict(model={"name": "mobilenet_v3_small", "freeze_bn": True}, train={"epochs": 1})
    fit_in_process(tiny_config(tmp_path / "eager", image_folder, **sections), "train.max_steps=2")
    fit_in_process(
        tiny_config(tmp_path / "compiled", image_folder, **sections), "train.max_steps=2", "train.compile=true"
    )
    eager, compiled = load_weights(tmp_path / "eager" / "run"), load_weights(tmp_path / "compiled" / "run")
    assert eager.keys() == compiled.keys(), "final weights are saved without torch.compile's _orig_mod prefix"
    assert max_abs_diff(eager, compiled) < 1e-4


def _sync_bn_changes_outputs(model: torch.nn.Module, device: str) -> float:
    """Largest change of the eval-mode outputs made by `convert_model(..., sync_bn=True, 2 processes)`.
    In eval mode SyncBatchNorm uses the running statistics and does not communicate, so this runs
    on a CPU too (the device is only a string to convert_model)."""
    torch.manual_seed(0)
    model = model.to(device).eval()
    for m in model.modules():  # non-trivial statistics, so a dropped BatchNorm detail would show
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        before = model(x).float()
        converted = performance.convert_model(model, True, "cuda", 2).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        after = converted(x.contiguous(memory_format=torch.channels_last)).float()
    return (before - after).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet18", "timm/mobilenetv3_small_050", "timm/efficientnet_b0"])
def test_sync_bn_conversion_keeps_what_the_model_computes(device, name):
    """torch's converter drops timm's BatchNormAct2d activations (issue 26 item 1): the timm models'
    outputs moved by tens before the fix; now they are the same model before and after."""
    if name.startswith("timm/"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=5)
    else:
        model = getattr(torchvision.models, name)(num_classes=5)
    assert _sync_bn_changes_outputs(model, device) < 1e-4


def test_sync_bn_refuses_a_batchnorm_subclass_it_cannot_convert():
    class ScaledBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), ScaledBN(4))
    with pytest.raises(UserError, match="ScaledBN"):
        performance.convert_model(model, True, "cuda", 2)


def test_deterministic_is_strict_and_sets_the_cublas_workspace(monkeypatch):
    """issue 26 item 4: `warn_only=True` let ops without a deterministic kernel run (warning only),
    and cuBLAS's workspace setting was never made: not the bit-identical reruns promised."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        performance.configure_backends(cuda=True, deterministic=True)  # the device is only a flag here
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's deterministic choice is kept
        performance.configure_backends(cuda=True, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32


def test_an_op_without_a_deterministic_kernel_is_one_line():
    """On a GPU it is bilinear upsampling's backward (every torchvision segmenter); on a CPU `put_`
    has none either, so the same refusal runs here."""
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(UserError, match=r"train.deterministic=true: the model or loss uses put_, which"):
            with performance.deterministic_refusals():
                torch.zeros(4).put_(torch.tensor([0]), torch.tensor([1.0]))
        with pytest.raises(RuntimeError, match="other"):  # other errors pass through
            with performance.deterministic_refusals():
                raise RuntimeError("other")
    finally:
        torch.use_deterministic_algorithms(False)


def _seg_folder(tmp_path):
    from datagen import make_mask_disk

    return make_mask_disk(tmp_path / "seg", n=12)


DETERMINISTIC_RUNS = {
    "classification": dict(model={"name": "resnet18"}),
    "segmentation": dict(
        task="segmentation",
        data={"image_size": 32, "source": "disk"},
        model={"name": "lraspp_mobilenet_v3_large", "freeze_bn": True},
    ),
}


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_deterministic_reruns_are_bit_identical_on_cpu(tmp_path, image_folder, task):
    """The strict mode refuses nothing a CPU run uses (the CPU kernels of bilinear backward and NLL are
    deterministic), and two runs give the same bits."""
    data = image_folder if task == "classification" else _seg_folder(tmp_path)
    sections = DETERMINISTIC_RUNS[task]
    try:
        for run in ("a", "b"):
            config = tiny_config(tmp_path / run, data, **sections)
            fit_in_process(config, "train.max_steps=2", "train.deterministic=true", "data.augment=false")
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = load_weights(tmp_path / "a" / "run"), load_weights(tmp_path / "b" / "run")
    assert max_abs_diff(a, b) == 0


@gpu
@pytest.mark.gpu
def test_deterministic_cuda_reruns_are_bit_identical(tmp_path, image_folder):
    """Two CUDA runs with train.deterministic=true (each its own process: cuBLAS reads its workspace
    setting once) end with the same bits."""
    for run in ("a", "b"):
        config = tiny_config(tmp_path / run, image_folder, **DETERMINISTIC_RUNS["classification"])
        run_cli("train", config, "train.max_steps=3", "train.deterministic=true")
    a, b = load_weights(tmp_path / "a" / "run"), load_weights(tmp_path / "b" / "run")
    assert max_abs_diff(a, b) == 0


@gpu
@pytest.mark.gpu
def test_deterministic_cuda_segmenter_is_refused_with_one_line(tmp_path):
    """torchvision's segmenters upsample bilinearly, whose CUDA backward has no deterministic kernel
    (and the 2-D NLL loss none in its forward): one line naming the op, exit 2."""
    config = tiny_config(tmp_path, _seg_folder(tmp_path), **DETERMINISTIC_RUNS["segmentation"])
    proc = run_cli("train", config, "train.max_steps=2", "train.deterministic=true", check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "train.deterministic=true: the model or loss uses" in errors[0], proc.stderr[-3000:]
