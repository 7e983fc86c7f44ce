"""timm models (`model.name: timm/<name>`): head, blocks, normalization and size from timm itself;
weights from the Hugging Face cache or a file; training, freezing, lr plot and 1 vs 2 processes.

Small models with random weights at 32 px: resnet18 (BatchNorm), convnext_atto (LayerNorm, no
dropout: the 2-process model), vit_tiny_patch16_224 (set to 32 px: 2x2 patches).

python -m pytest tests/test_timm.py -q
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datagen import make_image_folder
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, read_summary, tiny_config
from safetensors.torch import load_file, save_file

from ddp_finetune.config import ModelConfig, OptimConfig, load_config
from ddp_finetune.errors import UserError
from ddp_finetune.models import build_model
from ddp_finetune.training.param_groups import build_param_groups

pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (the test extra)")

SIZE = 32
CASES = {  # name: (head prefixes, first blocks, last block)
    "resnet18": (("fc",), ["stem", "layer1.0", "layer1.1"], "layer4.1"),
    "convnext_atto": (("head.fc",), ["stem", "stages.0.blocks.0"], "head.norm"),
    "vit_tiny_patch16_224": (("head",), ["stem", "blocks.0"], "blocks.11+norm"),
}


def build(name, num_classes=5, meta=False, **model):
    return build_model(ModelConfig(name=f"timm/{name}", **model), num_classes, image_size=SIZE, meta=meta)


# --------------------------------------------------------------------------- build


@pytest.mark.parametrize("name", list(CASES))
def test_parts_from_timm_and_one_training_step(name):
    heads, first, last = CASES[name]
    torch.manual_seed(0)
    model, parts, report = build(name)
    cfg = model.pretrained_cfg
    assert parts.head_prefixes == parts.head_layers == heads and report.heads == list(heads)
    assert model.get_classifier().weight.shape[0] == 5 and model.get_submodule(heads[0]) is model.get_classifier()
    assert parts.mean == tuple(cfg["mean"]) and parts.std == tuple(cfg["std"]) and parts.input_size == 224
    assert parts.aux_weight == 0.0
    names = [b for b, _ in parts.blocks]
    assert names[: len(first)] == first and names[-1] == last and len(set(names)) == len(names)
    backbone = [n for _, block in parts.blocks for n in block]
    assert sorted(backbone) == sorted(n for n, _ in model.named_parameters() if not parts.is_head(n))
    assert len(backbone) == len(set(backbone))
    # the lr plot's meta-device build has the same parts
    meta_model, meta_parts, _ = build(name, meta=True)
    assert meta_parts == parts and all(p.is_meta for p in meta_model.parameters())

    model.train()
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 4])
    logits = model(x)
    assert logits.shape == (2, 5)
    head = model.get_classifier().weight
    before = head.detach().clone()
    torch.nn.functional.cross_entropy(logits, y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, head.detach())


def test_vit_is_set_to_the_image_size():
    model, parts, _ = build("vit_tiny_patch16_224")
    assert model.pos_embed.shape == (1, 1 + (SIZE // 16) ** 2, 192)
    assert parts.mean == (0.5, 0.5, 0.5)  # this model's own statistics, not ImageNet's


def test_layer_decay_follows_timms_group_matcher():
    model, parts, _ = build("resnet18")
    groups = build_param_groups(model, parts, OptimConfig(lr=0.1, head_lr=0.2, layer_decay=0.5, weight_decay=0))
    depth = {g["name"]: g["depth"] for g in groups}
    assert list(depth) == ["backbone.stem"] + [f"backbone.layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["head"]
    assert depth["backbone.layer4.1"] == 1 and depth["backbone.stem"] == 9 and depth["head"] == 0
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone.layer4.0"] == pytest.approx(0.1 * 0.5**2) and lrs["head"] == 0.2


def test_bad_names_and_tasks_are_one_line_errors():
    with pytest.raises(UserError, match="did you mean timm/resnet18"):
        build("resnet18x")
    with pytest.raises(UserError, match=r"no such pretrained tag \(tags: .*resnet18.a1_in1k"):
        build("resnet18.not_a_tag")
    with pytest.raises(UserError, match="task=segmentation takes a torchvision segmenter"):
        build_model(ModelConfig(name="timm/resnet18"), 3, "segmentation")
    with pytest.raises(UserError, match="model.weights='IMAGENET1K_V1' for a timm model"):
        build("resnet18", weights="IMAGENET1K_V1")


# --------------------------------------------------------------------------- weights


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (huggingface_hub reads its location at call time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _put_in_cache(cache, repo: str, state: dict) -> None:
    """What `huggingface-cli download <repo> model.safetensors` leaves in the cache."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(root / "snapshots" / commit / "model.safetensors"))


