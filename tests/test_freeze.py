"""The backbone-freeze policy: when it freezes, what it drops, which BatchNorms it fixes.

python -m pytest tests/test_freeze.py -q
"""

import pytest
import torch
from torch import nn

from ddp_finetune.config import ModelConfig, OptimConfig
from ddp_finetune.models import generic_parts
from ddp_finetune.training.freeze import BackboneFreeze
from ddp_finetune.training.param_groups import build_param_groups, describe_groups, make_optimizer


def _tiny_cnn() -> nn.Module:
    """Backbone 0-5 (a BatchNorm, a dropout), head `6`."""
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


def _policy(model, **model_cfg) -> BackboneFreeze:
    return BackboneFreeze(ModelConfig(**model_cfg), generic_parts(model, ["6"]), model)


def test_frozen_by_epoch():
    model = _tiny_cnn()
    assert not _policy(model).frozen(0) and not _policy(model).whole_run
    static = _policy(model, freeze_backbone=True)
    assert static.whole_run and static.frozen(0) and static.frozen(99)
    gradual = _policy(model, freeze_backbone=True, unfreeze_at_epoch=2)
    assert not gradual.whole_run
    assert [gradual.frozen(e) for e in range(4)] == [True, True, False, False]


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_frozen_until_an_epoch_keeps_the_backbone_bit_identical_then_trains_it(opt_name):
    model = _tiny_cnn()
    freeze = _policy(model, freeze_backbone=True, unfreeze_at_epoch=1)
    assert freeze.before_wrap(model) == 0  # DDP must register every parameter: none has requires_grad=False
    assert all(p.requires_grad for p in model.parameters())
    cfg = OptimConfig(name=opt_name, lr=0.1, head_lr=0.1, weight_decay=0.1)
    optimizer = make_optimizer(build_param_groups(model, freeze.parts, cfg), cfg)
    wrapped = nn.DataParallel(model)  # a wrapper: its names carry a "module." prefix, its objects are the model's
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])

    def train_step(epoch: int) -> int:
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        dropped = freeze.after_backward(epoch)
        optimizer.step()
        return dropped

    assert [train_step(epoch=0) for _ in range(3)] == [4, 4, 4]  # conv w/b, bn w/b
    for n, p in model.named_parameters():
        if n.startswith("6."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
            assert p not in optimizer.state  # no momentum / Adam moments accumulated
    assert train_step(epoch=1) == 0
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_frozen_for_the_whole_run_sets_requires_grad_before_wrapping():
    model = _tiny_cnn()
    freeze = _policy(model, freeze_backbone=True)
    assert freeze.before_wrap(model) == 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["6.weight", "6.bias"]
    # Groups still hold the frozen parameters: nothing is added at unfreeze time.
    groups = build_param_groups(model, freeze.parts, OptimConfig(weight_decay=1e-4))
    assert sum(len(g["params"]) for g in groups) == 6
    assert "(frozen)" in describe_groups(groups)


def _cnn_with_head_bn() -> nn.Module:
    """A segmenter's shape: a BatchNorm in the backbone (`0.1`) and one in the head (`1.1`)."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.1), nn.Conv2d(4, 2, 1)),
    )


@pytest.mark.parametrize(
    "model_cfg, eval_per_epoch",
    [
        ({}, [set(), set()]),
        ({"freeze_bn": True}, [{"0.1", "1.1"}, {"0.1", "1.1"}]),
        ({"freeze_backbone": True}, [{"0.1"}, {"0.1"}]),
        ({"freeze_backbone": True, "unfreeze_at_epoch": 1}, [{"0.1"}, set()]),
        ({"freeze_backbone": True, "unfreeze_at_epoch": 1, "freeze_bn": True}, [{"0.1", "1.1"}, {"0.1", "1.1"}]),
    ],
)
def test_start_epoch_fixes_the_frozen_batchnorms_only(model_cfg, eval_per_epoch):
    model = _cnn_with_head_bn()
    freeze = BackboneFreeze(ModelConfig(**model_cfg), generic_parts(model, ["1"]), model)
    freeze.before_wrap(model)
    for epoch, expected in enumerate(eval_per_epoch):
        model.eval()  # what evaluation leaves behind
        assert freeze.start_epoch(model, epoch) == len(expected)
        in_eval = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training}
        assert in_eval == expected, epoch
        assert model[1][2].training, "dropout trains"


# --------------------------------------------------------------------------- what trains: patterns, blocks, unfreezing


def _meta(name: str, task: str = "classification", **model_cfg):
    from ddp_finetune.models import build_model

    cfg = ModelConfig(name=name, **model_cfg)
    model, parts, _ = build_model(cfg, 3, task, meta=True)
    return cfg, parts, model


def _starts(name: str, task: str = "classification", epochs: int = 10, **model_cfg) -> dict:
    """Unit -> the epoch its frozen parameters train from (0: nothing frozen; None: never)."""
    from ddp_finetune.training.freeze import plan_freeze

    cfg, parts, model = _meta(name, task, **model_cfg)
    return {u.name: u.trains_from for u in plan_freeze(cfg, parts, model, epochs).units}


def test_patterns_are_globs_or_module_names():
    from ddp_finetune.training.freeze import plan_freeze

    cfg, parts, model = _meta("resnet18", freeze=["conv1.*", "bn1", "layer1.*", "layer2.0.bn?.weight"])
    starts = plan_freeze(cfg, parts, model, 2).trains_from()
    frozen = {n for n, s in starts.items() if s is None}
    assert {"conv1.weight", "bn1.weight", "bn1.bias", "layer1.1.conv2.weight"} <= frozen
    assert {"layer2.0.bn1.weight", "layer2.0.bn2.weight"} <= frozen and "layer2.0.bn1.bias" not in frozen
    assert not any(n.startswith(("layer3", "layer4", "fc")) for n in frozen)
    assert [s for n, s in starts.items() if n not in frozen] == [0] * (len(starts) - len(frozen))


def test_a_pattern_that_matches_nothing_names_the_closest_names():
    from ddp_finetune.errors import UserError
    from ddp_finetune.training.freeze import plan_freeze

    cfg, parts, model = _meta("resnet18", freeze=["layer5.*"])
    with pytest.raises(
        UserError, match=r"model.freeze pattern 'layer5.\*' matches no parameter; closest names: layer4"
    ):
        plan_freeze(cfg, parts, model, 2)


@pytest.mark.parametrize(
    "name, task, k, frozen",
    [
        ("resnet18", "classification", 0, ["stem"]),
        ("resnet18", "classification", 2, ["stem", "layer1", "layer2"]),
        ("lraspp_mobilenet_v3_large", "segmentation", 2, ["backbone.0", "backbone.1"]),  # no stem block
        ("deeplabv3_mobilenet_v3_large", "segmentation", 1, ["backbone.0"]),
        ("timm/resnet18", "classification", 1, ["stem", "layer1.0"]),  # timm's own groups: per residual block
    ],
)
def test_freeze_blocks_counts_the_models_own_blocks(name, task, k, frozen):
    starts = _starts(name, task, freeze_blocks=k)
    assert [u for u, s in starts.items() if s is None] == frozen
    assert all(s == 0 for u, s in starts.items() if u not in frozen)


def test_freeze_blocks_beyond_the_model_is_an_error():
    from ddp_finetune.errors import UserError

    with pytest.raises(UserError, match=r"model.freeze_blocks=5 but the model has 4 blocks after its stem \(layer1"):
        _starts("resnet18", freeze_blocks=5)


def test_freezing_everything_for_the_whole_run_is_an_error():
    from ddp_finetune.errors import UserError

    with pytest.raises(UserError, match="nothing would train"):
        _starts("resnet18", freeze=["*"])
    # ... but frozen until an epoch is fine
    assert set(_starts("resnet18", freeze=["*"], unfreeze_at_epoch=1).values()) == {1}


@pytest.mark.parametrize(
    "model_cfg, epochs, expected",
    [
        # everything frozen at once (today's freeze_backbone spelling, and the pattern word)
        ({"freeze_backbone": True}, 10, {"stem": None, "layer1": None, "layer4": None, "head": 0}),
        ({"freeze": "backbone", "unfreeze_at_epoch": 2}, 10, {"stem": 2, "layer1": 2, "layer4": 2, "head": 0}),
        # one block more every 2 epochs from the head down, the first at epoch 2
        ({"freeze_blocks": 2, "unfreeze_every": 2}, 10, {"stem": 6, "layer1": 4, "layer2": 2, "layer3": 0}),
        # ... the first at unfreeze_at_epoch; a block whose turn is after the run stays frozen all run
        (
            {"freeze_blocks": 2, "unfreeze_every": 2, "unfreeze_at_epoch": 1},
            4,
            {"stem": None, "layer1": 3, "layer2": 1},
        ),
        # patterns: the units they touch, head-down; the head itself too
        ({"freeze": ["fc.*", "layer4.1.*"], "unfreeze_every": 1}, 5, {"head": 1, "layer4": 2, "layer3": 0}),
    ],
)
def test_unfreeze_every_unfreezes_one_block_at_a_time_from_the_head_down(model_cfg, epochs, expected):
    starts = _starts("resnet18", epochs=epochs, **model_cfg)
    assert {u: starts[u] for u in expected} == expected


def test_the_table_says_what_trains_per_block():
    from ddp_finetune.training.freeze import plan_freeze

    cfg, parts, model = _meta("resnet18", freeze=["layer3.0.*"], freeze_blocks=1, unfreeze_every=1)
    table = plan_freeze(cfg, parts, model, 3).table()
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "frozen" in rows["stem"] and "never" in rows["stem"]  # its turn (epoch 3) is after the run
    assert "9,536" in rows["stem"]
    assert "frozen" in rows["layer1"] and rows["layer1"].endswith("epoch 2")
    assert "partly frozen" in rows["layer3"] and rows["layer3"].endswith("epoch 1")
    assert "trains" in rows["layer4"] and rows["layer4"].endswith("epoch 0")
    assert rows["total"].split()[1] == "11,178,051"


def _two_blocks_with_bn() -> nn.Module:
    """Blocks `0`, `1` (each conv + BatchNorm), head `2` (a BatchNorm and a conv: a segmenter's head)."""
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())  # noqa: E731
    return nn.Sequential(block(), block(), nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)))


