"""2-rank check that the synchronized losses equal the 1-process loss of the global batch.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/scripts/losses_2proc.py OUT.json

Launched once by tests/test_losses.py. For every case, both ranks run a DDP-wrapped 1x1 conv on
their part of one global batch (halves, or an uneven 3/5 split) with `sync=True`; rank 0 also
runs an unwrapped copy on the whole batch with `sync=False`, the single-process reference. It
writes the largest relative differences of the loss value and of the parameter gradient after
DDP's averaging. Also recorded: the unsynchronized Dice (must differ, or the test proves
nothing) and a bad target on rank 1 only (must raise on both ranks, not hang).
Every case runs in float64, where the test's 1e-6 tolerance measures the reduction logic and not
rounding (the differences are ~1e-16), and again in float32, the training dtype, where summing
in another order alone moves the gradient by up to ~1e-6 of its largest entry.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import helpers_newloss  # noqa: E402  (tests/ is on PYTHONPATH: run_script_2proc)
import torch
import torch.distributed as dist
from torch import nn

from ddp_finetune import losses as L
from ddp_finetune.distributed import make_accelerator
from ddp_finetune.errors import UserError

helpers_newloss.register()  # a loss added as losses/table.py documents: synchronized like the others
FUNCTIONS = L.LOSS_FUNCTIONS
GLOBAL_BATCH = 8
SPLITS = {"halves": 4, "uneven": 3}
DTYPES = (torch.float64, torch.float32)  # samples on rank 0; rank 1 gets the rest
IGNORE = {"binary": -1, "multilabel": -1, "multiclass": 255}

# (loss, mode, options, segmentation?): every loss x mode plus the options that change the sums
CASES = [(name, mode, {}, True) for name in FUNCTIONS for mode in ("binary", "multilabel", "multiclass")]
CASES += [
    ("dice", "binary", {"per_image": True}, True),
    ("dice", "multiclass", {"per_image": True, "class_weights": [0.5, 1.0, 2.0]}, True),
    ("iou", "multilabel", {"per_image": True}, True),
    ("tversky", "multiclass", {"alpha": 0.3, "beta": 0.7, "class_weights": [1.0, 0.0, 3.0]}, True),
    ("dice", "multiclass", {"ignore_index": 255, "class_weights": [0.2, 1.0, 2.0]}, True),
    ("iou", "binary", {"ignore_index": -1, "smooth": 0.0}, True),
    ("dice_bce", "multilabel", {"ignore_index": -1, "class_weights": [1.0, 2.0, 0.5]}, True),
    ("dice_bce", "multiclass", {"ignore_index": 255, "per_image": True}, True),
    ("focal", "multiclass", {"ignore_index": 255, "class_weights": [0.25, 1.0, 2.0]}, True),
    ("focal", "binary", {"alpha": None, "gamma": 1.5, "ignore_index": -1}, True),
    (
        "cross_entropy",
        "multiclass",
        {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 3.0], "ignore_index": 255},
        True,
    ),
    ("cross_entropy", "multilabel", {"label_smoothing": 0.2, "ignore_index": -1}, True),
    ("cross_entropy", "multiclass", {"label_smoothing": 0.1}, False),
    ("cross_entropy", "binary", {}, False),
    ("focal", "multilabel", {}, False),
    ("dice", "binary", {}, False),
    ("dice", "multiclass", {}, False),
]


def make_batch(mode: str, options: dict, segmentation: bool, seed: int, dtype=torch.float64):
    """One global batch, identical on every rank: inputs (N, 4, S, S) and targets for the mode."""
    g = torch.Generator().manual_seed(seed)
    size = 5 if segmentation else 1
    x = torch.randn(GLOBAL_BATCH, 4, size, size, generator=g, dtype=torch.float64).to(dtype)
    if mode == "multiclass":
        t = torch.randint(0, 3, (GLOBAL_BATCH, size, size), generator=g)
    elif mode == "multilabel":
        t = (torch.rand(GLOBAL_BATCH, 3, size, size, generator=g) > 0.5).to(dtype)
    else:
        t = torch.rand(GLOBAL_BATCH, size, size, generator=g, dtype=torch.float64).to(dtype)
        t = torch.where(t > 0.8, t, (t > 0.5).to(dtype))  # mostly hard, a few soft targets
    if "ignore_index" in options:
        t = torch.where(torch.rand(t.shape, generator=g) < 0.2, torch.full_like(t, options["ignore_index"]), t)
    if not segmentation:
        t = t.reshape(t.shape[0], -1).squeeze(-1) if mode != "multilabel" else t.reshape(t.shape[0], 3)
    return x, t


def head(mode: str, seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(4, 1 if mode == "binary" else 3, kernel_size=1).to(dtype)


def forward(model, x, mode: str, segmentation: bool):
    out = model(x)
    if segmentation:
        return out
    return out.reshape(out.shape[0]) if mode == "binary" else out.reshape(out.shape[0], -1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(accelerator, fn, mode, options, segmentation, split, seed, sync=True, dtype=torch.float64):
    x, t = make_batch(mode, options, segmentation, seed, dtype)
    model = head(mode, seed, dtype)
    result = {}
    if accelerator.is_main_process:  # the 1-process reference: whole batch, no process group
        ref = copy.deepcopy(model)
        ref_loss = fn(forward(ref, x, mode, segmentation), t, mode, sync=False, **options)
        ref_loss.backward()
        ref_grads = [p.grad.detach().clone() for p in ref.parameters()]
    ddp = accelerator.prepare(model)
    lo, hi = (0, split) if accelerator.process_index == 0 else (split, GLOBAL_BATCH)
    loss = fn(forward(ddp, x[lo:hi], mode, segmentation), t[lo:hi], mode, sync=sync, **options)
    loss.backward()  # DDP averages the parameter gradients over the 2 ranks
    losses = accelerator.gather(loss.detach().reshape(1))
    if accelerator.is_main_process:
        grads = [p.grad.detach() for p in ddp.parameters()]
        result = {
            "ref_loss": ref_loss.item(),
            "ref_grad_max": max(float(g.abs().max()) for g in ref_grads),
            "loss_rel": max(rel(v, ref_loss.detach()) for v in losses),
            "grad_rel": max(rel(g, r) for g, r in zip(grads, ref_grads)),
        }
    return result


def bad_target_on_rank1(accelerator) -> str | None:
    """Rank 1 alone holds a target of 2.0: both ranks must raise (and neither hang)."""
    t = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    if accelerator.process_index == 1:
        t[0, 0, 0, 0] = 2.0
    try:
        L.dice_loss(torch.zeros(2, 1, 3, 3, dtype=torch.float64), t, "binary")
    except UserError as exc:
        return str(exc)
    return None


def main(out_path: str) -> None:
    accelerator = make_accelerator()
    results = []
    for i, (name, mode, options, segmentation) in enumerate(CASES):
        for split_name, split in SPLITS.items():
            for dtype in DTYPES:
                r = run_case(
                    accelerator, FUNCTIONS[name], mode, options, segmentation, split, seed=100 + i, dtype=dtype
                )
                results.append(
                    {
                        "loss": name,
                        "mode": mode,
                        "options": options,
                        "segmentation": segmentation,
                        "split": split_name,
                        "dtype": str(dtype).removeprefix("torch."),
                        **r,
                    }
                )
    nosync = run_case(accelerator, L.dice_loss, "binary", {}, True, SPLITS["halves"], seed=7, sync=False)
    messages = [None, None]
    dist.all_gather_object(messages, bad_target_on_rank1(accelerator))
    if accelerator.is_main_process:
        report = {
            "world_size": accelerator.num_processes,
            "results": results,
            "nosync_dice": nosync,
            "bad_target_messages": messages,
        }
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    accelerator.wait_for_everyone()


def exit_without_finalizing() -> None:
    """Leave without running interpreter shutdown (torch 2.14, gloo; issue 8's SIGABRT).

    A gloo worker thread destroys each finished collective's Work a moment after the caller has
    seen it complete. When that moment falls into interpreter shutdown and the Work holds the last
    reference to a Python-created tensor, the thread needs the GIL, the finalizing interpreter
    ends the thread instead (pthread_exit), and the unwinding through a noexcept frame calls
    std::terminate: "terminate called without an active exception" (core dump: the thread in
    ~AsyncAllgatherWork -> TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread while
    the main thread is in Py_FinalizeEx). `destroy_process_group()` avoids it only when it drops
    the group's last reference (its destructor drains the queue and joins the threads while
    Python is alive): once a DDP model has existed in the process, torch keeps the group and its
    threads past it (measured). Here every rank has passed the final barrier and the report is
    closed, so nothing is lost by skipping shutdown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_finalizing()
