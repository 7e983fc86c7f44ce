"""`ddp-finetune check-invariance CONFIG`: does *this* config train the same on N processes as on 1?

    ddp-finetune check-invariance my_run.yaml --procs 2 --steps 6

Three short runs of the user's own config (data, model, loss), `train.max_steps` K, every step
logged with `log.trace` (loss, global gradient norm, every group's lr, every micro-batch's loss):

- `single`: 1 process, the config's micro-batch (`batch_size / grad_accum`);
- `accum`:  1 process, `grad_accum` x N: each forward the size of one rank's in the N-process run;
- `procs`:  N processes (`accelerate launch`: gloo on CPU, NCCL on GPUs), the config's `grad_accum`.

`procs` against `accum` is the promise: the same forwards on the same images, summed in another
order, so they agree to rounding (measured: 1.2e-7 after 6 steps on resnet18). `single` against
`accum` differs by the floating-point chaos of a different micro-batch size alone (up to 1e-3 on an
unstable start): printed for scale, never a verdict. With `model.sync_bn` the N-process forward
normalizes over the global micro-batch, as `single` does: `procs` is compared with `single` then.

A divergence names the first step and the first parameter or buffer that differ, and the likely
cause: BatchNorm statistics per rank, a loss that is not synchronized, randomness that depends on
the rank (the micro-batch losses themselves differ), with the fix. Exit 0 invariant, 1 not, 2 bad input.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ddp_finetune.config import Config, load_config
from ddp_finetune.errors import UserError

TOLERANCE = 1e-5
"""Largest relative difference (of a step's loss, gradient norm, lr, or a tensor: max |a - b| / max |a|)
still called rounding between `procs` and its reference."""

RUNS = ("single", "accum", "procs")


@dataclass
class Run:
    name: str
    records: list[dict]  # the train records of metrics.jsonl, one per step
    state: dict  # final/model.safetensors: every parameter and buffer


@dataclass
class Comparison:
    """Where two runs first differ, and by how much at most."""

    first_step: int | None = None  # 1-based
    first_step_what: str = ""
    step_max: float = 0.0  # largest relative difference of the per-step values
    first_tensor: str | None = None
    tensor_max: float = 0.0
    tensor_max_name: str = ""
    micro_first_step: int | None = None  # first step whose micro-batch losses differ
    worst: dict = field(default_factory=dict)  # per-step value -> largest relative difference


@dataclass
class Verdict:
    invariant: bool
    reference: str  # the run `procs` was compared with
    against: Comparison
    scale: Comparison  # single vs accum: floating-point chaos of the micro-batch size alone
    causes: list[str]
    tolerance: float
    lines: list[str]


def _rel(a: float, b: float) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if a == b else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _step_values(record: dict) -> dict[str, float]:
    values = {"loss": record["loss"]}
    if record.get("grad_norm") is not None:
        values["grad_norm"] = record["grad_norm"]
    values.update({k: v for k, v in record.items() if k.startswith("lr")})
    return values


def compare(a: Run, b: Run, tolerance: float) -> Comparison:
    """Per step (loss, gradient norm, lrs; then the micro-batch losses) and at the end (every tensor)."""

    out = Comparison()
    for step, (ra, rb) in enumerate(zip(a.records, b.records), start=1):
        va, vb = _step_values(ra), _step_values(rb)
        for key in va.keys() | vb.keys():
            d = _rel(va.get(key), vb.get(key))
            out.worst[key] = max(out.worst.get(key, 0.0), d)
            out.step_max = max(out.step_max, d)
            if d > tolerance and out.first_step is None:
                out.first_step, out.first_step_what = step, f"{key} {va.get(key)!r} vs {vb.get(key)!r}"
        ma, mb = ra.get("micro_losses") or [], rb.get("micro_losses") or []
        if out.micro_first_step is None and len(ma) == len(mb):
            if any(_rel(x, y) > tolerance for x, y in zip(ma, mb)):
                out.micro_first_step = step
    for name, ta in a.state.items():
        tb = b.state.get(name)
        if tb is None or tb.shape != ta.shape:
            out.first_tensor = out.first_tensor or name
            out.tensor_max = math.inf
            continue
        if not ta.is_floating_point():  # counters (BatchNorm's num_batches_tracked): relative to the count
            diff = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
            d = diff / max(ta.double().abs().max().item() if ta.numel() else 0.0, 1.0)
        else:
            diff = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
            d = diff / max(ta.double().abs().max().item() if ta.numel() else 0.0, 1e-12)
        if d > out.tensor_max:
            out.tensor_max, out.tensor_max_name = d, name
        if d > tolerance and out.first_tensor is None:
            out.first_tensor = name
    return out


def _is_bn_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def likely_causes(cfg: Config, against: Comparison, scale: Comparison, cuda: bool, has_bn: bool) -> list[str]:
    """The likely reasons `procs` left its reference, each with its fix, most specific first."""
    from ddp_finetune.losses import LOSSES

    causes = []
    region = cfg.loss.name in LOSSES and LOSSES[cfg.loss.name].is_region()
    user_loss = ":" in cfg.loss.name
    bn_evidence = bool(against.first_tensor and _is_bn_buffer(against.first_tensor)) or scale.first_step == 1
    if has_bn and not cfg.model.freeze_bn and bn_evidence:
        fix = "model.sync_bn=true (GPU) or model.freeze_bn=true" if cuda else "model.freeze_bn=true"
        causes.append(
            "BatchNorm statistics per rank: BatchNorm layers in train mode normalize each rank's micro-batch "
            f"and keep rank 0's running statistics; set {fix}"
        )
    moved = against.first_step is not None or against.first_tensor is not None
    if scale.first_step == 1 and not cfg.model.sync_bn and not causes:
        # before any update the two 1-process runs differ only in the micro-batch size
        if user_loss:
            causes.append(
                f"a loss without global reductions: the user loss {cfg.loss.name} is not a mean of per-sample terms, so "
                "its value depends on the micro-batch, which N processes (or grad_accum) make smaller; reduce its sums "
                "with ddp_finetune.distributed.all_reduce_sum_with_grad before dividing"
            )
        elif cfg.loss.accumulation == "micro_batch" and region:
            causes.append(
                "loss.accumulation=micro_batch: each micro-batch's ratio of sums, averaged; set loss.accumulation=exact"
            )
    if moved:
        if region and not cfg.loss.sync:
            causes.append(
                f"a loss that is not synchronized: loss.name={cfg.loss.name} with loss.sync=false takes each rank's "
                "ratio of sums, not the global batch's; set loss.sync=true"
            )
        # a synchronized built-in loss gives every rank the global value, so only an unsynchronized
        # loss's micro-batch values can be compared between the runs
        if against.micro_first_step is not None and (user_loss or not cfg.loss.sync):
            causes.append(
                f"randomness that depends on the rank: at step {against.micro_first_step} the same micro-batch gave "
                "another loss on another rank (a module or loss drawing from a generator seeded by the rank, or "
                "data that differ per rank); draw from torch's default generator, seeded by `seed`, or from "
                "data.transforms.sample_rng"
            )
        elif user_loss:
            causes.append(
                f"a loss without global reductions: the user loss {cfg.loss.name} gives every micro-batch the same "
                "value on both sides, but combines them per rank (a mean of per-rank means, a per-rank ratio); "
                "reduce its sums with ddp_finetune.distributed.all_reduce_sum_with_grad before dividing"
            )
    if not causes:
        causes.append(
            "not one of the known causes (BatchNorm per rank, an unsynchronized loss, rank-dependent randomness; "
            "dropout and stochastic depth draw their masks per rank: the same training in distribution, not in "
            "numbers); "
            "rerun with --out DIR and compare the three runs' metrics.jsonl and final/ weights"
        )
    return causes


# --------------------------------------------------------------------------- running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "ddp_finetune", "train"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs)]
    launch += ["--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return [*launch, "-m", "ddp_finetune", "train"]


def _run(name: str, config: str, overrides: list[str], procs: int, out: Path, timeout: float) -> Run:
    """One short training run; its per-step records and final weights."""
    from safetensors.torch import load_file

    run_dir = out / name
    cmd = [*_train_cmd(procs), str(config), *overrides, f"output_dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = out / f"{name}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"the {name} run took more than {timeout:.0f} s (log: {log}); lower --steps") from None
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text().splitlines() if "error:" in ln]
        why = lines[-1].strip().split("error: ", 1)[-1] if lines else f"exit {proc.returncode}"
        raise UserError(f"the {name} run of check-invariance failed: {why} (log: {log})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("split") == "train"]
    return Run(name, records, load_file(str(run_dir / "final" / "model.safetensors")))


def check_invariance(
    config: str,
    overrides: list[str] | tuple = (),
    procs: int = 2,
    steps: int = 6,
    out: str | Path | None = None,
    tolerance: float = TOLERANCE,
    timeout: float = 1800,
) -> Verdict:
    """Run the three runs and compare them; the verdict (see the module docstring)."""
    import torch

    if procs < 2:
        raise UserError(f"--procs {procs}: compare at least 2 processes with 1")
    if steps < 1:
        raise UserError(f"--steps {steps}: run at least 1 optimizer step")
    overrides = list(overrides)
    cfg = load_config(config, overrides)
    k = cfg.train.grad_accum
    if cfg.train.batch_size % (procs * k):
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not divide by --procs {procs} x train.grad_accum={k}; "
            f"use a multiple of {procs * k} (or another --procs)"
        )
    common = [
        f"train.max_steps={steps}",
        "log.every_n_steps=1",
        "log.trace=true",
        "log.progress_bar=false",
        "log.report_to=none",
        "checkpoint.every_epoch=false",
        "checkpoint.every_n_steps=null",
        "checkpoint.resume=null",
    ]
    keep = out is not None
    root = Path(out) if keep else Path(tempfile.mkdtemp(prefix="ddp-finetune-invariance-"))
    if keep and root.exists() and any(root.iterdir()):
        raise UserError(f"--out {str(root)!r} is not empty; give a new folder (the three runs go there)")
    root.mkdir(parents=True, exist_ok=True)
    try:
        single = _run("single", config, [*overrides, *common], 1, root, timeout)
        accum = _run("accum", config, [*overrides, *common, f"train.grad_accum={k * procs}"], 1, root, timeout)
        many = _run("procs", config, [*overrides, *common], procs, root, timeout)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    reference = single if cfg.model.sync_bn else accum
    against = compare(reference, many, tolerance)
    scale = compare(single, accum, tolerance)
    # at step 1 (the same weights) 1 process with the config's micro-batch and 1 process x accum N differ only
    # in summation order, unless the objective depends on the micro-batch size, which N processes shrink
    objective_moves = not cfg.model.sync_bn and scale.first_step == 1
    invariant = against.first_step is None and against.first_tensor is None and not objective_moves
    cuda = torch.cuda.is_available()
    has_bn = any(name.endswith("running_mean") for name in many.state)
    causes = [] if invariant else likely_causes(cfg, against, scale, cuda, has_bn)
    moves = scale.first_step_what if objective_moves else None
    lines = _report_lines(procs, k, steps, reference.name, against, scale, tolerance, causes, moves)
    return Verdict(invariant, reference.name, against, scale, causes, tolerance, lines)


def _report_lines(procs, k, steps, ref, against: Comparison, scale: Comparison, tolerance, causes, moves):
    """The verdict as printed; `moves`: how the step-1 loss depends on the micro-batch size (None: it does not)."""
    invariant = against.first_step is None and against.first_tensor is None and moves is None
    desc = {
        "single": "1 process, the config's micro-batch",
        "accum": f"1 process x grad_accum {k * procs}",
    }[ref]
    lines = [
        f"check-invariance: {steps} steps, {procs} processes (grad_accum {k}) against {desc}",
        "  largest relative difference per step: "
        + ", ".join(f"{key} {v:.1e}" for key, v in sorted(against.worst.items())),
        f"  largest relative difference of a parameter or buffer at the end: {against.tensor_max:.1e}"
        + (f" ({against.tensor_max_name})" if against.tensor_max_name else ""),
        f"  for scale, 1 process with the config's micro-batch vs 1 process x grad_accum {k * procs} (floating-point "
        f"chaos of the micro-batch size alone): loss {scale.worst.get('loss', 0.0):.1e} per step, weights "
        f"{scale.tensor_max:.1e} at the end",
    ]
    if invariant:
        lines.append(f"invariant: {procs} processes train as 1 process within {tolerance:g} (exit 0)")
        return lines
    where = [] if against.first_step is not None or against.first_tensor is not None else ["step 1 (see below)"]
    if against.first_step is not None:
        where.append(f"step {against.first_step} ({against.first_step_what})")
    if against.first_tensor is not None:
        where.append(f"first parameter / buffer: {against.first_tensor}")
    lines.append(f"not invariant: first difference above {tolerance:g} at " + "; ".join(where))
    if moves is not None:
        lines.append(
            f"  at step 1 the objective already depends on the micro-batch size, which N processes shrink: {moves}"
        )
    lines += [f"  likely cause: {c}" for c in causes]
    return lines


def check_invariance_command(config, overrides, procs: int, steps: int, out, tolerance: float) -> int:
    verdict = check_invariance(config, overrides, procs=procs, steps=steps, out=out, tolerance=tolerance)
    for line in verdict.lines:
        print(line, flush=True)
    return 0 if verdict.invariant else 1
