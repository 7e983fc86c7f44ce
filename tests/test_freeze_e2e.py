"""Training the layers you choose, end to end: `model.freeze` patterns, `model.freeze_blocks`,
gradual unfreezing by block (`model.unfreeze_every`) on a torchvision classifier, a segmenter and
a timm model; 1 process x grad_accum 2 against 2 processes; a resume across the unfreezes.

python -m pytest tests/test_freeze_e2e.py -q

The classifier's reference config (`_GRADUAL`): resnet18 at 16 px, 18 train images / batch 6 = 3
optimizer steps per epoch, 3 epochs. `freeze_blocks: 2` freezes stem, layer1 and layer2;
`unfreeze_every: 1` frees layer2 at epoch 1 (step 3) and layer1 at epoch 2 (step 6); the stem's
turn (epoch 3) is after the run, so it stays frozen all run (requires_grad=False).
"""

from __future__ import annotations

import pytest
import torch
from datagen import make_image_folder, make_mask_folder
from helpers import fit_in_process, launch_2proc, load_weights, max_abs_diff, read_metrics, read_summary, tiny_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 3
_GRADUAL = dict(
    model={"freeze_blocks": 2, "unfreeze_every": 1},
    # AdamW with weight decay: any step on a frozen parameter would move it (decay, moments)
    optim={"name": "adamw", "lr": 0.001, "head_lr": 0.003, "layer_decay": 0.8, "weight_decay": 0.05},
    schedule={"name": "CosineAnnealingLR", "warmup_steps": 2},
    train={"epochs": 3, "grad_accum": 2},
    checkpoint={"keep_last": 10},
)


