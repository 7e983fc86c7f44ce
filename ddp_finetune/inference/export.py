"""`ddp-finetune export RUN_OR_MODEL --format onnx|exported-program`: a trained model as an artifact a serving
stack runs, checked against the PyTorch model before it is put in place.

    export_model("runs/x", "onnx")                                     # runs/x/export/onnx/model.onnx + model.json
    export_model("runs/x", "exported-program", batch=8, preprocessing="none")

What the artifact computes:
- `preprocessing="include"` (default): the graph takes uint8 NCHW images of the model's `image_size` and
  normalizes them inside, with the mean / std of `model.json`, exactly as training's `DeviceInput` does; a
  client only resizes / crops (predict's `eval_view` for classifiers, the whole image for segmenters).
  `"none"`: it takes the normalized float32 batch.
- it outputs the logits (classifiers: (N, K); segmenters: (N, K, S, S)); `output="indices"` makes a
  segmenter output the (N, S, S) int64 class map instead.
- `batch="dynamic"` (default) leaves the batch dimension free; an integer fixes it.

`torch.export` traces the model (the ONNX exporter translates that program), so what is exported is
what PyTorch runs. Every export is then verified: the saved artifact is loaded back (ONNX Runtime for
ONNX, `torch.export.load` for the program) and run on real images - a few of the run's validation split,
or `images` - next to the PyTorch model fed as `evaluate` feeds it; the max abs difference of the
logits is printed and above `atol` nothing is put in place. A dynamic batch is checked at two batch
sizes. The artifact and its card (`<stem>.json`: the model card plus an `export` section saying the
input, output and verification) are written to a hidden staging folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddp_finetune.errors import UserError, first_line
from ddp_finetune.models import split_outputs
from ddp_finetune.models.folder import LoadedModel, ModelCard, load_model_folder

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}  # format -> the artifact's suffix
PREPROCESSING = ("include", "none")
OUTPUTS = ("logits", "indices")
DEFAULT_OPSET = 18  # the ONNX exporter of torch >= 2.5 writes opset 18 natively; others are converted
DEFAULT_ATOL = 1e-4  # fp32: kernels of ONNX Runtime and PyTorch round differently, ~1e-5 on a ResNet
VERIFY_IMAGES = 8  # images of the validation split run through both
MAX_DYNAMIC_BATCH = 4096  # the upper bound torch.export needs for a free batch dimension
INPUT_NAME = "images"  # the ONNX graph's input; its output is "logits" (or "classes": --output indices)
INSTALL_HINT = "pip install 'ddp-finetune[export]' (or: pip install onnx onnxscript onnxruntime)"


@dataclass(frozen=True)
class ExportOptions:
    """export's options (its command-line flags)."""

    format: str = "onnx"
    out: str | None = None  # the artifact's path; default RUN/export/<format>/model.<suffix>
    opset: int = DEFAULT_OPSET  # ONNX only
    batch: str | int = "dynamic"  # "dynamic" or a fixed batch size
    preprocessing: str = "include"
    output: str = "logits"  # segmenters: "indices" outputs the class map
    atol: float = DEFAULT_ATOL
    images: str | None = None  # a folder of images to verify on, when the run's data is not reachable


def check_options(opts: ExportOptions, card: ModelCard | None = None) -> ExportOptions:
    """One line per bad option; returns the options with `batch` as "dynamic" or an int."""
    if opts.format not in FORMATS:
        raise UserError(f"--format {opts.format!r} is not one of {', '.join(FORMATS)}")
    if opts.preprocessing not in PREPROCESSING:
        raise UserError(f"--preprocessing {opts.preprocessing!r} is not one of {', '.join(PREPROCESSING)}")
    if opts.output not in OUTPUTS:
        raise UserError(f"--output {opts.output!r} is not one of {', '.join(OUTPUTS)}")
    batch = opts.batch
    if batch != "dynamic":
        try:
            batch = int(batch)
        except (TypeError, ValueError):
            batch = 0
        if batch < 1:
            raise UserError(f"--batch {opts.batch!r}: give `dynamic` or a batch size of 1 or more")
    if not opts.atol > 0:
        raise UserError(f"--atol {opts.atol}: give a positive tolerance, e.g. {DEFAULT_ATOL}")
    if opts.format == "onnx" and not 7 <= opts.opset <= 23:
        raise UserError(f"--opset {opts.opset}: give an ONNX opset between 7 and 23 (default {DEFAULT_OPSET})")
    if card is not None and opts.output == "indices" and card.task != "segmentation":
        raise UserError(f"--output indices is for segmenters; this model is a {card.task} model: leave it out")
    return dataclasses.replace(opts, batch=batch)


