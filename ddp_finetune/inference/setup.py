"""What `evaluate` and `predict` share: a saved model made ready to run, on 1 process or N.

    inf = start_inference("runs/x", overrides)        # model folder -> accelerator -> DeviceInput
    logits = inf.model(inf.prepare(uint8_batch))        # on inf.accelerator.device, mixed precision as trained
    is_saved_dataset(path)                              # a dataset saved with save_to_disk, or not

The model folder is loaded and validated as a whole (model_folder.py), the Accelerator built with the
run's `train.mixed_precision`, the backends set as training ran the model (TF32 and cuDNN autotuning on
CUDA unless `train.deterministic`), the model put on the device in evaluation mode (no DDP), and the
uint8 batches turned into the model's input by training's own `device_input` (normalization, cast). Images
are decoded through images.py as in training (`decode_rgb`; `try_decode_rgb` for predict, which skips
unreadable ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddp_finetune import distributed as dist_utils
from ddp_finetune.data.loaders import LoaderPlan, eval_batch_size, plan_loaders
from ddp_finetune.data.transforms import device_input
from ddp_finetune.models.folder import LoadedModel, load_model_folder
from ddp_finetune.training.performance import configure_backends

# what `datasets.load_from_disk` reads: a DatasetDict's dataset_dict.json, or a Dataset's state.json
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


def is_saved_dataset(path) -> bool:
    """Is `path` a folder written by `save_to_disk` (rather than a folder of images)?"""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in SAVED_DATASET_MARKERS)


@dataclass
class Inference:
    """A saved model, ready to run: the loaded folder, the Accelerator, the model on its device, the input step."""

    loaded: LoadedModel
    accelerator: object  # accelerate.Accelerator
    model: object  # the prepared model (device, mixed precision), evaluation mode
    prepare: object  # transforms.DeviceInput: uint8 batch -> normalized model input on the device
    batch_size: int  # the global evaluation batch (train.eval_batch_size, else train.batch_size)
    loader_plan: LoaderPlan  # data.num_workers resolved for this machine

    @property
    def cfg(self):
        return self.loaded.cfg

    @property
    def card(self):
        return self.loaded.card


def start_inference(model_path, overrides=(), whole_batches: bool = True) -> Inference:
    """Load and check the model folder, then build what runs it. `whole_batches`: the evaluation batch must
    divide by the processes (`evaluate`, whose loader Accelerate cuts into equal shares; `predict` cuts its
    own blocks and takes any batch)."""
    loaded = load_model_folder(model_path, overrides)
    cfg, card = loaded.cfg, loaded.card
    accelerator = dist_utils.make_accelerator(cfg.train.mixed_precision)
    cuda = accelerator.device.type == "cuda"
    configure_backends(cuda, cfg.train.deterministic)  # the numerics training ran the model with
    if whole_batches:
        batch = eval_batch_size(cfg, accelerator.num_processes)
    else:
        batch = cfg.train.eval_batch_size or cfg.train.batch_size
    model = accelerator.prepare_model(loaded.model, evaluation_mode=True)  # device + mixed precision, no DDP
    prepare = device_input(card.mean, card.std, accelerator.device, cfg.train.mixed_precision)
    return Inference(loaded, accelerator, model, prepare, batch, plan_loaders(cfg.data.num_workers, cuda))
