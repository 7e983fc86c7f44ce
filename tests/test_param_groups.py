"""Parameter groups: partition, lrs, weight decay, layer decay, freezing.

python -m pytest tests/test_param_groups.py -q
"""

import warnings

import pytest
import torch
import torchvision
from torch import nn

from ddp_finetune.config import ModelConfig, OptimConfig
from ddp_finetune.errors import UserError
from ddp_finetune.models import head_prefixes
from ddp_finetune.param_groups import (
    apply_static_freeze,
    backbone_blocks,
    backbone_frozen,
    build_param_groups,
    describe_groups,
    drop_frozen_grads,
    is_head,
    lr_log,
    make_optimizer,
    set_bn_eval,
    uses_static_freeze,
)

NUM_CLASSES = 7

# The replaced head of each family, written out (models.head_prefixes must agree).
HEADS = {
    "resnet18": ["fc"],
    "regnet_y_400mf": ["fc"],
    "shufflenet_v2_x0_5": ["fc"],
    "mobilenet_v3_small": ["classifier.3"],
    "efficientnet_b0": ["classifier.1"],
    "convnext_tiny": ["classifier.2"],
    "vgg11": ["classifier.6"],
    "mnasnet0_5": ["classifier.1"],
    "maxvit_t": ["classifier.5"],
    "densenet121": ["classifier"],
    "squeezenet1_0": ["classifier.1"],
    "vit_b_16": ["heads.head"],
    "swin_t": ["head"],
    "googlenet": ["fc", "aux1.fc2", "aux2.fc2"],
    "inception_v3": ["fc", "AuxLogits.fc"],
}


def meta_model(name: str) -> nn.Module:
    """The real architecture without memory or init cost (the meta device)."""
    kwargs = {"aux_logits": True, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    device = "cpu" if name.startswith("regnet") else "meta"  # RegNet's builder needs real tensors
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES
    )


def optim(**kw) -> OptimConfig:
    base = dict(lr=0.01, head_lr=0.1, weight_decay=1e-4, no_decay_norm_bias=True, layer_decay=None)
    base.update(kw)
    return OptimConfig(**base)


def names_by_group(model, groups) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("layer_decay", [None, 0.8])
def test_groups_partition_all_parameters(name, layer_decay):
    model = meta_model(name)
    heads = HEADS[name]
    groups = build_param_groups(model, heads, optim(layer_decay=layer_decay))

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing"
    assert all(g["params"] for g in groups)

    # The head groups hold exactly the head; each head prefix really is the new classifier.
    by_group = names_by_group(model, groups)
    head_names = {n for g in groups if g["role"] == "head" for n in by_group[g["name"]]}
    assert head_names == {n for n, _ in model.named_parameters() if is_head(n, heads)}
    for prefix in heads:
        weight = dict(model.named_parameters())[prefix + ".weight"]
        assert weight.shape[0] == NUM_CLASSES
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    assert names[-1].startswith("head")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_models_head_prefixes_agree_with_the_table(name):
    assert head_prefixes(meta_model(name)) == HEADS[name]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_backbone_blocks_are_contiguous_and_cover_the_backbone(name):
    model = meta_model(name)
    heads = HEADS[name]
    blocks = backbone_blocks(model, heads)
    flat = [n for _, names in blocks for n in names]
    backbone = [n for n, _ in model.named_parameters() if not is_head(n, heads)]
    # Concatenating the blocks gives the backbone in registration (input-to-output) order.
    assert flat == backbone
    assert len(blocks) >= 3
    assert len({b for b, _ in blocks}) == len(blocks)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("regnet_y_400mf", ["stem"] + [f"trunk_output.block{i}" for i in range(1, 5)]),
        ("swin_t", [f"features.{i}" for i in range(8)] + ["norm"]),
        ("convnext_tiny", [f"features.{i}" for i in range(8)] + ["classifier"]),
        ("mobilenet_v3_small", [f"features.{i}" for i in range(13)] + ["classifier"]),
        ("maxvit_t", ["stem"] + [f"blocks.{i}" for i in range(4)] + ["classifier"]),
    ],
)
def test_backbone_block_names(name, expected):
    assert [b for b, _ in backbone_blocks(meta_model(name), HEADS[name])] == expected


