"""Parameter groups: partition, lrs, weight decay, layer decay.

python -m pytest tests/test_param_groups.py -q
"""

import warnings

import pytest
import torch
import torchvision

from ddp_finetune.config import ModelConfig, OptimConfig
from ddp_finetune.errors import UserError
from ddp_finetune.models import build_model, generic_parts
from ddp_finetune.training.param_groups import build_param_groups, describe_groups, lr_log, make_optimizer

NUM_CLASSES = 7

# The replaced head of each family, written out (the models' Parts must agree).
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


def meta_model(name: str):
    """(model, parts): the real architecture without memory or init cost (the meta device)."""
    model, parts, _ = build_model(ModelConfig(name=name), NUM_CLASSES, meta=True)
    return model, parts


def resnet18():
    """(model, parts) of a real resnet18."""
    model, parts, _ = build_model(ModelConfig(name="resnet18"), NUM_CLASSES)
    return model, parts


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
    model, parts = meta_model(name)
    heads = HEADS[name]
    groups = build_param_groups(model, parts, optim(layer_decay=layer_decay))

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing"
    assert all(g["params"] for g in groups)

    # The head groups hold exactly the head; each head prefix really is the new classifier.
    by_group = names_by_group(model, groups)
    head_names = {n for g in groups if g["role"] == "head" for n in by_group[g["name"]]}
    assert head_names == {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in heads)}
    for prefix in heads:
        weight = dict(model.named_parameters())[prefix + ".weight"]
        assert weight.shape[0] == NUM_CLASSES
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    assert names[-1].startswith("head")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_models_head_prefixes_agree_with_the_table(name):
    assert list(meta_model(name)[1].head_prefixes) == HEADS[name]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_backbone_blocks_are_contiguous_and_cover_the_backbone(name):
    model, parts = meta_model(name)
    heads = HEADS[name]
    blocks = parts.blocks
    flat = [n for _, names in blocks for n in names]
    backbone = [n for n, _ in model.named_parameters() if not any(n.startswith(h + ".") for h in heads)]
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
    assert [b for b, _ in meta_model(name)[1].blocks] == expected


def test_vit_blocks_stem_layers_final_norm():
    blocks = dict(meta_model("vit_b_16")[1].blocks)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert list(blocks) == ["stem", *layers, "encoder.ln"]
    assert set(blocks["stem"]) == {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}


# --------------------------------------------------------------------------- lrs and decay


def test_head_lr_and_layer_decay_per_group():
    model, parts = resnet18()
    cfg = optim(lr=0.02, head_lr=0.3, layer_decay=0.5)
    groups = build_param_groups(model, parts, cfg)
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
    model, parts = resnet18()
    groups = build_param_groups(model, parts, optim(lr=0.05, head_lr=None))
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert {g["lr"] for g in groups} == {0.05}
    assert lr_log(make_optimizer(groups, optim())) == {"lr/head": 0.05, "lr/backbone": 0.05}


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_t"])
def test_no_decay_holds_norm_weights_and_biases(name):
    model, parts = meta_model(name)
    groups = build_param_groups(model, parts, optim(weight_decay=0.05))
    no_decay = {id(p) for g in groups if g["name"].endswith("_no_decay") for p in g["params"]}
    # In these models the 1-D parameters are exactly the norm weights/biases and the biases.
    assert no_decay == {id(p) for p in model.parameters() if p.ndim == 1}
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.05)
    # Twins share their lr.
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head_no_decay"] == lrs["head"] and lrs["backbone_no_decay"] == lrs["backbone"]


def test_no_split_without_weight_decay_or_when_disabled():
    model, parts = resnet18()
    for cfg in (optim(weight_decay=0.0), optim(weight_decay=0.1, no_decay_norm_bias=False)):
        groups = build_param_groups(model, parts, cfg)
        assert [g["name"] for g in groups] == ["backbone", "head"]
        assert {g["weight_decay"] for g in groups} == {cfg.weight_decay}