def initial_weights(config_path, num_classes: int = 3, task: str = "classification") -> dict:
    """The weights a run starts from: the run seeds, then builds the model."""
    from accelerate.utils import set_seed

    from ddp_finetune.config import load_config
    from ddp_finetune.models import build_model

    cfg = load_config(config_path)
    set_seed(cfg.seed)
    model, _, _ = build_model(cfg.model, num_classes, task, image_size=cfg.data.image_size)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_weights(run_dir, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


def same(a: dict, b: dict, prefix: str) -> bool:
    """Whether every entry under `prefix` (parameters and BatchNorm buffers) is bit-identical."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


def train_logs(run_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "images_per_second"} for r in read_metrics(run_dir) if r["split"] == "train"
    ]


# --------------------------------------------------------------------------- a torchvision classifier


@pytest.fixture(scope="module")
def gradual(tmp_path_factory):
    images = make_image_folder(tmp_path_factory.mktemp("freeze") / "images", per_class=8, size=16)
    return tiny_config(tmp_path_factory.mktemp("gradual"), images, **_GRADUAL)


@pytest.fixture(scope="module")
def runs(gradual):
    """The reference config on 1 process (grad_accum 2) and on 2 processes (grad_accum 1)."""
    base = gradual.parent
    fit_in_process(gradual, f"output_dir={base / 'p1'}")
    proc = launch_2proc("train", gradual, f"output_dir={base / 'p2'}", "train.grad_accum=1")
    return {"p1": base / "p1", "p2": base / "p2", "stdout": proc.stdout}


def test_blocks_unfreeze_from_the_head_down_and_frozen_weights_stay_bit_identical(gradual, runs):
    init = initial_weights(gradual)
    for run in (runs["p1"], runs["p2"]):
        assert read_summary(run)["steps"] == 3 * STEPS_PER_EPOCH
        epoch0, epoch1, final = checkpoint_weights(run, 3), checkpoint_weights(run, 6), load_weights(run)
        for block in ("conv1.", "bn1.", "layer1.", "layer2."):
            assert same(init, epoch0, block), f"{run.name}: {block} moved in epoch 0"
        assert not same(epoch0, epoch1, "layer2.") and same(init, epoch1, "layer1."), run.name
        assert not same(epoch1, final, "layer1."), f"{run.name}: layer1 did not train after its unfreeze"
        # the stem's turn is after the run: bit-identical to the loaded weights at the end
        assert same(init, final, "conv1.") and same(init, final, "bn1.")
        assert not same(init, epoch0, "layer3.") and not same(init, epoch0, "fc.")


def test_two_processes_train_like_one_process_with_grad_accum_2(runs):
    # the 2-rank DDP run registered layer1/layer2 (frozen until an epoch) and not the stem: no
    # "unused parameters" error, and the same training
    assert read_summary(runs["p2"])["world_size"] == 2
    assert max_abs_diff(load_weights(runs["p1"]), load_weights(runs["p2"])) <= 1e-5
    l1, l2 = train_logs(runs["p1"]), train_logs(runs["p2"])
    assert [r["lr/head"] for r in l1] == [r["lr/head"] for r in l2]
    assert [r["loss"] for r in l2] == pytest.approx([r["loss"] for r in l1], abs=1e-5)
    # the start-up lines say what trains, per block
    rows = {line.split()[0]: line for line in runs["stdout"].splitlines() if line.startswith("  ")}
    assert "what trains" in runs["stdout"]
    assert rows["stem"].endswith("never (frozen all run)") and "frozen" in rows["stem"]
    assert rows["layer1"].endswith("epoch 2") and rows["layer2"].endswith("epoch 1")
    assert rows["layer3"].endswith("epoch 0") and "trains" in rows["layer3"]


def test_a_resume_across_the_unfreezes_is_bit_exact(gradual, runs, tmp_path):
    out = tmp_path / "resumed"
    overrides = (f"output_dir={out}", "checkpoint.every_n_steps=2")
    first = fit_in_process(gradual, *overrides, "train.max_steps=2")  # stops inside epoch 0, all frozen
    assert first["steps"] == 2
    second = fit_in_process(gradual, *overrides, "checkpoint.resume=auto")  # crosses both unfreezes
    assert second["resumed_from"].endswith("step_2") and second["steps"] == 3 * STEPS_PER_EPOCH
    reference, resumed = load_weights(runs["p1"]), load_weights(out)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert train_logs(out)[2:] == train_logs(runs["p1"])[2:]


def test_lr_plot_of_the_reference_config(gradual, runs, tmp_path):
    """The drawn lrs are the logged ones, with each block at 0 until its unfreeze."""
    from ddp_finetune.commands.lr_plot import drawn_lrs, lr_plot_command
    from ddp_finetune.config import load_config

    drawn, marks = drawn_lrs(load_config(gradual), STEPS_PER_EPOCH)
    assert marks == [(3, "layer2"), (6, "layer1")]
    logged = train_logs(runs["p1"])
    assert drawn["lr/head"] == [r["lr/head"] for r in logged]
    assert drawn["lr/backbone.layer4"] == [r["lr/backbone"] for r in logged]  # the block nearest the head
    layer2 = drawn["lr/backbone.layer2"]
    assert drawn["lr/backbone.stem"] == [0.0] * 9 and layer2[:3] == [0.0] * 3 and layer2[3] > 0
    png = lr_plot_command(gradual, [], tmp_path / "lr.png", steps_per_epoch=STEPS_PER_EPOCH)
    assert png.read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------- a segmenter


def test_segmenter_frozen_blocks_keep_their_batchnorm_statistics_until_they_unfreeze(tmp_path, capsys):
    """LR-ASPP: patterns freeze backbone.0-2; backbone.2 unfreezes at epoch 1. BatchNorm trains
    (`freeze_bn: false`): the frozen blocks' BatchNorms keep their statistics while frozen,
    the others (backbone.3, the head's `classifier.cbr.1`) learn theirs."""
    masks = make_mask_folder(tmp_path / "shapes", n=16)
    config = tiny_config(
        tmp_path,
        masks,
        task="segmentation",
        data={"image_size": 32},
        model={
            "name": "lraspp_mobilenet_v3_large",
            "freeze_bn": False,
            "freeze": ["backbone.0", "backbone.1.*", "backbone.2"],
            "unfreeze_every": 1,
        },
        train={"epochs": 2, "batch_size": 4},
        optim={"weight_decay": 0.01},
        checkpoint={"keep_last": 5},
    )
    fit_in_process(config)
    assert "partly" not in capsys.readouterr().out  # whole blocks
    run = tmp_path / "run"
    init, epoch0, final = initial_weights(config, 3, "segmentation"), checkpoint_weights(run, 3), load_weights(run)
    for block in ("backbone.0.", "backbone.1."):  # frozen all run: weights and statistics
        assert same(init, final, block), block
    assert same(init, epoch0, "backbone.2.") and not same(epoch0, final, "backbone.2.")
    stats = [k for k in init if k.startswith("backbone.2.") and k.endswith("running_mean")]
    assert stats and not any(torch.equal(epoch0[k], final[k]) for k in stats)  # statistics train after the unfreeze
    assert not torch.equal(init["backbone.3.block.0.1.running_mean"], epoch0["backbone.3.block.0.1.running_mean"])
    assert not torch.equal(init["classifier.cbr.1.running_mean"], epoch0["classifier.cbr.1.running_mean"])


# --------------------------------------------------------------------------- a timm model


def test_timm_model_freeze_blocks_and_gradual_unfreezing(tmp_path, capsys):
    """convnext_atto: timm's own blocks (stem, stages.0.blocks.0, stages.0.blocks.1, ...)."""
    pytest.importorskip("timm")
    images = make_image_folder(tmp_path / "images", per_class=8, size=16)
    config = tiny_config(
        tmp_path,
        images,
        data={"image_size": 32},
        model={"name": "timm/convnext_atto", "freeze_blocks": 2, "unfreeze_every": 1},
        optim={"name": "adamw", "lr": 0.001, "weight_decay": 0.05, "layer_decay": 0.9},
        checkpoint={"keep_last": 5},
    )
    fit_in_process(config)
    out = capsys.readouterr().out
    assert "stages.0.blocks.1" in out and "what trains" in out
    run = tmp_path / "run"
    init, epoch0, final = initial_weights(config), checkpoint_weights(run, 3), load_weights(run)
    for block in ("stem.", "stages.0.blocks.0."):
        assert same(init, final, block), block
    assert same(init, epoch0, "stages.0.blocks.1.") and not same(epoch0, final, "stages.0.blocks.1.")
    assert not same(init, epoch0, "stages.1.") and not same(init, epoch0, "head.fc.")