def test_vit_blocks_stem_layers_final_norm():
    model = small_vit()
    blocks = dict(backbone_blocks(model, ["heads.head"]))
    assert list(blocks) == ["stem", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder.ln"]
    assert set(blocks["stem"]) == {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}


# --------------------------------------------------------------------------- lrs and decay


def test_head_lr_and_layer_decay_per_group():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    cfg = optim(lr=0.02, head_lr=0.3, layer_decay=0.5)
    groups = build_param_groups(model, ["fc"], cfg)
    depth = {"layer4": 1, "layer3": 2, "layer2": 3, "layer1": 4, "stem": 5}
    seen = set()
    for g in groups:
        assert g["base_lr"] == g["lr"]
        block = g["name"].removesuffix("_no_decay")
        if block == "head":
            assert g["lr"] == pytest.approx(0.3)
            continue
        b = block.removeprefix("backbone.")
        seen.add(b)
        assert g["depth"] == depth[b]
        assert g["lr"] == pytest.approx(0.02 * 0.5 ** depth[b])
    assert seen == set(depth)

    log = lr_log(make_optimizer(groups, cfg))
    assert log == {"lr/head": pytest.approx(0.3), "lr/backbone": pytest.approx(0.02 * 0.5)}  # layer4's
    per_block = lr_log(make_optimizer(groups, cfg), per_block=True)
    assert per_block["lr/backbone.stem"] == pytest.approx(0.02 * 0.5**5)
    assert not any(k.endswith("_no_decay") for k in per_block)


def test_head_lr_null_means_lr_and_plain_group_names():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    groups = build_param_groups(model, ["fc"], optim(lr=0.05, head_lr=None))
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert {g["lr"] for g in groups} == {0.05}
    assert lr_log(make_optimizer(groups, optim())) == {"lr/head": 0.05, "lr/backbone": 0.05}


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_t"])
def test_no_decay_holds_norm_weights_and_biases(name):
    model = meta_model(name)
    groups = build_param_groups(model, HEADS[name], optim(weight_decay=0.05))
    no_decay = {id(p) for g in groups if g["name"].endswith("_no_decay") for p in g["params"]}
    # In these models the 1-D parameters are exactly the norm weights/biases and the biases.
    assert no_decay == {id(p) for p in model.parameters() if p.ndim == 1}
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.05)
    # Twins share their lr.
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head_no_decay"] == lrs["head"] and lrs["backbone_no_decay"] == lrs["backbone"]


def test_no_split_without_weight_decay_or_when_disabled():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    for cfg in (optim(weight_decay=0.0), optim(weight_decay=0.1, no_decay_norm_bias=False)):
        groups = build_param_groups(model, ["fc"], cfg)
        assert [g["name"] for g in groups] == ["backbone", "head"]
        assert {g["weight_decay"] for g in groups} == {cfg.weight_decay}


def test_make_optimizer_keeps_group_settings():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    groups = build_param_groups(model, ["fc"], optim(layer_decay=0.7))
    sgd = make_optimizer(groups, optim(momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["lr"] for g in sgd.param_groups] == [g["lr"] for g in groups]
    assert {g["momentum"] for g in sgd.param_groups} == {0.8}
    adamw = make_optimizer(build_param_groups(model, ["fc"], optim()), optim(name="adamw", betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW)
    assert {g["betas"] for g in adamw.param_groups} == {(0.8, 0.99)}
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0, 1e-4, 0.0]
    with pytest.raises(UserError, match="optim.name"):
        make_optimizer(groups, optim(name="lamb"))


def test_describe_groups_lists_every_group():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    groups = build_param_groups(model, ["fc"], optim())
    text = describe_groups(groups)
    assert len(text.splitlines()) == len(groups) + 1
    head_count = sum(p.numel() for p in model.fc.parameters() if p.ndim > 1)
    assert f"{head_count:,} params" in text
    for g in groups:
        assert g["name"] in text


def test_head_prefix_matching_nothing_is_a_user_error():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    with pytest.raises(UserError, match="match no parameter"):
        build_param_groups(model, ["classifier.6"], optim())
    # A missing aux head is fine as long as the main head matches (googlenet without aux logits).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torchvision.models.googlenet(
            weights=None, num_classes=NUM_CLASSES, aux_logits=False, init_weights=False
        )
    groups = build_param_groups(plain, HEADS["googlenet"], optim())
    assert (
        sum(p.numel() for g in groups if g["role"] == "head" for p in g["params"]) == 1024 * NUM_CLASSES + NUM_CLASSES
    )


# --------------------------------------------------------------------------- freezing


def test_backbone_frozen_by_epoch():
    assert not backbone_frozen(0, ModelConfig(freeze_backbone=False))
    static = ModelConfig(freeze_backbone=True)
    assert uses_static_freeze(static) and backbone_frozen(0, static) and backbone_frozen(99, static)
    gradual = ModelConfig(freeze_backbone=True, unfreeze_at_epoch=2)
    assert not uses_static_freeze(gradual)
    assert [backbone_frozen(e, gradual) for e in range(4)] == [True, True, False, False]


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_drop_frozen_grads_keeps_backbone_bit_identical_then_unfreezes(opt_name):
    model = _tiny_cnn()
    heads = ["6"]
    cfg = optim(name=opt_name, lr=0.1, head_lr=0.1, weight_decay=0.1)
    optimizer = make_optimizer(build_param_groups(model, heads, cfg), cfg)
    wrapped = nn.DataParallel(model)  # names under a wrapper carry a "module." prefix
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])

    def train_step(frozen: bool) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        if frozen:
            assert drop_frozen_grads(wrapped, heads) == 4  # conv w/b, bn w/b
        optimizer.step()

    for _ in range(3):
        train_step(frozen=True)
    for n, p in model.named_parameters():
        if n.startswith("6."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
            assert p not in optimizer.state  # no momentum / Adam moments accumulated
    train_step(frozen=False)
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_static_freeze_and_bn_eval():
    model = _tiny_cnn()
    assert apply_static_freeze(model, ["6"]) == 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["6.weight", "6.bias"]
    model.train()
    assert set_bn_eval(model) == 1
    assert not model[1].training and model[5].training  # BatchNorm fixed, dropout still active
    # Groups still hold the frozen parameters: nothing is added at unfreeze time.
    groups = build_param_groups(model, ["6"], optim())
    assert sum(len(g["params"]) for g in groups) == 6
    assert "(frozen)" in describe_groups(groups)