def test_batchnorms_inside_frozen_blocks_keep_their_statistics_until_the_block_unfreezes():
    model = _two_blocks_with_bn()
    freeze = BackboneFreeze(ModelConfig(freeze=["0", "1.*"], unfreeze_every=1), generic_parts(model, ["2"]), model, 4)
    assert freeze.before_wrap(model) == 0  # every frozen block unfreezes within the run
    in_eval = []
    for epoch in range(4):
        freeze.start_epoch(model, epoch)
        in_eval.append({n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training})
    assert in_eval == [{"0.1", "1.1"}, {"0.1"}, set(), set()]  # block 1 at epoch 1, block 0 at epoch 2
    # partly frozen: only a fully frozen module keeps its statistics
    model = _two_blocks_with_bn()
    freeze = BackboneFreeze(ModelConfig(freeze=["0.1.weight"]), generic_parts(model, ["2"]), model, 4)
    assert freeze.before_wrap(model) == 1
    freeze.start_epoch(model, 0)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [False, True])
def test_gradual_unfreezing_with_layer_decay_and_head_lr_keeps_frozen_blocks_bit_identical(opt_name, fused):
    model = _two_blocks_with_bn()
    parts = generic_parts(model, ["2"])
    freeze = BackboneFreeze(ModelConfig(freeze_blocks=2, unfreeze_every=1), parts, model, 3)
    freeze.before_wrap(model)
    cfg = OptimConfig(name=opt_name, lr=0.1, head_lr=0.3, layer_decay=0.5, weight_decay=0.1)
    groups = build_param_groups(model, parts, cfg)
    assert [g["name"] for g in groups if "no_decay" not in g["name"]] == ["backbone.0", "backbone.1", "head"]
    optimizer = make_optimizer(groups, cfg, fused=fused)  # every group exists from step 0
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 2, (4, 6, 6))
    snapshots = []
    for epoch in range(3):
        freeze.start_epoch(model, epoch)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            freeze.after_backward(epoch)
            optimizer.step()
    snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def moved(block: str, epoch: int) -> bool:
        names = [n for n in snapshots[0] if n.startswith(block + ".")]
        return any(not torch.equal(snapshots[epoch][n], snapshots[epoch + 1][n]) for n in names)

    # block 1 (next to the head) trains from epoch 1, block 0 from epoch 2, the head always
    assert [moved("0", e) for e in range(3)] == [False, False, True]
    assert [moved("1", e) for e in range(3)] == [False, True, True]
    assert [moved("2", e) for e in range(3)] == [True, True, True]


