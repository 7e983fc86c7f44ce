"""The backbone-freeze policy: when it freezes, what it drops, which BatchNorms it fixes.

python -m pytest tests/test_freeze.py -q
"""

import pytest
import torch
from torch import nn

from ddp_finetune.config import ModelConfig, OptimConfig
from ddp_finetune.freeze import BackboneFreeze
from ddp_finetune.models import generic_parts
from ddp_finetune.param_groups import build_param_groups, describe_groups, make_optimizer


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
    return BackboneFreeze(ModelConfig(**model_cfg), generic_parts(model, ["6"]))


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
    freeze = BackboneFreeze(ModelConfig(**model_cfg), generic_parts(model, ["1"]))
    freeze.before_wrap(model)
    for epoch, expected in enumerate(eval_per_epoch):
        model.eval()  # what evaluation leaves behind
        assert freeze.start_epoch(model, epoch) == len(expected)
        in_eval = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training}
        assert in_eval == expected, epoch
        assert model[1][2].training, "dropout trains"
