"""Model families: build by name, replace the head, train one step; weights from every source;
every torchvision model resolves to Parts."""

import sys
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ddp_finetune.config import ModelConfig
from ddp_finetune.errors import UserError
from ddp_finetune.models import build_model, split_outputs, torchvision_families
from ddp_finetune.models.weights import cached_weights_path, resolve_enum

FAMILIES = {
    # name: (input side, expected head layers)
    "resnet18": (32, ["fc"]),
    "mobilenet_v3_small": (32, ["classifier.3"]),
    "efficientnet_b0": (32, ["classifier.1"]),
    "convnext_tiny": (32, ["classifier.2"]),
    "densenet121": (32, ["classifier"]),
    "squeezenet1_0": (64, ["classifier.1"]),
    "regnet_y_400mf": (32, ["fc"]),
    "googlenet": (64, ["fc", "aux1.fc2", "aux2.fc2"]),
    "swin_t": (64, ["head"]),
    "vit_b_32": (224, ["heads.head"]),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_head_swap_and_one_training_step(name):
    side, expected_heads = FAMILIES[name]
    torch.manual_seed(0)
    model, parts, report = build_model(ModelConfig(name=name), num_classes=7)
    assert report.heads == expected_heads == list(parts.head_prefixes) == list(parts.head_layers)
    for head in expected_heads:
        assert model.get_submodule(head).weight.shape[0] == 7
    model.train()
    x, y = torch.randn(2, 3, side, side), torch.tensor([1, 6])
    logits, aux = split_outputs(model(x))
    assert logits.shape == (2, 7)
    assert len(aux) == len(expected_heads) - 1 and parts.aux_weight == (0.3 if aux else 0.0)
    loss = torch.nn.functional.cross_entropy(logits, y) + sum(
        parts.aux_weight * torch.nn.functional.cross_entropy(a, y) for a in aux
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head = model.get_submodule(expected_heads[0]).weight
    before = head.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, head.detach()), "the new head must train"
    assert torch.isfinite(loss)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="did you mean resnet18"):
        build_model(ModelConfig(name="resnet19"), 3)


def _save_resnet(tmp_path, classes, suffix):
    torch.manual_seed(1)
    src = torchvision.models.resnet18(num_classes=classes)
    path = tmp_path / f"src{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    return src, path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_loaded_with_a_fresh_head(tmp_path, suffix):
    src, path = _save_resnet(tmp_path, classes=5, suffix=suffix)
    model, parts, report = build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=3)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (3, 512)
    assert sorted(report.skipped_head_keys) == ["fc.bias", "fc.weight"]
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.source == str(path) and "new head fc; head keys not loaded: fc." in report.describe()
    assert parts.mean == (0.485, 0.456, 0.406) and parts.input_size is None  # a file says nothing: ImageNet's


def test_local_weights_with_head_when_asked(tmp_path):
    src, path = _save_resnet(tmp_path, classes=3, suffix=".safetensors")
    model, _, _ = build_model(ModelConfig(name="resnet18", weights=str(path), load_head=True), num_classes=3)
    assert torch.equal(model.fc.weight, src.fc.weight)


def test_headless_file_reports_missing_keys(tmp_path):
    src = torchvision.models.resnet18()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("layer4.1.")}
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    _, _, report = build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=3)
    assert "layer4.1.conv1.weight" in report.missing_keys
    assert report.unexpected_keys == ["extra.weight"]


def test_wrong_architecture_file_is_an_error(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(UserError, match="architecture"):
        build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=3)


def test_missing_and_corrupt_local_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        build_model(ModelConfig(name="resnet18", weights=str(tmp_path / "nope.pth")), 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt"):
        build_model(ModelConfig(name="resnet18", weights=str(bad)), 3)


def test_enum_weights_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = resolve_enum("resnet18", "IMAGENET1K_V1")
    cached = cached_weights_path(enum)
    assert str(cached).startswith(str(tmp_path / "torch" / "hub" / "checkpoints"))
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)  # stands in for the downloaded file
    model, parts, report = build_model(ModelConfig(name="resnet18", weights="IMAGENET1K_V1"), num_classes=4)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.weight.shape == (4, 512)
    assert parts.mean == (0.485, 0.456, 0.406) and parts.std == (0.229, 0.224, 0.225) and parts.input_size == 224
    assert report.source == str(cached)


def test_enum_weights_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(name="resnet18", weights="DEFAULT"), 3)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch") in message


def test_enum_weights_corrupt_cache_says_which_file_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = cached_weights_path(resolve_enum("resnet18", "DEFAULT"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(UserError, match=f"{cached}.*delete it"):
        build_model(ModelConfig(name="resnet18", weights="DEFAULT"), 3)


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_model(ModelConfig(name="resnet18", weights="IMAGENET22K"), 3)


# --------------------------------------------------------------------------- every family


def _meta_parts_cases():
    classifiers = [pytest.param(n, None, id=n) for n in torchvision_families.classifier_names()]
    return classifiers + [pytest.param(n, "segmentation", id=n) for n in torchvision_families.segmenter_names()]


@pytest.mark.parametrize("name, task", _meta_parts_cases())
def test_every_torchvision_model_resolves_to_parts(name, task):
    """Every torchvision classifier and segmenter, on the meta device: the head prefixes hold the
    new layers, the blocks partition the rest in registration order, aux outputs have a weight."""
    model, parts, report = build_model(ModelConfig(name=name), 5, task, meta=True)
    assert all(p.is_meta for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    for prefix in parts.head_prefixes:
        assert any(n.startswith(prefix + ".") for n in names), prefix
    for layer in parts.head_layers:  # inside the head, with the new classes
        assert parts.is_head(layer) and model.get_submodule(layer).weight.shape[0] == 5, layer
    assert report.heads == list(parts.head_layers)
    flat = [n for _, block in parts.blocks for n in block]
    assert flat == [n for n in names if not parts.is_head(n)], "blocks partition the backbone, input to output"
    assert len(parts.blocks) >= 3 and len({b for b, _ in parts.blocks}) == len(parts.blocks)
    has_aux = len(parts.head_prefixes) > 1
    assert (parts.aux_weight > 0) == has_aux


def test_a_family_without_an_entry_names_the_file(monkeypatch):
    monkeypatch.delitem(torchvision_families.FAMILIES, "resnet")
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(name="resnet18"), 3)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "torchvision.models.resnet" in message
        and "needs an entry in ddp_finetune/models/torchvision_families.py" in message
    )


def test_a_timm_name_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(UserError, match=r"needs timm; install it with pip install 'ddp-finetune\[timm\]'"):
        build_model(ModelConfig(name="timm/resnet18"), 3)
