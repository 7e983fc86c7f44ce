"""`ddp-finetune evaluate RUN_OR_MODEL [--data PATH | --split NAME]`: a saved model scored on a split.

    report = evaluate_model("runs/x")                          # the run's own validation split
    report = evaluate_model("runs/x/final", data="held_out/")  # another folder or saved dataset

The evaluation is training's own (`evaluate.gather_logits` / `gather_segmentation`): the split is
cut across the ranks by Accelerate and gathered with `gather_for_metrics`, which drops the
samples repeated to even out the last batch, so 1 and N processes score the same images and
give the same numbers. Segmentation is scored from summed confusion matrices. The main process
writes `eval.json` (every metric, per-class precision / recall / F1 or IoU, the confusion
matrix) and `confusion_matrix.png`, and prints a short table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ddp_finetune import distributed as dist_utils
from ddp_finetune.data.checks import class_folders
from ddp_finetune.data.datasets import eval_dataset
from ddp_finetune.data.image_check import check_split_images
from ddp_finetune.data.sources import Classes, check_columns, class_names, load_dataset_dict, load_splits
from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_write_text
from ddp_finetune.inference.setup import is_saved_dataset, start_inference
from ddp_finetune.losses import build_loss
from ddp_finetune.models.folder import LoadedModel, ModelCard
from ddp_finetune.out_paths import folder_out, writing
from ddp_finetune.training.metrics import classification_confusion, classification_metrics, per_class_metrics
from ddp_finetune.training.validation import gather_logits, gather_segmentation, segmentation_summary

REPORT = "eval.json"
CONFUSION_PNG = "confusion_matrix.png"
SHOWN_CLASSES = 20  # rows of the printed per-class table


@dataclasses.dataclass
class EvalSplit:
    """The images to score: one split of the run's data or of `--data`."""

    ds: object  # datasets.Dataset
    name: str  # the split's name, or "val_fraction"
    data_path: str
    source: str  # data.source it was read with
    tag: str  # names the output folder: eval/<tag>/


def data_source(path: str) -> str:
    """`disk` for a dataset saved with `save_to_disk`, `imagefolder` for a folder of images."""
    p = Path(path)
    if not p.is_dir():
        what = "does not exist" if not p.exists() else "is not a folder"
        raise UserError(f"--data {path!r} {what}; give a folder of images or a dataset saved with save_to_disk")
    return "disk" if is_saved_dataset(p) else "imagefolder"


def choose_split(cfg, data: str | None, split: str | None, model_classes: tuple[str, ...] = ()) -> EvalSplit:
    """The run's validation split (as training cut it) by default; `split` of the run's data or of `data`."""
    if data is None and split is None:
        splits = load_splits(cfg.data, cfg.seed, cfg.task)
        return EvalSplit(splits.val, splits.val_source, cfg.data.path, cfg.data.source, splits.val_source)
    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, path=str(data), source=data_source(data))
    raw = load_dataset_dict(data_cfg, cfg.task)
    if split is None:
        if len(raw) > 1 and "test" not in raw:
            raise UserError(
                f"--data {data!r} has the splits {', '.join(raw)}; choose one with --split (e.g. --split {list(raw)[-1]})"
            )
        split = "test" if "test" in raw else next(iter(raw))
    if split not in raw:
        raise UserError(f"--split {split!r} is not a split of {data_cfg.path!r} (splits: {', '.join(raw)})")
    try:
        check_columns(raw[split], data_cfg, cfg.task, set(raw))
    except UserError:
        unlabelled = data_cfg.source == "imagefolder" and data_cfg.label_column not in raw[split].column_names
        if data is None or not model_classes or not unlabelled:
            raise
        # `datasets` labels an image folder by class folder only from 2 folders on: compare with the model's
        # classes, as for any class mismatch, rather than say what training would (a classifier needs 2)
        folders = [name for name, has in class_folders(data_cfg.path, set(raw)).items() if has]
        raise UserError(
            f"--data {data!r} holds the class folders ({', '.join(folders) or 'none'}), the model's classes are "
            f"({', '.join(model_classes[:10])}); evaluate on data labelled with the model's classes: one folder per "
            "class, at least 2, named as the model's"
        ) from None
    tag = split if data is None else f"{Path(data).resolve().name}-{split}"
    return EvalSplit(raw[split], split, data_cfg.path, data_cfg.source, tag)