def check_out(path) -> Path:
    """A one-line error for an output file that cannot be written, before any work: a folder in its place, a
    parent that is a file or cannot be created, a folder without write permission. Returns the path."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give the artifact's file, e.g. {out / 'model.onnx'}")
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(
            f"--out {str(out)!r}: {str(existing)!r} is a file, not a folder; choose another --out"
        ) from None
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {str(out)!r}: cannot create {str(parent)!r} ({first_line(exc)}); choose another --out"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {str(out)!r}: folder {str(parent)!r} is not writable; choose another --out") from None
    return out


def check_backend(fmt: str) -> None:
    """ONNX export and verification need onnx + onnxscript (the exporter) and onnxruntime (the check)."""
    if fmt != "onnx":
        return
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"--format onnx needs {', '.join(missing)} (not installed): {INSTALL_HINT}; "
            "or export with --format exported-program"
        )


# --------------------------------------------------------------------------- the exported module


class Exportable(nn.Module):
    """The trained model as it is exported: (normalization,) the model, its main output (, the argmax).

    The normalization is `transforms.DeviceInput`'s arithmetic - x * (1 / (255 std)) - mean / std on the
    float of the uint8 values - so the graph computes bit for bit what evaluation feeds the model.
    """

    def __init__(self, model: nn.Module, mean, std, preprocessing: bool, indices: bool = False):
        super().__init__()
        self.model, self.preprocessing, self.indices = model, preprocessing, indices
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, x):
        if self.preprocessing:
            x = x.float() * self.scale + self.shift
        logits = split_outputs(self.model(x))[0]  # segmenters' aux head is training-only
        return logits.argmax(1) if self.indices else logits


def example_input(card: ModelCard, batch: int, preprocessing: bool) -> torch.Tensor:
    shape = (batch, 3, card.image_size, card.image_size)
    if preprocessing:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def trace(module: Exportable, card: ModelCard, batch, preprocessing: bool, fmt: str):
    """`torch.export` of the module; a fixed batch or a free one (traced at 2: torch.export specializes 1)."""
    example = example_input(card, 2 if batch == "dynamic" else batch, preprocessing)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if batch == "dynamic" else None
    try:
        with _quiet():
            return torch.export.export(module, (example,), dynamic_shapes=dynamic)
    except Exception as exc:
        raise UserError(_trace_failure(exc, card, batch, fmt)) from None


def _trace_failure(exc: BaseException, card: ModelCard, batch, fmt: str) -> str:
    """One line: what torch.export could not trace, where in the model's code, and what to try."""
    text = str(exc)
    where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    place = f" at {Path(where[-1][0]).name}:{where[-1][1]} in {where[-1][2]}()" if where else ""
    if batch == "dynamic" and re.search(r"Constraints violated|specializ|guard", text, re.IGNORECASE):
        hint = "the model fixes its batch size: export a fixed one with --batch 1 (or --batch N)"
    else:
        hint = "its forward has Python control flow or ops torch.export cannot trace; no export format can take it"
    return (
        f"model.name={card.model_name} cannot be traced by torch.export for --format {fmt} "
        f"({type(exc).__name__}: {first_line(exc)[:200]}{place}); {hint}"
    )


def to_onnx(program, path: Path, opset: int, card: ModelCard, output_name: str) -> None:
    """The traced program translated to ONNX (torch's dynamo exporter); an op without an ONNX translation
    is named with the module that calls it."""
    try:
        with _quiet():
            torch.onnx.export(
                program,
                (),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                opset_version=opset,
                external_data=False,
                dynamo=True,
            )
    except Exception as exc:
        op = re.search(r"op='([\w.:]+)'", str(exc))
        if op is None:
            raise UserError(
                f"model.name={card.model_name} cannot be translated to ONNX opset {opset} "
                f"({type(exc).__name__}: {first_line(exc)[:200]}); try another --opset or --format exported-program"
            ) from None
        name = op.group(1)
        module = _module_calling(program, name)
        raise UserError(
            f"model.name={card.model_name}: operator {name}{module} has no ONNX translation (opset {opset}); "
            "export with --format exported-program, or replace that module"
        ) from None


def _module_calling(program, op_name: str) -> str:
    """' (in module PATH, a CLASS)' for the first node of `program` that calls `op_name`, else ''."""
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(op_name + "."):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                path = path.removeprefix("model.") or "the model itself"
                return f" (in module {path}, a {cls.rsplit('.', 1)[-1]})"
    return ""