def test_default_weights_from_the_hugging_face_cache(hf_cache):
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("resnet18")  # stands in for timm/resnet18.a1_in1k
    _put_in_cache(hf_cache, "timm/resnet18.a1_in1k", reference.state_dict())
    model, _, report = build("resnet18", weights="DEFAULT")
    assert torch.equal(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert model.fc.weight.shape == (5, 512)
    assert report.source == "hf-hub:timm/resnet18.a1_in1k" and report.describe().startswith("weights: DEFAULT")


def test_default_weights_offline_name_the_repo_and_the_cache(hf_cache):
    with pytest.raises(UserError) as info:
        build("convnext_atto", weights="DEFAULT")
    message = str(info.value)
    assert "\n" not in message
    assert "timm/convnext_atto.d2_in1k" in message and str(hf_cache) in message and "HF_HUB_OFFLINE" in message
    assert "https://huggingface.co/timm/convnext_atto.d2_in1k/resolve/main/model.safetensors" in message


def test_local_file_at_the_native_size_is_resampled_to_the_image_size(tmp_path):
    import timm

    torch.manual_seed(4)
    native = timm.create_model("vit_tiny_patch16_224")  # 224 px, 1000 classes
    save_file(native.state_dict(), str(tmp_path / "vit.safetensors"))
    model, _, report = build("vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"))
    assert torch.equal(model.blocks[3].attn.qkv.weight, native.blocks[3].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 5, 192) and sorted(report.skipped_head_keys) == ["head.bias", "head.weight"]
    assert report.missing_keys == [] and report.unexpected_keys == []
    # a file saved at the image size (e.g. a run's final weights) loads as it is
    torch.save(model.state_dict(), tmp_path / "small.pth")
    again, _, _ = build("vit_tiny_patch16_224", weights=str(tmp_path / "small.pth"), load_head=True)
    assert torch.equal(again.pos_embed, model.pos_embed) and torch.equal(again.head.weight, model.head.weight)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("timm") / "images", per_class=8, size=16)


def timm_config(tmp_path, images, name, **sections):
    model = {"name": f"timm/{name}", "freeze_bn": True, **sections.pop("model", {})}
    data = {"image_size": SIZE, **sections.pop("data", {})}
    return tiny_config(tmp_path, images, model=model, data=data, **sections)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_one_training_step_through_fit(tmp_path, images, name):
    config = timm_config(tmp_path, images, name, train={"epochs": 1, "max_steps": 1})
    summary = fit_in_process(config)
    assert summary["steps"] == 1 and set(summary["val"]) >= {"loss", "top1"}
    weights = load_weights(tmp_path / "run")
    assert weights[CASES[name][0][0] + ".weight"].shape[0] == 3


@pytest.mark.slow
def test_frozen_then_unfrozen_with_layer_decay_and_the_lr_plot(tmp_path, images):
    """resnet18 (timm): backbone frozen in epoch 0, layer decay from timm's groups; the lr plot
    simulates exactly the lrs the run logged."""
    from accelerate.utils import set_seed

    from ddp_finetune.commands.lr_plot import lr_plot_command, simulate_lrs

    config = timm_config(
        tmp_path,
        images,
        "resnet18",
        model={"freeze_backbone": True, "unfreeze_at_epoch": 1},
        optim={"lr": 0.01, "head_lr": 0.03, "layer_decay": 0.7},
        schedule={"name": "CosineAnnealingLR", "warmup_steps": 2},
        checkpoint={"keep_last": 5},
    )
    fit_in_process(config)
    cfg = load_config(config)
    set_seed(cfg.seed)  # what the run does before building the model: its initial weights
    initial, parts, _ = build_model(cfg.model, 3, image_size=SIZE)
    start = {k: v for k, v in initial.state_dict().items() if not parts.is_head(k)}
    after_epoch0 = load_file(str(tmp_path / "run" / "checkpoints" / "step_3" / "model.safetensors"))
    final = load_weights(tmp_path / "run")
    assert all(torch.equal(start[k], after_epoch0[k]) for k in start), "the backbone moved while frozen"
    assert not all(torch.equal(start[k], final[k]) for k in start), "the backbone did not train after unfreezing"

    logged = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    simulated = simulate_lrs(cfg, 3)
    assert [r["lr/head"] for r in logged] == simulated["lr/head"]
    assert [r["lr/backbone"] for r in logged] == simulated["lr/backbone.layer4.1"]  # the block nearest the head
    assert simulated["lr/backbone.stem"][-1] == pytest.approx(simulated["lr/backbone.layer4.1"][-1] * 0.7**8)
    png = lr_plot_command(config, [], tmp_path / "lr.png", steps_per_epoch=3)
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_timm_model(tmp_path, images):
    """convnext_atto: LayerNorm and no dropout, so nothing depends on the rank; augmentation on."""
    sections = dict(data={"augment": True}, train={"epochs": 2, "batch_size": 6, "eval_batch_size": 4})
    one = timm_config(tmp_path / "one", images, "convnext_atto", **sections)
    two = timm_config(tmp_path / "two", images, "convnext_atto", **sections)
    fit_in_process(one)
    proc = launch_2proc("train", two)
    assert "world size 2" in proc.stdout
    s1, s2 = read_summary(tmp_path / "one" / "run"), read_summary(tmp_path / "two" / "run")
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["steps"] == s2["steps"] == 6
    assert max_abs_diff(load_weights(tmp_path / "one" / "run"), load_weights(tmp_path / "two" / "run")) <= 1e-5
    assert s2["val"]["top1"] == s1["val"]["top1"] and s2["val"]["loss"] == pytest.approx(s1["val"]["loss"], abs=1e-5)
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "run") if r["split"] == "train"]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "run") if r["split"] == "train"]
    assert l2 == pytest.approx(l1, abs=1e-5)