def split_classes(card: ModelCard, ds, label_column: str) -> Classes:
    """The model's classes with the split's label kind; labels the model cannot score are a one-line error."""
    if card.task == "segmentation":
        return Classes(names=card.class_names, outputs=card.outputs, label_kind="mask")
    names, kind = class_names(ds, label_column)
    model = ", ".join(card.class_names[:10])
    if kind == "index" and tuple(names) != card.class_names:
        raise UserError(
            f"the split's classes ({', '.join(names[:10])}) are not the model's ({model}) in index order; "
            "evaluate on data labelled with the model's classes (the same class folders)"
        )
    if kind == "values" and not set(names) <= set(card.class_names):
        extra = sorted(set(names) - set(card.class_names))
        raise UserError(f"the split has labels {', '.join(map(repr, extra[:5]))} the model does not know ({model})")
    if kind == "multi_hot" and len(names) != card.outputs:
        raise UserError(f"the split's multi-hot labels have {len(names)} entries, the model {card.outputs} classes")
    return Classes(names=card.class_names, outputs=card.outputs, label_kind=kind)


def _default_out(loaded: LoadedModel, tag: str) -> Path:
    return (loaded.run_dir or loaded.folder.parent) / "eval" / tag


def evaluate_model(model_path, data=None, split=None, out=None, overrides=()) -> dict:
    """Score a run folder's (or final/ folder's) model on a split; returns the report written to eval.json."""
    from torch.utils.data import DataLoader

    if out is not None:  # before the model and the data: a bad --out costs seconds, not a whole evaluation
        folder_out(out, "--out", what="eval.json and the confusion matrix")
    inf = start_inference(model_path, overrides)  # model folder -> accelerator -> DeviceInput (inference.py)
    loaded, cfg, card, accelerator = inf.loaded, inf.cfg, inf.card, inf.accelerator
    with dist_utils.first_on_each_node(accelerator):
        chosen = choose_split(cfg, data, split, card.class_names)
    out_dir = Path(out) if out else _default_out(loaded, chosen.tag)
    folder_out(out_dir, "--out" if out else "the report folder", what="eval.json and the confusion matrix")
    dataset = _dataset(cfg, card, chosen, out_dir)
    plan = inf.loader_plan  # data.num_workers: auto
    # Accelerate's loader cuts each global batch across the ranks and lets gather_for_metrics drop the padding
    loader = accelerator.prepare_data_loader(
        DataLoader(
            dataset, batch_size=inf.batch_size, shuffle=False, num_workers=plan.workers, pin_memory=plan.pin_memory
        )
    )
    model, prepare = inf.model, inf.prepare
    metrics, per_class, confusion = _score(accelerator, model, loader, prepare, card, cfg, chosen.name)
    report = {
        "model": str(loaded.folder),
        "model_name": card.model_name,
        "task": card.task,
        "data": {"path": str(chosen.data_path), "source": chosen.source, "split": chosen.name},
        "world_size": accelerator.num_processes,
        "mixed_precision": cfg.train.mixed_precision,
        **({"threshold": card.threshold} if card.threshold is not None else {}),
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if accelerator.is_main_process:
        with writing(out_dir):
            _write(out_dir, report, confusion, card)
        for line in table_lines(report, out_dir):
            print(line, flush=True)
    accelerator.wait_for_everyone()
    return report


def _dataset(cfg, card: ModelCard, chosen: EvalSplit, out_dir: Path):
    """The split as evaluation's torch dataset (the evaluation crop, the model's normalization), its
    unreadable images listed (data.bad_images=error) or left out (skip)."""
    classes = split_classes(card, chosen.ds, cfg.data.label_column)
    ds = check_split_images(cfg, chosen.ds, chosen.name, out_dir)
    eval_crop = (card.crop_pct, card.interpolation)  # the model's evaluation crop, as in training
    return eval_dataset(cfg, ds, classes, chosen.name, eval_crop=eval_crop)


def _score(accelerator, model, loader, prepare, card: ModelCard, cfg, split_name: str):
    """(metrics, per-class rows, confusion matrix) of the split, the same on every rank."""
    empty = UserError(f"the {split_name} split holds no images; choose another with --split or --data")
    if card.task == "segmentation":
        ignore = cfg.loss.ignore_index
        totals = gather_segmentation(accelerator, model, loader, prepare, card.outputs, ignore, split=split_name)
        if totals is None:
            raise empty
        per = per_class_metrics(totals.confusion)
        keys = ("iou", "f1", "precision", "recall", "support")
        rows = _rows(_names(card, totals.confusion.shape[0]), per, keys, rename={"f1": "dice"})
        return segmentation_summary(totals), rows, totals.confusion
    gathered = gather_logits(accelerator, model, loader, prepare)
    if gathered is None:
        raise empty
    logits, targets = gathered
    loss_fn = build_loss(dataclasses.replace(cfg.loss, sync=False), card.task, card.outputs)
    metrics = {"loss": loss_fn(logits, targets).item(), **classification_metrics(logits, targets, card.task)}
    confusion = classification_confusion(logits, targets, card.task)
    keys = ("precision", "recall", "f1", "support")
    if card.task == "multilabel":  # each label's own 2 x 2: the scores of its positives
        per = {k: [per_class_metrics(c)[k][1] for c in confusion] for k in keys}
    else:
        per = per_class_metrics(confusion)
    # macro F1 over the classes present in the targets (the mean of per-class F1, as scikit-learn's
    # classification_report, but without the classes the split does not hold)
    metrics["macro_f1"] = _mean([f for f, n in zip(per["f1"], per["support"]) if n])
    metrics["count"] = int(logits.shape[0])
    return metrics, _rows(_names(card, len(per["f1"])), per, keys), confusion


def _names(card: ModelCard, n: int) -> tuple[str, ...]:
    """The class names of n rows: the card's, padded with indices (model.num_classes above the named classes;
    a binary model trained on one label value)."""
    names = card.class_names[:n]
    return (*names, *(str(i) for i in range(len(names), n)))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rows(names, per: dict, keys, rename: dict | None = None) -> list[dict]:
    rename = rename or {}
    return [{"class": name, **{rename.get(k, k): per[k][i] for k in keys}} for i, name in enumerate(names)]


def _write(out_dir: Path, report: dict, confusion, card: ModelCard) -> None:
    """The confusion-matrix picture (when matplotlib is installed: the report stands without it), then
    eval.json (atomically), which names the picture if there is one."""
    import importlib.util

    from ddp_finetune.inference.pictures import plot_confusion

    if importlib.util.find_spec("matplotlib") is None:
        report["confusion_matrix_png"] = None
        print("evaluate: no confusion-matrix picture: install matplotlib with pip install 'ddp-finetune[plot]'")
    else:
        names = [row["class"] for row in report["per_class"]]
        title = f"{card.model_name} on {report['data']['path']} ({report['data']['split']})"
        unit = "pixels" if card.task == "segmentation" else "images"
        multilabel = card.task == "multilabel"
        plot_confusion(confusion, names, out_dir / CONFUSION_PNG, title, multilabel=multilabel, unit=unit)
        report["confusion_matrix_png"] = CONFUSION_PNG
    atomic_write_text(out_dir / REPORT, json.dumps(report, indent=2) + "\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table_lines(report: dict, out_dir: Path) -> list[str]:
    """The printed summary: the metrics on one line, then per class up to `SHOWN_CLASSES` rows."""
    d = report["data"]
    metrics = report["metrics"]
    lines = [
        f"evaluate: {report['model']} on {d['path']} split {d['split']}: {metrics.get('count')} images, "
        f"{report['world_size']} processes",
        "  " + "  ".join(f"{k} {_cell(v)}" for k, v in metrics.items() if k != "count"),
    ]
    rows = report["per_class"]
    if rows:
        keys = [k for k in rows[0] if k != "class"]
        width = max(5, *(len(str(r["class"])) for r in rows[:SHOWN_CLASSES]))
        lines.append(f"  {'class':<{width}}  " + "  ".join(f"{k:>9}" for k in keys))
        for r in rows[:SHOWN_CLASSES]:
            lines.append(f"  {str(r['class']):<{width}}  " + "  ".join(f"{_cell(r[k]):>9}" for k in keys))
        if len(rows) > SHOWN_CLASSES:
            lines.append(f"  ... {len(rows) - SHOWN_CLASSES} more classes in {REPORT}")
    picture = f" and {out_dir / report['confusion_matrix_png']}" if report.get("confusion_matrix_png") else ""
    lines.append(f"wrote {out_dir / REPORT}{picture}")
    return lines