def written_opset(path: Path) -> int:
    """The default-domain opset the ONNX file declares (the exporter keeps its own, 18, when it cannot
    convert to the one asked for, and says so only in its log)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet():
    """The ONNX exporter prints its progress to stdout and logs warnings and tracebacks of conversions it
    gives up on (checked after it by `written_opset`): only our lines are the output."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --------------------------------------------------------------------------- verification


def load_runner(path: Path, fmt: str):
    """A function batch -> numpy output of the saved artifact, loaded back from its file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"verifying the ONNX export needs onnxruntime (not installed): {INSTALL_HINT}") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    module = torch.export.load(str(path)).module()
    return lambda x: module(x).detach()


def verification_images(loaded: LoadedModel, images: str | None, n: int = VERIFY_IMAGES) -> tuple[torch.Tensor, str]:
    """(uint8 (n, 3, S, S) as predict shows them to the model, where they come from): `images`, else the
    run's validation split; a one-line error when neither can be read."""
    from ddp_finetune.inference.predict import PredictImages, input_transform, list_inputs

    if images is not None:
        found = list_inputs([images], loaded.cfg.data.image_column)
        where = images
    else:
        found, where = _validation_inputs(loaded)
    dataset = PredictImages(found, input_transform(loaded.card))
    batch = []
    for index in range(len(dataset)):
        _, x, _, _ = dataset[index]
        if x is not None:
            batch.append(x)
        if len(batch) == n:
            break
    if not batch:
        raise UserError(f"no readable image in {where} to verify the export on; give --images DIR")
    return torch.stack(batch), where


def _validation_inputs(loaded: LoadedModel):
    import datasets

    from ddp_finetune.data.sources import load_splits
    from ddp_finetune.inference.predict import Inputs, Item

    cfg = loaded.cfg
    try:
        splits = load_splits(cfg.data, cfg.seed, cfg.task)
    except Exception as exc:  # moved or deleted data, another machine: not an error of the model
        raise UserError(
            f"the run's data (data.path={cfg.data.path}) cannot be read to verify the export ({first_line(exc)[:150]}); "
            "give --images DIR with a few images"
        ) from None
    ds = splits.val.select(range(min(len(splits.val), VERIFY_IMAGES * 2)))
    column = cfg.data.image_column
    if isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # the stored bytes, read as predict reads them
    items = [Item(f"val#{row}", str(row), table=0, row=row) for row in range(len(ds))]
    return Inputs(items=items, tables=[(ds, column)]), f"the validation split ({splits.val_source})"