# --------------------------------------------------------------------------- evaluation crop, stochastic depth, checkpointing


def test_the_models_evaluation_crop_and_interpolation_reach_validation_and_the_card(tmp_path, images):
    """resnet18.a1_in1k's pretrained_cfg says crop_pct 0.95, bicubic (torchvision's evaluation: 0.875, bilinear)."""
    import timm

    from ddp_finetune.data.datasets import ImageDataset
    from ddp_finetune.data.transforms import eval_view
    from ddp_finetune.models.folder import make_card

    _, parts, _ = build("resnet18.a1_in1k", meta=True)
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    assert (parts.crop_pct, parts.interpolation) == (cfg.crop_pct, cfg.interpolation) == (0.95, "bicubic")
    run_cfg = load_config(timm_config(tmp_path, images, "resnet18.a1_in1k"))
    card = make_card(run_cfg, ["a", "b", "c"], 3, parts)
    assert (card.crop_pct, card.interpolation) == (0.95, "bicubic")
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    ours = eval_view(image, 32, False, card.crop_pct, card.interpolation)
    from torchvision.transforms import v2

    expected = v2.Compose([v2.Resize(round(32 / 0.95), interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(32)])
    assert torch.equal(ours, expected(image))
    assert not torch.equal(ours, eval_view(image, 32))  # torchvision's 0.875 bilinear differs
    # a run's validation set is given the model's crop (run.build_run), and final/model.json says it
    from helpers import fresh_accelerate

    from ddp_finetune.training.run import build_run

    with fresh_accelerate():
        run = build_run(run_cfg)
        val = run.val_loader.dataset
        assert isinstance(val, ImageDataset) and val.eval_crop == (0.95, "bicubic")
        run.accelerator.end_training()


def test_drop_path_rate_and_grad_checkpointing_reach_the_model():
    model, _, _ = build("convnext_atto", drop_path_rate=0.3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)
    model, _, _ = build("convnext_atto", grad_checkpointing=True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    model.train()
    model(x).sum().backward()  # recomputed in backward, gradients still arrive
    assert x.grad is not None and torch.isfinite(x.grad).all()
    from torchvision.ops import StochasticDepth

    tv, _, _ = build_model(ModelConfig(name="efficientnet_b0", drop_path_rate=0.4), 3)
    assert max(m.p for m in tv.modules() if isinstance(m, StochasticDepth)) == pytest.approx(0.4 * 15 / 16)
    with pytest.raises(UserError, match="resnet18 has no stochastic depth"):
        build_model(ModelConfig(name="resnet18", drop_path_rate=0.1), 3)
    with pytest.raises(UserError, match="no checkpointing switch"):
        build_model(ModelConfig(name="resnet18", grad_checkpointing=True), 3)
    dense, _, _ = build_model(ModelConfig(name="densenet121", grad_checkpointing=True), 3)
    assert all(m.memory_efficient for m in dense.modules() if type(m).__name__ == "_DenseLayer")


def test_predict_crops_as_the_model_was_evaluated(tmp_path, images):
    from PIL import Image

    from ddp_finetune.data.transforms import eval_view
    from ddp_finetune.inference.predict import input_transform
    from ddp_finetune.models.folder import make_card

    _, parts, _ = build("resnet18.a1_in1k", meta=True)
    card = make_card(load_config(timm_config(tmp_path, images, "resnet18.a1_in1k")), ["a", "b", "c"], 3, parts)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(input_transform(card)(pil), eval_view(image, SIZE, False, 0.95, "bicubic"))