def test_make_optimizer_keeps_group_settings():
    model, parts = resnet18()
    groups = build_param_groups(model, parts, optim(layer_decay=0.7))
    sgd = make_optimizer(groups, optim(momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["lr"] for g in sgd.param_groups] == [g["lr"] for g in groups]
    assert {g["momentum"] for g in sgd.param_groups} == {0.8}
    adamw = make_optimizer(build_param_groups(model, parts, optim()), optim(name="adamw", betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW)
    assert {g["betas"] for g in adamw.param_groups} == {(0.8, 0.99)}
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0, 1e-4, 0.0]
    with pytest.raises(UserError, match="optim.name"):
        make_optimizer(groups, optim(name="lamb"))


def test_describe_groups_lists_every_group():
    model, parts = resnet18()
    groups = build_param_groups(model, parts, optim())
    text = describe_groups(groups)
    assert len(text.splitlines()) == len(groups) + 1
    head_count = sum(p.numel() for p in model.fc.parameters() if p.ndim > 1)
    assert f"{head_count:,} params" in text
    for g in groups:
        assert g["name"] in text


def test_head_prefix_matching_nothing_is_a_user_error():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    with pytest.raises(UserError, match="match no parameter"):
        build_param_groups(model, generic_parts(model, ["classifier.6"]), optim())
    # A missing aux head is fine as long as the main head matches (googlenet without aux logits).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torchvision.models.googlenet(
            weights=None, num_classes=NUM_CLASSES, aux_logits=False, init_weights=False
        )
    groups = build_param_groups(plain, generic_parts(plain, HEADS["googlenet"]), optim())
    assert (
        sum(p.numel() for g in groups if g["role"] == "head" for p in g["params"]) == 1024 * NUM_CLASSES + NUM_CLASSES
    )


@pytest.mark.parametrize(
    "name, cls, fused",
    [
        ("RAdam", torch.optim.RAdam, False),
        ("nadam", torch.optim.NAdam, False),
        ("rmsprop", torch.optim.RMSprop, False),
        ("adagrad", torch.optim.Adagrad, True),
        ("adam", torch.optim.Adam, True),
    ],
)
def test_any_torch_optimizer_by_name_keeps_the_groups(name, cls, fused):
    model, parts = resnet18()
    groups = build_param_groups(model, parts, optim(layer_decay=0.7))
    args = {"eps": 1e-6} if name != "rmsprop" else {"alpha": 0.95}
    opt = make_optimizer(groups, optim(name=name, args=args), fused=True)
    assert type(opt) is cls
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"]) for g in groups
    ]
    key, value = next(iter(args.items()))
    assert {g[key] for g in opt.param_groups} == {value}
    # fused kernels where torch has them: they skip a non-finite step on the device (guards.py)
    assert bool(getattr(opt, "_step_supports_amp_scaling", False)) == fused
    if "betas" in opt.defaults:
        assert opt.defaults["betas"] == (0.9, 0.999)


def test_optimizer_arguments_that_cannot_work_are_one_line_errors():
    model, parts = resnet18()
    groups = build_param_groups(model, parts, optim())
    for cfg, message in [
        (optim(name="lbfgs"), "needs a closure"),
        (optim(name="adamw", args={"lr": 0.1}), "optim.args.lr is set per group"),
        (optim(name="rprop"), "optim.weight_decay=0.0001 is not taken by Rprop"),
        (optim(name="adamw", args={"nesterov": True}), "cannot be built with"),
    ]:
        with pytest.raises(UserError, match=message) as info:
            make_optimizer(groups, cfg)
        assert "\n" not in str(info.value)


def test_an_optimizer_without_fused_kernels_skips_non_finite_steps_from_the_host():
    from ddp_finetune.training.guards import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([{"params": [weight], "lr": 0.1, "base_lr": 0.1, "weight_decay": 0.0}], optim(name="radam"))
    guard = NonFiniteGuard("cpu", limit=5)
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert guard.before_update(opt, [weight.grad], None, torch.tensor(1.0)) is False
    guard.after_update(opt)
    assert torch.equal(weight.detach(), torch.ones(3)) and guard.check(1)["nonfinite_steps"] == 1
    weight.grad = torch.ones(3)
    assert guard.before_update(opt, [weight.grad], None, torch.tensor(1.0)) is True
