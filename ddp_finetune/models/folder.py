"""A self-describing model folder: `final/` holds the weights and what is needed to use them
without the training data.

    final/model.safetensors   the trained weights (the unwrapped model's state dict)
    final/model.json          the model card: name and source, task, class names in index order,
                              image size, normalization, threshold / ignore_index
    final/config.yaml         the run's resolved config

    files = model_files(cfg, classes, parts)          # training: written with the weights, atomically
    loaded = load_model_folder("runs/x")               # a run folder or its final/ folder
    loaded.model, loaded.card.class_names, loaded.cfg

Loading rebuilds the architecture with `models.build_model` (weights=null, the card's number of
outputs and image size) and then loads the saved state dict strictly, for torchvision and timm
names alike: the weights never depend on a file or a cache outside the folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from ddp_finetune import __version__
from ddp_finetune.config import Config, config_from_dict, dump_config
from ddp_finetune.errors import UserError, first_line
from ddp_finetune.models import Parts, build_model
from ddp_finetune.models.timm_models import PREFIX as TIMM_PREFIX

FINAL = "final"
CARD_FILE = "model.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # Accelerate shards models over 10 GB
CARD_VERSION = 1
THRESHOLD = 0.5  # binary / multilabel: a sigmoid probability above it is a positive (logit > 0, as evaluation)


@dataclass(frozen=True)
class ModelCard:
    """What a model folder says about its model: everything evaluate and predict need besides the weights."""

    model_name: str  # model.name: a torchvision name or timm/<name>
    source: str  # torchvision or timm
    task: str
    class_names: tuple[str, ...]  # index order; binary: the two label values, the logit scores the second
    outputs: int  # channels of the head (1 for binary)
    image_size: int  # data.image_size the model was trained at
    mean: tuple[float, ...]  # normalization the model was trained with (models' Parts)
    std: tuple[float, ...]
    threshold: float | None = None  # binary / multilabel
    crop_pct: float = 0.875  # evaluation crop of the model (timm's pretrained_cfg; torchvision's 0.875)
    interpolation: str = "bilinear"  # evaluation resize of the model
    ignore_index: int | None = None  # segmentation: the mask value that is no class
    weights_from: str | None = None  # model.weights the training started from
    averaged: bool = False  # the weights are the EMA of the trained weights (train.ema_decay)
    selected: dict | None = None  # train.monitor: {monitor, mode, step, value} of the kept (best) model
    version: int = CARD_VERSION
    written_by: str = f"ddp-finetune {__version__}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def make_card(
    cfg: Config, class_names, outputs: int, parts: Parts, averaged: bool = False, selected: dict | None = None
) -> ModelCard:
    timm = cfg.model.name.startswith(TIMM_PREFIX)
    return ModelCard(
        model_name=cfg.model.name,
        source="timm" if timm else "torchvision",
        task=cfg.task,
        class_names=tuple(class_names),
        outputs=outputs,
        image_size=cfg.data.image_size,
        mean=tuple(float(m) for m in parts.mean),
        std=tuple(float(s) for s in parts.std),
        threshold=THRESHOLD if cfg.task in ("binary", "multilabel") else None,
        crop_pct=float(parts.crop_pct),
        interpolation=parts.interpolation,
        ignore_index=cfg.loss.ignore_index if cfg.task == "segmentation" else None,
        weights_from=cfg.model.weights,
        averaged=averaged,
        selected=selected,
    )


def model_files(
    cfg: Config, classes, parts: Parts, averaged: bool = False, selected: dict | None = None
) -> dict[str, str]:
    """The files `checkpoint.save_final_weights` writes next to the weights (name -> text)."""
    card = make_card(cfg, classes.names, classes.outputs, parts, averaged, selected)
    return {CARD_FILE: card.to_json(), CONFIG_FILE: dump_config(cfg)}


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model folder, loaded: the rebuilt model (CPU, eval mode) and what describes it."""

    folder: Path  # the final/ folder
    run_dir: Path | None  # the run folder around it, when it is one (holds metrics.jsonl)
    card: ModelCard
    cfg: Config  # the saved config, with the command's overrides
    model: nn.Module
    parts: Parts