def test_config_checks_of_the_freeze_keys():
    from ddp_finetune.config import config_from_dict
    from ddp_finetune.errors import UserError

    base = {"data": {"path": "x"}, "train": {"epochs": 3}}
    for overrides, message in [
        (["model.unfreeze_every=1"], "model.unfreeze_every is set but nothing is frozen"),
        (["model.unfreeze_at_epoch=1"], "model.unfreeze_at_epoch is set but nothing is frozen"),
        (["model.freeze_blocks=-1"], "model.freeze_blocks=-1 is negative"),
        (["model.freeze_blocks=1", "model.unfreeze_every=0"], "model.unfreeze_every=0 must be a positive number"),
        (["model.freeze_backbone=true", "model.freeze=[layer1]"], "both say what is frozen"),
        (["model.freeze=everything"], "model.freeze='everything' has the wrong type"),
    ]:
        with pytest.raises(UserError, match=message):
            config_from_dict(base, overrides)
    cfg = config_from_dict(base, ["model.freeze=[conv1, 'layer1.*']", "model.unfreeze_every=1"])
    assert cfg.model.freeze == ["conv1", "layer1.*"]
    assert config_from_dict(base, ["model.freeze=backbone", "model.freeze_backbone=true"]).model.freeze == "backbone"


def test_lr_plot_draws_frozen_blocks_at_zero_and_marks_each_unfreeze(tmp_path):
    from ddp_finetune.commands.lr_plot import drawn_lrs, plot_schedule, simulate_lrs
    from ddp_finetune.config import config_from_dict

    values = {
        "data": {"path": "x"},
        "model": {"name": "resnet18", "freeze_blocks": 1, "unfreeze_every": 1},
        "train": {"epochs": 3},
        "optim": {"lr": 0.01, "head_lr": 0.1, "layer_decay": 0.5},
        "schedule": {"name": "CosineAnnealingLR"},
    }
    cfg = config_from_dict(values)
    drawn, marks = drawn_lrs(cfg, 2)
    groups = simulate_lrs(cfg, 2)  # the optimizer's lrs: a frozen group keeps its lr
    assert marks == [(2, "layer1"), (4, "stem")]
    assert drawn.keys() == groups.keys()  # layer decay: a group per block, drawn as such
    assert drawn["lr/head"] == groups["lr/head"] and drawn["lr/backbone.layer4"] == groups["lr/backbone.layer4"]
    assert drawn["lr/backbone.layer1"] == [0.0, 0.0] + groups["lr/backbone.layer1"][2:]
    stem = groups["lr/backbone.stem"]
    assert drawn["lr/backbone.stem"] == [0.0] * 4 + stem[4:] and stem[0] > 0
    png, _ = plot_schedule(cfg, 2, tmp_path / "lr.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    # one backbone group whose blocks unfreeze at different epochs: drawn per block
    one_group = config_from_dict({**values, "optim": {"lr": 0.01, "head_lr": 0.1}})
    drawn, _ = drawn_lrs(one_group, 2)
    backbone = simulate_lrs(one_group, 2)["lr/backbone"]
    assert set(drawn) == {"lr/stem", "lr/layer1", "lr/layer2", "lr/layer3", "lr/layer4", "lr/head"}
    assert drawn["lr/layer1"] == [0.0, 0.0] + backbone[2:] and drawn["lr/layer2"] == backbone
    # freeze_backbone until epoch 1: the backbone group as one series, 0 in epoch 0
    whole = config_from_dict({**values, "model": {"name": "resnet18", "freeze_backbone": True, "unfreeze_at_epoch": 1}})
    drawn, marks = drawn_lrs(whole, 2)
    assert marks == [(2, "stem, layer1, layer2, layer3, layer4")]
    assert drawn["lr/backbone.stem"][:2] == [0.0, 0.0] and drawn["lr/backbone.stem"][2] > 0
    # nothing frozen: what it drew before
    plain = config_from_dict({**values, "model": {"name": "resnet18"}})
    assert drawn_lrs(plain, 2) == (simulate_lrs(plain, 2), [])