def verify(loaded: LoadedModel, run, images: torch.Tensor, batch, preprocessing: bool, indices: bool) -> dict:
    """Run the artifact and the PyTorch model (fed as `evaluate` feeds it) on the same images, at the
    fixed batch or at two batch sizes; returns the max abs difference and what was compared."""
    from ddp_finetune.data.transforms import DeviceInput

    sizes = [1, max(2, min(len(images), VERIFY_IMAGES))] if batch == "dynamic" else [batch]
    normalize = DeviceInput(loaded.card.mean, loaded.card.std)
    worst, mismatched = 0.0, 0
    for size in sizes:
        x = images[torch.arange(size) % len(images)]  # repeated to fill a batch larger than the images
        with torch.no_grad():
            want = split_outputs(loaded.model(normalize(x)))[0].float()
        got = run(x if preprocessing else normalize(x))
        if tuple(got.shape[:1]) != (size,):
            raise UserError(f"the exported model gave an output of shape {tuple(got.shape)} for a batch of {size}")
        if indices:
            # an argmax may flip where two classes tie within rounding: count only clear disagreements
            top2 = want.topk(2, dim=1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-3
            mismatched += int(((got != want.argmax(1)) & clear).sum())
        else:
            worst = max(worst, float((got.float() - want).abs().max()))
    return {"max_abs_diff": worst, "batch_sizes": sizes, "images": len(images), "mismatched_pixels": mismatched}


# --------------------------------------------------------------------------- the command


def default_out(loaded: LoadedModel, fmt: str) -> Path:
    return (loaded.run_dir or loaded.folder.parent) / "export" / fmt / f"model{FORMATS[fmt]}"


def card_path(out: Path) -> Path:
    """The card beside the artifact: model.json for model.onnx / model.pt2."""
    return out.with_suffix(".json")


def export_model(model_path, fmt: str = "onnx", opts: ExportOptions | None = None, overrides=()) -> dict:
    """Export a run folder's (or final/ folder's) model, verify it, put it in place; returns its card's export section."""
    from ddp_finetune.distributed import launched_world_size

    if launched_world_size() > 1:  # N processes would race to write one file; there is nothing to split
        raise UserError(
            f"export runs in one process (launched with {launched_world_size()}); run `ddp-finetune export` "
            "without accelerate launch / torchrun"
        )
    opts = check_options(dataclasses.replace(opts or ExportOptions(), format=fmt))
    check_backend(opts.format)
    loaded = load_model_folder(model_path, overrides)
    card = loaded.card
    opts = check_options(opts, card)
    out = Path(opts.out) if opts.out else default_out(loaded, opts.format)
    if out.suffix == ".json":  # checked before check_out creates its folder
        raise UserError(
            f"--out {str(out)!r}: the card is written as <name>.json beside the artifact; "
            f"name it {out.stem}{FORMATS[opts.format]}"
        )
    check_out(out)
    images, where = verification_images(loaded, opts.images)
    preprocessing = opts.preprocessing == "include"
    indices = opts.output == "indices"
    module = Exportable(loaded.model, card.mean, card.std, preprocessing, indices).eval()

    staging = out.parent / f".{out.name}.partial-export"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed export
    staging.mkdir()
    try:
        artifact = staging / out.name
        program = trace(module, card, opts.batch, preprocessing, opts.format)
        if opts.format == "onnx":
            to_onnx(program, artifact, opts.opset, card, "classes" if indices else "logits")
            if written_opset(artifact) != opts.opset:
                raise UserError(
                    f"the ONNX exporter cannot write opset {opts.opset} for model.name={card.model_name} (it wrote "
                    f"{written_opset(artifact)} and could not convert it); give --opset {written_opset(artifact)} "
                    "or higher"
                )
        else:
            torch.export.save(program, str(artifact))
        checked = verify(loaded, load_runner(artifact, opts.format), images, opts.batch, preprocessing, indices)
        section = _export_section(opts, card, out, checked, where)
        if indices and checked["mismatched_pixels"]:
            raise UserError(
                f"the exported class map differs from PyTorch's on {checked['mismatched_pixels']} pixels where the "
                f"classes are clearly apart; nothing was written to {out}; export the logits (leave out --output)"
            )
        if checked["max_abs_diff"] > opts.atol:
            raise UserError(
                f"the exported model's logits differ from PyTorch's by {checked['max_abs_diff']:.3g} > --atol "
                f"{opts.atol:g}; nothing was written to {out}; try --format "
                f"{'exported-program' if opts.format == 'onnx' else 'onnx'}, or raise --atol if that is acceptable"
            )
        _report(section)  # only once it passed: on failure the error line says the difference
        values = {**dataclasses.asdict(card), "export": section}
        values["class_names"] = list(card.class_names)
        (staging / card_path(out).name).write_text(json.dumps(values, indent=2) + "\n")
        card_file = card_path(out).name
        # the artifact (and its external data, if any) first, the card that describes it last
        for f in sorted(staging.iterdir(), key=lambda f: f.name == card_file):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"export: wrote {out} and {card_path(out).name}", flush=True)
    return section


def _export_section(opts: ExportOptions, card: ModelCard, out: Path, checked: dict, where: str) -> dict:
    size = card.image_size
    batch = "N" if opts.batch == "dynamic" else opts.batch
    if opts.output == "indices":
        output = {"name": "classes", "dtype": "int64", "shape": [batch, size, size]}
    elif card.task == "segmentation":
        output = {"name": "logits", "dtype": "float32", "shape": [batch, card.outputs, size, size]}
    else:
        output = {"name": "logits", "dtype": "float32", "shape": [batch, card.outputs]}
    include = opts.preprocessing == "include"
    return {
        "format": opts.format,
        "file": out.name,
        "opset": opts.opset if opts.format == "onnx" else None,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8" if include else "float32",
            "shape": [batch, 3, size, size],
            "layout": "NCHW, RGB",
            "preprocessing": "normalized inside with mean / std" if include else "normalize with mean / std first",
        },
        "output": output,
        "verified": {**checked, "atol": opts.atol, "on": where},
    }


def _report(section: dict) -> None:
    v = section["verified"]
    sizes = " and ".join(map(str, v["batch_sizes"]))
    what = (
        f"{v['mismatched_pixels']} class-map pixels differ"
        if section["output"]["name"] == "classes"
        else f"max abs diff of the logits {v['max_abs_diff']:.3g} (atol {v['atol']:g})"
    )
    print(f"export: verified on {v['images']} images of {v['on']}, batch {sizes}: {what}", file=sys.stderr, flush=True)