def find_model_folder(path) -> tuple[Path, Path | None]:
    """(the final/ folder, the run folder or None) for a run folder or a final/ folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{str(p)!r} does not exist; give a run folder (output_dir) or its final/ folder")
    if (p / "trainer_state.json").is_file():  # checkpoints/step_<N>: weights, but no card
        run = p.parent.parent
        raise UserError(
            f"{str(p)!r} is a training checkpoint, not a model folder; finish the run to write {FINAL}/ "
            f"(`ddp-finetune train {run / CONFIG_FILE} checkpoint.resume=auto`, with train.epochs or train.max_steps "
            f"where it should stop), then give {run} or {run / FINAL}"
        )
    if (p / CARD_FILE).is_file() or (p / WEIGHTS_FILE).is_file() or (p / WEIGHTS_INDEX).is_file():
        run = p.parent if (p.parent / "metrics.jsonl").is_file() else None
        folder = p
    elif (p / FINAL).is_dir():
        folder, run = p / FINAL, p
    elif (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file():
        raise UserError(
            f"run folder {str(p)!r} has no {FINAL}/ model folder yet (training writes it at the end); finish the run "
            f"with `ddp-finetune train {p / CONFIG_FILE} checkpoint.resume=auto`"
        )
    else:
        raise UserError(f"{str(p)!r} is neither a run folder nor a model folder ({FINAL}/ with {CARD_FILE})")
    if not (folder / CARD_FILE).is_file():
        raise UserError(
            f"model folder {str(folder)!r} has no {CARD_FILE} (written by an older ddp-finetune); write it by resuming "
            f"the run: `ddp-finetune train RUN/{CONFIG_FILE} checkpoint.resume=auto`"
        )
    return folder, run


def read_card(folder: Path) -> ModelCard:
    """The model card, each field of the type it must have (one line naming the first that is not)."""
    path = folder / CARD_FILE
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}); copy the folder again") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is damaged (a {type(values).__name__}, not a JSON object); copy the folder again")
    version = values.get("version", 0)
    if isinstance(version, int) and version > CARD_VERSION:
        raise UserError(
            f"{path} is of card version {version}, newer than this ddp-finetune reads ({CARD_VERSION}); "
            "upgrade ddp-finetune"
        )
    known = {f.name for f in dataclasses.fields(ModelCard)}
    try:
        card = ModelCard(**{k: v for k, v in values.items() if k in known})
    except TypeError as exc:  # a required field missing
        raise UserError(f"{path} is damaged ({first_line(exc)}); copy the folder again") from None
    for name, wanted, kind in _CARD_TYPES:
        value = getattr(card, name)
        ok = isinstance(value, wanted) and not isinstance(value, bool)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        if not ok:
            raise UserError(f"{path}: {name}={value!r} is not {_TYPE_WORDS[name]}; copy the folder again")
    return dataclasses.replace(card, class_names=tuple(card.class_names), mean=tuple(card.mean), std=tuple(card.std))


# (field, the JSON types it may have, the type of its items), what read_card checks
_CARD_TYPES = (
    ("model_name", str, None),
    ("task", str, None),
    ("class_names", list, str),
    ("outputs", int, None),
    ("image_size", int, None),
    ("mean", list, (int, float)),
    ("std", list, (int, float)),
    ("threshold", (int, float, type(None)), None),
    ("ignore_index", (int, type(None)), None),
)
_TYPE_WORDS = {
    "model_name": "a string",
    "task": "a string",
    "class_names": "a list of strings",
    "outputs": "an integer",
    "image_size": "an integer",
    "mean": "a list of numbers",
    "std": "a list of numbers",
    "threshold": "a number or null",
    "ignore_index": "an integer or null",
}


def check_model_folder(folder: Path, card: ModelCard, saved: Config) -> None:
    """The model folder as a whole: the card agrees with itself and with the saved config (the weights are
    compared with the rebuilt model afterwards). One line naming the field that disagrees."""
    path = folder / CARD_FILE
    if card.model_name != saved.model.name:
        raise UserError(
            f"{path}: model_name={card.model_name!r} is not the model.name of {folder / CONFIG_FILE} "
            f"({saved.model.name!r}); the files come from different runs: copy the whole folder again"
        )
    if card.task != saved.task:
        raise UserError(
            f"{path}: task={card.task!r} is not the task of {folder / CONFIG_FILE} ({saved.task!r}); the files come "
            "from different runs: copy the whole folder again"
        )
    if card.image_size <= 0:
        raise UserError(f"{path}: image_size={card.image_size} is not a size in pixels (> 0); copy the folder again")
    if card.outputs <= 0 or (card.task == "binary" and card.outputs != 1):
        raise UserError(
            f"{path}: outputs={card.outputs} cannot be the head of a {card.task} model; copy the folder again"
        )
    # binary: the two label values on one logit; otherwise one name per output at most (a head wider than
    # the named classes, model.num_classes, is labelled by index)
    most = 2 if card.task == "binary" else card.outputs
    if len(card.class_names) > most:
        raise UserError(
            f"{path}: {len(card.class_names)} class_names for a model with {card.outputs} outputs "
            f"({', '.join(card.class_names[:5])}...); copy the folder again"
        )
    if len(card.mean) != 3 or len(card.std) != 3 or any(v <= 0 for v in card.std):
        raise UserError(f"{path}: mean / std are not 3 numbers each (std > 0); copy the folder again")


def _read_config(folder: Path, overrides) -> tuple[Config, Config]:
    """(the saved config, the same with the command's overrides)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"model folder {str(folder)!r} has no {CONFIG_FILE}; copy the whole folder")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)[:120]}); copy the folder again") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is damaged (a {type(values).__name__}, not a mapping of keys); copy the folder again")
    # data.path may be null: a run given its data from Python (fit(train_data=...)); evaluate asks for --data
    saved = config_from_dict(values, data_given=True)
    cfg = config_from_dict(values, list(overrides), data_given=True)
    if cfg.model != saved.model or cfg.task != saved.task:
        raise UserError(
            "model.* and task describe the saved model and cannot be overridden here; "
            "remove those key=value overrides (train.*, data.* and loss.ignore_index can change)"
        )
    return saved, cfg


def read_weights(folder: Path) -> dict:
    """The saved state dict: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    files = [folder / WEIGHTS_FILE]
    if not files[0].is_file() and (folder / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((folder / WEIGHTS_INDEX).read_text())
            files = [folder / str(name) for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(f"{folder / WEIGHTS_INDEX} is damaged ({first_line(exc)}); copy the folder again") from None
    state = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"model folder {str(folder)!r} lacks {f.name}; copy the whole folder")
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # truncated copy, not a safetensors file
            raise UserError(f"weights file {f} cannot be read ({first_line(exc)[:200]}); copy it again") from None
    return state


def load_model_folder(path, overrides=()) -> LoadedModel:
    """Rebuild the model of a run folder or final/ folder: build_model with weights=null, then the saved weights."""
    folder, run = find_model_folder(path)
    card = read_card(folder)
    saved, cfg = _read_config(folder, overrides)
    check_model_folder(folder, card, saved)
    model_cfg = dataclasses.replace(saved.model, weights=None)
    model, parts, _ = build_model(model_cfg, card.outputs, card.task, image_size=card.image_size)
    state = read_weights(folder)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} of shape {tuple(state[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if problems:
        raise UserError(
            f"the weights in {folder} do not fit model.name={card.model_name} with {card.outputs} outputs "
            f"({len(problems)} problems, e.g. {', '.join(problems[:2])}); its files come from different runs: "
            "copy the whole folder again"
        )
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(folder=folder, run_dir=run, card=card, cfg=cfg, model=model, parts=parts)
