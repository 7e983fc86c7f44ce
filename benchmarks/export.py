"""Inference on the CPU: ONNX Runtime running `ddp-finetune export`'s ONNX file against PyTorch eager.

    python benchmarks/export.py [--models resnet18 mobilenet_v3_large lraspp_mobilenet_v3_large]
                                [--size 224 --batches 1 32 --threads 1 --rounds 5 --seconds 2]

Each model (random weights: the speed does not depend on them; classifiers with 10 classes, the
segmenter with 21) is exported by the package's own path (`export.Exportable` with preprocessing:
uint8 in, normalization inside; `export.trace` + `export.to_onnx`, opset 18) and run on the same
uint8 batch by both engines, with the same number of threads. Rounds alternate eager and ONNX
Runtime, so a busy machine slows both alike; a round runs one engine for about `--seconds` and
the table gives the median images/s of the rounds, the ratio, and the max abs difference of the
two engines' logits on that batch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEGMENTERS = ("lraspp_", "deeplabv3_", "fcn_")


def _card(name: str, outputs: int, task: str, size: int):
    from ddp_finetune.models import IMAGENET_MEAN, IMAGENET_STD
    from ddp_finetune.models.folder import ModelCard

    return ModelCard(
        model_name=name,
        source="torchvision",
        task=task,
        class_names=tuple(str(i) for i in range(outputs)),
        outputs=outputs,
        image_size=size,
        mean=tuple(IMAGENET_MEAN),
        std=tuple(IMAGENET_STD),
    )


def _cpu() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _rate(run, x, seconds: float) -> float:
    """Images/s of `run(x)` repeated for about `seconds` (at least twice)."""
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < seconds:
        run(x)
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def bench(name: str, args, folder: Path) -> list[dict]:
    import onnxruntime
    import torch

    from ddp_finetune.config import ModelConfig
    from ddp_finetune.inference.export import Exportable, to_onnx, trace
    from ddp_finetune.models import build_model

    task = "segmentation" if name.startswith(SEGMENTERS) else "classification"
    outputs = 21 if task == "segmentation" else 10
    card = _card(name, outputs, task, args.size)
    torch.manual_seed(0)
    model, _, _ = build_model(ModelConfig(name=name, weights=None), outputs, task, image_size=args.size)
    module = Exportable(model.eval(), card.mean, card.std, preprocessing=True).eval()
    path = folder / f"{name}.onnx"
    to_onnx(trace(module, card, "dynamic", True, "onnx"), path, 18, card, "logits")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def ort(x):
        return session.run(None, {"images": x.numpy()})[0]

    def eager(x):
        with torch.inference_mode():
            return module(x)

    rows = []
    for batch in args.batches:
        x = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8)
        diff = float((torch.from_numpy(ort(x)) - eager(x)).abs().max())  # also the warm-up of both
        rates = {"eager": [], "onnxruntime": []}
        for _ in range(args.rounds):
            rates["eager"].append(_rate(eager, x, args.seconds))
            rates["onnxruntime"].append(_rate(ort, x, args.seconds))
        e, o = (statistics.median(rates[k]) for k in ("eager", "onnxruntime"))
        rows.append({"model": name, "batch": batch, "eager": e, "onnxruntime": o, "ratio": o / e, "diff": diff})
        print(
            f"{name} batch {batch}: eager {e:.1f} img/s, onnxruntime {o:.1f} img/s, max abs diff {diff:.2g}", flush=True
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one engine's round")
    args = parser.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += bench(name, args, Path(folder))
    print(
        f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {_cpu()}, "
        f"{args.threads} thread(s), {args.size} px, median of {args.rounds} alternating rounds\n"
    )
    print("| model | batch | PyTorch eager img/s | ONNX Runtime img/s | ORT / eager | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['eager']:.1f} | {r['onnxruntime']:.1f} | {r['ratio']:.2f} | {r['diff']:.1g} |"
        )


if __name__ == "__main__":
    main()
