"""One typed, nested config: YAML values, `a.b=value` overrides, validation.

    cfg = load_config("my_run.yaml", ["train.epochs=3", "optim.lr=0.01"])
    cfg = load_config("@digits_source")   # a config shipped inside the package (ddp_finetune/configs/)

Every field has a default and a one-line docstring: the README's reference and the starter
configs of `ddp-finetune init` are made from the same text (`reference_rows`). Unknown keys
and wrong types are `UserError`s that list the valid keys.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_finetune.config.parsing import (
    build_section,
    check_types,
    load_yaml,
    parse_override,
    set_dotted,
    validate_key_path,
)
from ddp_finetune.config.parsing import reference_rows as _reference_rows
from ddp_finetune.errors import UserError
from ddp_finetune.losses.kinds import Accumulation as LossAccumulation
from ddp_finetune.losses.kinds import Mode as LossMode


@dataclass
class DataConfig:
    source: Literal["imagefolder", "disk", "hub"] = "imagefolder"
    """Where the images come from: `imagefolder` (a local folder of class sub-folders, or split folders
    `train/`, `validation/`; segmentation: `images/` and `masks/` folders, optionally under split folders), `disk` (a dataset saved with `save_to_disk`) or `hub` (a Hugging Face Hub name)."""
    path: str | None = None
    """Folder (imagefolder, disk) or dataset name (hub)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str | None = None
    """Split used for validation; null: `validation`, `val` or `test` when present, else a seeded `val_fraction` split of the training split."""
    val_fraction: float = 0.1
    """Fraction of the training split held out for validation when there is no validation split (seeded by `seed`)."""
    image_column: str = "image"
    """Column holding the images (PIL images or paths)."""
    label_column: str = "label"
    """Column holding the labels: a class index (classification, binary) or a list of class indices / a multi-hot vector (multilabel)."""
    mask_column: str = "mask"
    """Segmentation: column holding the masks (an image of class indices, mode L or P, or an array of them)."""
    class_names: list[str] | None = None
    """Segmentation: the class names, index 0 first (their count sets the classes); null: `model.num_classes` or the training masks' largest value + 1."""
    image_size: int = 224
    """Side of the square crop fed to the model."""
    augment: bool = True
    """Train-time augmentation: RandomResizedCrop + horizontal flip, then `policy`, `color_jitter`, `random_erasing` when set; seeded per sample so every world size sees the same augmentation."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """With `augment`: RandomResizedCrop's range of the crop's area, as fractions of the image's ([min, max])."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    """With `augment`: RandomResizedCrop's range of the crop's aspect ratio, width / height ([min, max])."""
    hflip: bool = True
    """With `augment`: flip half the training images horizontally (segmentation: image and mask together)."""
    policy: Literal["none", "randaugment", "trivialaugment", "autoaugment", "augmix"] = "none"
    """With `augment`: torchvision's automatic augmentation after the crop: `randaugment`, `trivialaugment` (TrivialAugmentWide), `autoaugment` (ImageNet policy), `augmix`, or `none`. Classification tasks only."""
    policy_magnitude: int | None = None
    """`randaugment`: the magnitude (0-30; null: 9); `augmix`: the severity (1-10; null: 3)."""
    policy_ops: int = 2
    """`randaugment`: operations applied per image."""
    color_jitter: float = 0.0
    """With `augment`: brightness, contrast and saturation jitter of this strength (0: off); the image only."""
    random_erasing: float = 0.0
    """With `augment`: probability of erasing a random rectangle of the image (after the other transforms; 0: off); the image only."""
    mixup_alpha: float = 0.0
    """Mixup: each training sample is blended with a partner from the same global batch, weight ~ Beta(alpha, alpha) (0: off). Not for segmentation."""
    cutmix_alpha: float = 0.0
    """CutMix: a box of a partner from the same global batch is pasted in, area ~ Beta(alpha, alpha) (0: off). Not for segmentation."""
    mix_prob: float = 1.0
    """With Mixup / CutMix: the probability that a sample is mixed at all."""
    mix_switch_prob: float = 0.5
    """With both Mixup and CutMix: the probability that a mixed sample uses CutMix rather than Mixup."""
    sampler: Literal["random", "balanced"] = "random"
    """Training order: `random` (a seeded permutation per epoch) or `balanced` (seeded draws with replacement, every class equally likely; classification and binary)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per rank; `auto`: the CPUs this process may use (its CPU affinity, capped by SLURM's `SLURM_CPUS_PER_TASK`) divided by the processes on its node, minus one for the training loop (on a CPU run: minus the training process's torch threads). The start-up lines say how many each rank got and why."""
    decode: Literal["cpu", "gpu", "auto"] = "cpu"
    """Where JPEG images are decoded: `cpu` (the workers decode, crop and flip), `gpu` (the workers only read the files and draw the crops; the GPU decodes the batch with nvJPEG and crops it, with the same per-sample crops), `auto` (gpu where it applies). Non-JPEG files, segmentation and CPU runs decode on the CPU; the start-up lines say which."""
    bad_images: Literal["error", "skip"] = "error"
    """Images that do not decode (found by a check of every image before training, cached per dataset): `error` stops with their list, `skip` trains without them."""

    def validate(self, data_given: bool = False) -> None:
        if self.path is None and not data_given:
            raise UserError(
                "data.path is not set; give the image folder, saved dataset or Hub name, e.g. data.path=./my_images"
            )
        _range("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _positive("data.image_size", self.image_size)
        if self.num_workers != "auto" and self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} is negative; use 0 or more, or auto")
        for key in ("crop_scale", "crop_ratio"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise UserError(f"data.{key}={low_high} needs two positive values [min, max] with min <= max")
        if self.crop_scale[1] > 1:
            raise UserError(f"data.crop_scale={self.crop_scale} goes above 1 (the whole image); use values in (0, 1]")
        _range("data.color_jitter", self.color_jitter, 0.0, 1.0)
        _range("data.random_erasing", self.random_erasing, 0.0, 1.0)
        _range("data.mix_prob", self.mix_prob, 0.0, 1.0)
        _range("data.mix_switch_prob", self.mix_switch_prob, 0.0, 1.0)
        _positive("data.policy_ops", self.policy_ops)
        if not self.augment:  # these only act inside the augmentation: set without it, they would do nothing
            for key, value, off in (
                ("policy", self.policy, "none"),
                ("color_jitter", self.color_jitter, 0),
                ("random_erasing", self.random_erasing, 0),
            ):
                if value != off:
                    raise UserError(
                        f"data.{key}={value} has no effect with data.augment=false; set data.augment=true, or remove it"
                    )
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise UserError(f"data.{key}={getattr(self, key)} is negative; use 0 (off) or a positive alpha")
        if self.policy_magnitude is not None:
            limits = {"randaugment": (0, 30), "augmix": (1, 10)}
            if self.policy not in limits:
                raise UserError(
                    f"data.policy_magnitude={self.policy_magnitude} is not read by data.policy={self.policy} "
                    "(only randaugment and augmix); remove it"
                )
            _range("data.policy_magnitude", self.policy_magnitude, *limits[self.policy])
        photometric = self.augment and (self.policy != "none" or self.color_jitter or self.random_erasing)
        if self.decode == "gpu" and (photometric or self.mixup_alpha or self.cutmix_alpha):
            raise UserError(
                "data.decode=gpu applies only the crop and flip on the device, not data.policy, data.color_jitter, "
                "data.random_erasing or Mixup / CutMix; use data.decode=cpu (or auto, which decodes on the CPU then)"
            )
        if self.class_names is not None and len(self.class_names) < 2:
            raise UserError(
                f"data.class_names={self.class_names!r} needs at least 2 names (background included), or null"
            )


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Any `torchvision.models` classifier name (`torchvision.models.list_models(torchvision.models)`), or with `task: segmentation` any segmenter (`torchvision.models.list_models(torchvision.models.segmentation)`), or `timm/<name>` for any `timm.list_models()` name, optionally with a pretrained tag (`timm/resnet18.a1_in1k`; needs `pip install 'ddp-finetune[timm]'`)."""
    weights: str | None = None
    """null (random init), a torchvision weights enum name (`DEFAULT`, `IMAGENET1K_V1`, ...; cached under `$TORCH_HOME/hub/checkpoints`), for a timm model `DEFAULT` (its pretrained tag, from the Hugging Face cache), or a local `.pth` / `.safetensors` state dict."""
    num_classes: int | None = None
    """Classes of the new head; null: inferred from the dataset."""
    load_head: bool = False
    """Also load the head from a local weights file when its shape fits (false: the head starts fresh for your classes, as in transfer learning)."""
    freeze_bn: bool = False
    """Keep BatchNorm layers in eval mode (running statistics fixed). Needed for identical training across world sizes on CPU, where BatchNorm cannot be synchronized."""
    freeze_backbone: bool = False
    """Train only the head (feature extraction); the backbone's weights and BatchNorm statistics stay fixed. The same as `freeze: backbone`."""
    unfreeze_at_epoch: int | None = None
    """With something frozen (`freeze_backbone`, `freeze`, `freeze_blocks`): the epoch (0-based) from which it all trains too; with `unfreeze_every`, the epoch the first block (nearest the head) does."""
    freeze: list[str] | Literal["backbone"] | None = None
    """Parameters that do not train: glob patterns on parameter names or module names (`[conv1, bn1, "layer1.*"]`), or `backbone` (everything but the head: `freeze_backbone`). A pattern that matches nothing is an error naming the closest names; BatchNorms inside frozen modules keep their statistics."""
    freeze_blocks: int | None = None
    """Freeze the stem and the first K blocks of the model's block list (the blocks `optim.layer_decay` counts; README table); 0: the stem only."""
    unfreeze_every: int | None = None
    """Gradual unfreezing: every this many epochs one more frozen block trains, from the head down, the first at `unfreeze_at_epoch` (or at this epoch when that is null)."""
    drop_path_rate: float | None = None
    """Stochastic depth: the probability of dropping a residual branch in training (timm's `drop_path_rate`, torchvision's `stochastic_depth_prob`); null: the model's default."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, ~30% slower): timm's `set_grad_checkpointing`, torchvision's DenseNet `memory_efficient`; other models refuse it."""
    sync_bn: bool = False
    """Turn BatchNorm into SyncBatchNorm (CUDA only): statistics of the global batch, the same training at every world size for models that train their BatchNorm. On a CPU use `freeze_bn`."""

    def freezes_anything(self) -> bool:
        """Whether any parameter is frozen at the start (`freeze_backbone`, `freeze` or `freeze_blocks`)."""
        return bool(self.freeze_backbone or self.freeze or self.freeze_blocks is not None)

    def validate(self) -> None:
        if self.num_classes is not None:
            _positive("model.num_classes", self.num_classes)
        if self.drop_path_rate is not None:
            _range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        if self.unfreeze_at_epoch is not None and self.unfreeze_at_epoch < 0:
            raise UserError(
                f"model.unfreeze_at_epoch={self.unfreeze_at_epoch} is negative; use an epoch index >= 0 or null"
            )
        if self.freeze_blocks is not None and self.freeze_blocks < 0:
            raise UserError(f"model.freeze_blocks={self.freeze_blocks} is negative; use 0 (the stem) or more, or null")
        if self.unfreeze_every is not None:
            _positive("model.unfreeze_every", self.unfreeze_every)
        if self.freeze_backbone and self.freeze not in (None, "backbone"):
            raise UserError(
                f"model.freeze_backbone=true and model.freeze={self.freeze!r} both say what is frozen; "
                "keep one (model.freeze=backbone is freeze_backbone)"
            )


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training split."""
    batch_size: int = 32
    """Global batch per optimizer step, split evenly over processes and accumulation steps; must divide by processes x grad_accum."""
    eval_batch_size: int | None = None
    """Global batch for evaluation; null: `batch_size`."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """`no`, `fp16` (CUDA only, with loss scaling) or `bf16`."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value; null: no clipping."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: run all epochs). Schedules still span `epochs`."""
    check_every_n_steps: int = 8
    """Every this many optimizer steps the ranks agree on a stop request and read the device-side checks (bad labels, non-finite steps): with logging, checkpoints and evaluation, the only times the loop waits for the device."""
    compile: bool = False
    """Run the model through `torch.compile` (faster steps after a compilation of a minute or more)."""
    deterministic: bool = False
    """Deterministic algorithms (bit-identical reruns on the same GPU, slower; sets CUBLAS_WORKSPACE_CONFIG); an op with no deterministic kernel stops the run with one line naming it (on CUDA: torchvision's segmenters); false: TF32 and cuDNN autotuning on CUDA."""
    max_nonfinite_steps: int = 5
    """Stop with an error (exit 2) once this many optimizer steps in a row had non-finite gradients; each such step is skipped, the weights untouched. Under fp16 the GradScaler's calibration skips are counted apart (`scaler_skipped_steps`): they count only once the loss scale fell below 1, or persist this many steps past its 16 halvings."""
    dist_timeout_minutes: int = 60
    """How long a rank waits in a collective (NCCL, gloo) for the others before the run fails; long enough for the first start-up on a large dataset, when one rank per node builds the caches while the others wait. An error on one rank stops the others at once, whatever this is."""
    ema_decay: float | None = None
    """Keep an exponential moving average (EMA) of the weights with this decay (e.g. 0.999; torch's `swa_utils.AveragedModel`), updated after every optimizer step that changed the weights and evaluated as `val_ema/...`; null: no EMA."""
    ema_warmup: bool = True
    """EMA warmup: at optimizer step t the decay is min(ema_decay, (1 + t) / (10 + t)), so the average forgets the first, untrained weights quickly."""
    final_weights: Literal["model", "ema"] = "model"
    """Weights written to `final/` when no metric is monitored: the trained `model` or its `ema` (with `train.monitor`, the monitored metric's weights: `val_ema/...` keeps the EMA's)."""
    eval_every_n_steps: int | None = None
    """Also evaluate every this many optimizer steps (null: only at the end of each epoch, and at `max_steps`)."""
    monitor: str | None = None
    """Keep the best model by this validation metric (`val/top1`, `val/loss`, `val/mean_iou`, `val_ema/top1`, ...) in `best/`, and make it `final/`; null: `final/` is the last step's."""
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    """Whether a lower (`min`) or higher (`max`) `monitor` value is better; `auto`: min for losses, max for the rest."""
    early_stopping_patience: int | None = None
    """With `monitor`: stop once this many evaluations in a row did not improve it by more than `early_stopping_min_delta`; null: never stop early."""
    early_stopping_min_delta: float = 0.0
    """The smallest change of `monitor` that counts as an improvement (for early stopping and for `best/`)."""

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        if self.eval_batch_size is not None:
            _positive("train.eval_batch_size", self.eval_batch_size)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UserError(f"train.max_grad_norm={self.max_grad_norm} must be positive (or null for no clipping)")
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        _positive("train.check_every_n_steps", self.check_every_n_steps)
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        _positive("train.dist_timeout_minutes", self.dist_timeout_minutes)
        if self.ema_decay is not None:
            _range("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        if self.final_weights == "ema" and self.ema_decay is None:
            raise UserError("train.final_weights=ema needs an EMA; set train.ema_decay (e.g. 0.999)")
        if self.eval_every_n_steps is not None:
            _positive("train.eval_every_n_steps", self.eval_every_n_steps)
        self._validate_monitor()
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"train.batch_size={self.batch_size} does not divide by train.grad_accum={self.grad_accum}; "
                "use a batch size that is a multiple of grad_accum"
            )

    def _validate_monitor(self) -> None:
        if self.monitor is None:
            if self.early_stopping_patience is not None:
                raise UserError(
                    "train.early_stopping_patience is set but train.monitor is null; set train.monitor (e.g. val/top1)"
                )
            return
        split, _, metric = self.monitor.partition("/")
        if split not in ("val", "val_ema") or not metric:
            raise UserError(
                f"train.monitor={self.monitor!r} is not a validation metric; use val/<metric> or val_ema/<metric>, "
                "e.g. val/top1, val/loss, val/mean_iou"
            )
        if split == "val_ema" and self.ema_decay is None:
            raise UserError(f"train.monitor={self.monitor!r} needs an EMA; set train.ema_decay (e.g. 0.999)")
        if split == "val" and self.final_weights == "ema":
            raise UserError(
                f"train.final_weights=ema but train.monitor={self.monitor!r} keeps the model's weights; "
                f"monitor val_ema/{metric} to keep the best EMA weights"
            )
        if self.early_stopping_patience is not None:
            _positive("train.early_stopping_patience", self.early_stopping_patience)
        if self.early_stopping_min_delta < 0:
            raise UserError(
                f"train.early_stopping_min_delta={self.early_stopping_min_delta} is negative; use 0 or more"
            )


@dataclass
class OptimConfig:
    name: str = "sgd"
    """Any `torch.optim` optimizer by name, any case (`sgd`, `adamw`, `adam`, `radam`, `nadam`, `rmsprop`, `adagrad`, ...); fused kernels where torch has them."""
    lr: float = 0.01
    """Learning rate of the backbone (and of everything when `head_lr` is null)."""
    head_lr: float | None = None
    """Learning rate of the new head; null: `lr`."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    no_decay_norm_bias: bool = True
    """No weight decay on normalization weights and biases (only matters when `weight_decay` > 0)."""
    layer_decay: float | None = None
    """Layer-wise lr decay in (0, 1]: a backbone block at depth d from the head gets lr x layer_decay^d."""
    args: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the optimizer (e.g. `{eps: 1.0e-6}`, `{nesterov: true}`); lr and weight decay come from `optim.lr` / `optim.head_lr` / `optim.weight_decay`."""

    def validate(self) -> None:
        if self.lr < 0:
            raise UserError(f"optim.lr={self.lr} is negative; use a learning rate >= 0")
        if self.head_lr is not None and self.head_lr < 0:
            raise UserError(f"optim.head_lr={self.head_lr} is negative; use a learning rate >= 0 or null")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay={self.weight_decay} is negative; use 0 or more")
        if self.layer_decay is not None:
            _range("optim.layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        if len(self.betas) != 2:
            raise UserError(f"optim.betas={self.betas} needs two values, e.g. [0.9, 0.999]")
        from ddp_finetune.config.optimizers import optimizer_class

        optimizer_class(self.name)  # an unknown name fails with the config, before any data is loaded


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """`constant`, `step_decay` (lr x gamma^(epoch // every)) or any `torch.optim.lr_scheduler` class name (`CosineAnnealingLR`, `OneCycleLR`, `ReduceLROnPlateau`, ...)."""
    interval: Literal["step", "epoch"] = "step"
    """Step a torch scheduler every optimizer `step` or every `epoch`."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps: step s < W uses start_lr x (s+1)/(W+1); the schedule's own step 0 is optimizer step W."""
    warmup_epochs: float = 0
    """Linear warmup in epochs (converted to optimizer steps); used when `warmup_steps` is 0."""
    every: int = 30
    """`step_decay`: decay every this many epochs (counted after warmup)."""
    gamma: float = 0.1
    """`step_decay`: multiplicative decay."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the torch scheduler (e.g. `{T_max: 1000}`); lengths are counted in `interval` units."""
    monitor: str = "val/loss"
    """`ReduceLROnPlateau`: the validation metric it watches."""

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise UserError("schedule.warmup_steps and schedule.warmup_epochs must be >= 0")
        _positive("schedule.every", self.every)


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    """`cross_entropy`, `dice`, `dice_bce`, `iou`, `focal`, `tversky`, or your own as `package.module:Name` (a function or an nn.Module class)."""
    mode: LossMode | None = None
    """`binary`, `multilabel` or `multiclass`; null: from the labels (`multiclass` for class indices)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    smooth: float = 1.0
    """Dice / IoU / Tversky smoothing constant s."""
    alpha: float | None = 0.25
    """Focal: weight of the positive class (null: no balancing). Tversky: weight of false positives (alpha=beta=0.5 is Dice; set it for Tversky)."""
    beta: float = 0.5
    """Tversky weight of false negatives."""
    gamma: float = 2.0
    """Focal gamma."""
    per_image: bool = False
    """Dice / IoU / Tversky per image then averaged, instead of over the whole global batch."""
    ignore_index: int | None = None
    """Target value excluded from the loss (and, for segmentation, from the metrics); masks in the VOC convention mark borders / unlabelled pixels with 255."""
    class_weights: list[float] | None = None
    """Per-class weights, where the loss supports them."""
    sync: bool = True
    """Reduce loss statistics across ranks, so the loss on N ranks equals the loss on 1."""
    accumulation: LossAccumulation = "exact"
    """Region losses under `train.grad_accum` > 1: `exact` is the loss of the whole global batch (a statistics pass without gradients over the step's micro-batches first), `micro_batch` the mean of the micro-batches' losses (cheaper; the objective then depends on grad_accum)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for a user loss."""

    def validate(self) -> None:
        """The option checks live with the losses (one place for config and code); a loss reads
        only its own options, and a value set for another loss is an error."""
        from ddp_finetune.losses import check_loss_config

        check_loss_config(self)


@dataclass
class CheckpointConfig:
    every_n_steps: int | None = None
    """Save a resumable checkpoint every this many optimizer steps (null: only at the end of each epoch)."""
    every_epoch: bool = True
    """Save a resumable checkpoint at the end of every epoch."""
    keep_last: int = 2
    """Number of newest checkpoints kept under `output_dir/checkpoints`."""
    resume: str | None = None
    """null (start fresh), `auto` (the newest complete checkpoint, if any) or a checkpoint folder."""
    overwrite_finished: bool = False
    """Let a fresh run replace a finished run (`final/`, `summary.json`) in `output_dir`; false: refused."""

    def validate(self) -> None:
        if self.every_n_steps is not None:
            _positive("checkpoint.every_n_steps", self.every_n_steps)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class LogConfig:
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    """`none`, `wandb` (offline unless logged in) or `tensorboard`; `metrics.jsonl` is always written."""
    every_n_steps: int = 10
    """Log the training loss every this many optimizer steps."""
    project: str = "ddp-finetune"
    """wandb / tensorboard project name."""
    run_name: str | None = None
    """Run name; null: the output folder's name."""
    progress_bar: bool = True
    """tqdm bar on the main process."""
    trace: bool = False
    """Also log, on log steps, the step's global gradient norm (before clipping) and every micro-batch's loss (each rank's, in the global batch's order): what `ddp-finetune check-invariance` compares. One gather per log step."""

    def validate(self) -> None:
        _positive("log.every_n_steps", self.every_n_steps)


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, summary.json, checkpoints/ and final/ go."""
    seed: int = 0
    """Seeds weights, the data order, the validation split and augmentation."""
    task: Literal["classification", "binary", "multilabel", "segmentation"] = "classification"
    """`classification` (one label per image), `binary` (one logit), `multilabel` (multi-hot labels), `segmentation` (a class per pixel, from a mask)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, data_given: bool = False) -> None:
        """Every check of the values (types included); `data_given`: the data come from Python
        (`fit(train_data=...)`), so `data.path` may be unset."""
        check_types(self, "")
        if self.seed < 0:
            raise UserError(f"seed={self.seed} is negative; use a seed >= 0")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if isinstance(sub, DataConfig):
                sub.validate(data_given)
            elif dataclasses.is_dataclass(sub):
                sub.validate()
        if self.model.unfreeze_at_epoch is not None or self.model.unfreeze_every is not None:
            if not self.model.freezes_anything():
                key = "unfreeze_at_epoch" if self.model.unfreeze_at_epoch is not None else "unfreeze_every"
                raise UserError(
                    f"model.{key} is set but nothing is frozen; set model.freeze_backbone=true, model.freeze "
                    "or model.freeze_blocks"
                )
        if self.model.unfreeze_at_epoch is not None:
            if self.model.unfreeze_at_epoch >= self.train.epochs:
                raise UserError(
                    f"model.unfreeze_at_epoch={self.model.unfreeze_at_epoch} is not before train.epochs={self.train.epochs}; "
                    "use an epoch in [0, epochs) or null"
                )
        if self.task == "segmentation" and self.data.policy != "none":
            raise UserError(
                f"data.policy={self.data.policy} moves only the image (torchvision's policies leave a mask where it was); "
                "with task=segmentation use data.policy=none (crop, flip, data.color_jitter, data.random_erasing work)"
            )
        mixing = self.data.mixup_alpha > 0 or self.data.cutmix_alpha > 0
        if mixing and self.task == "segmentation":
            raise UserError(
                "data.mixup_alpha / data.cutmix_alpha mix the labels of two images, which a segmentation mask cannot "
                "take; set both to 0 with task=segmentation"
            )
        if mixing and self.loss.name not in ("cross_entropy", "focal"):
            raise UserError(
                f"data.mixup_alpha / data.cutmix_alpha make soft targets, which loss.name={self.loss.name} does not take; "
                "use loss.name=cross_entropy or focal, or set both alphas to 0"
            )
        if self.data.sampler == "balanced" and self.task not in ("classification", "binary"):
            raise UserError(
                f"data.sampler=balanced balances one class per image, which task={self.task} does not have; "
                "use data.sampler=random (or loss.class_weights)"
            )
        if self.data.class_names is not None:
            if self.task != "segmentation":
                raise UserError(
                    "data.class_names is only read with task=segmentation (other tasks take the names from the labels); remove it"
                )
            if self.model.num_classes is not None and self.model.num_classes != len(self.data.class_names):
                raise UserError(
                    f"model.num_classes={self.model.num_classes} but data.class_names has {len(self.data.class_names)} names; "
                    "make them agree or set model.num_classes=null"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- checks


def _positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key}={value!r} must be a positive number")


def _range(key, value, low, high, low_open=False, high_open=False) -> None:
    bad = value < low or value > high or (low_open and value == low) or (high_open and value == high)
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UserError(f"{key}={value!r} is outside {interval}")


def config_from_dict(values: dict, overrides: list[str] | tuple = (), data_given: bool = False) -> Config:
    """`data_given`: `data.path` may be unset (the data come from elsewhere: `fit(train_data=...)`,
    or a model folder's config, whose run may have been given its data from Python)."""
    tree = copy.deepcopy(values)
    for text in overrides:
        key, value = parse_override(text)
        validate_key_path(Config, key)
        set_dotted(tree, key, value)
    cfg = build_section(Config, tree)
    cfg.validate(data_given)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """The config of a YAML file (a path or `@NAME`) with `a.b=value` overrides, checked."""
    values = load_yaml(path) if path is not None else {}
    return config_from_dict(values, overrides)


def dump_config(cfg: Config) -> str:
    """The YAML a run writes to output_dir/config.yaml (and into every checkpoint)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every config key, in order: the README's reference table."""
    return _reference_rows(Config)


REFERENCE_BEGIN = (
    "<!-- config reference: generated from config/sections.py by `python -m ddp_finetune.config README.md` -->"
)
REFERENCE_END = "<!-- end of the config reference -->"


def reference_table() -> str:
    """The README's config reference, made from the fields' defaults and docstrings (the only copy of
    their meaning): one row per key, between REFERENCE_BEGIN and REFERENCE_END."""
    lines = [REFERENCE_BEGIN, "", "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in reference_rows()]
    return "\n".join([*lines, "", REFERENCE_END])


def write_reference(readme: str | Path) -> bool:
    """Put `reference_table()` in place of the README's generated block; True if it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.index(REFERENCE_BEGIN), text.index(REFERENCE_END) + len(REFERENCE_END)
    new = text[:start] + reference_table() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text
