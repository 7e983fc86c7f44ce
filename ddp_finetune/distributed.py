"""Everything that knows there are several processes: the Accelerator factory, the launcher's
environment, reductions and gathers, main-process printing, the process group's teardown.

    accelerator = make_accelerator(cfg.train.mixed_precision)
    total = sum_across_ranks(torch.stack([loss_sum, count]))   # metrics: sums and counts, not means
    stats = all_reduce_sum_with_grad(stats)                    # losses: sums that carry gradients
    if any_rank(stop_requested, device): ...                   # agreement, e.g. to stop together
    print0("only the main process prints this")

The contract: no other module reads the launcher's variables (`RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`, `SLURM_CPUS_PER_TASK`) or calls `torch.distributed`. Other modules ask
`accelerator.is_main_process` (or `is_main_process()` here) before writing a file, and otherwise
compute the same thing on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from ddp_finetune.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; before the process group exists, the launcher's `RANK` (so `print0`
    prints once also while a run is starting, e.g. when it chooses the checkpoint to resume)."""
    return dist.get_rank() if is_distributed() else launched_rank()


def launched_rank() -> int:
    """This process's rank as the launcher set it (`RANK`): known before any process group exists,
    e.g. to let only the main process claim the output folder, or for the prefix of an error."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes the launcher started (`WORLD_SIZE`; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(mixed_precision: str = "no", log_with=None, project_dir=None, timeout_minutes: float = 60):
    """Build the Accelerator so that a launcher's N processes really are N ranks.

    Without CUDA, `Accelerator()` silently gives every process `num_processes == 1` under
    `accelerate launch --multi_gpu` (docs/pitfalls.md, 1): we pass `cpu=True`, which selects gloo,
    and then compare with the launcher's `WORLD_SIZE`. Gradient accumulation is the loop's own
    (`train.optimizer_step` sees a whole optimizer step's micro-batches at once), so the
    Accelerator is built without it.

    `timeout_minutes` (`train.dist_timeout_minutes`) is how long a collective waits for the slowest
    rank before the run fails. NCCL's default is 10 minutes (gloo's 30), shorter than a large
    dataset's first start-up, when the first rank of each node builds the caches while the others
    wait (`first_on_each_node`); an error on that rank reaches the others at once instead.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise UserError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 loss scaling is CUDA-only here); "
            "use train.mixed_precision=bf16 or no on CPU"
        )
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision,
        # train.batch_size is the global batch: each DataLoader batch is split across ranks.
        # non_blocking: batches from pinned memory are copied without making the host wait for the device
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir) if project_dir else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout_minutes))],
    )
    check_world_size(accelerator.num_processes)
    return accelerator


def check_world_size(num_processes: int) -> None:
    env = os.environ
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if (
        "WORLD_SIZE" not in env
        and env.get("ACCELERATE_USE_CPU", "").lower() == "true"
        and "MASTER_PORT" in env
        and not mpi
    ):
        # accelerate's simple launcher sets MASTER_PORT only when asked for several processes,
        # yet starts one: N-process CPU runs there mean mpirun (docs/pitfalls.md, 2)
        raise UserError(
            "`accelerate launch --cpu --num_processes N` starts ONE process, not N; for N gloo ranks on CPU use "
            "`accelerate launch --multi_gpu --num_processes N` (or --config_file launch/cpu_2proc.yaml)"
        )
    launched = launched_world_size()
    if launched != num_processes:
        raise UserError(
            f"the launcher started WORLD_SIZE={launched} processes but the Accelerator sees "
            f"{num_processes}; on CPU launch with `accelerate launch --multi_gpu --num_processes N` "
            "(not --cpu), see README 'Multi-process on CPU'"
        )


@contextlib.contextmanager
def first_on_each_node(accelerator):
    """The block runs on the first rank of each node, then on the others (what Accelerate's
    `local_main_process_first` does: caches and downloads filled once per node), and a failure of
    the block on any rank stops every rank at once with the same line.

    With Accelerate's version, the ranks that wait sit in a barrier that the failed rank never
    reaches: on other nodes nothing ends them but `train.dist_timeout_minutes`. Here the barrier
    is an all-gather of each first rank's outcome (None, or its error's line), so the waiting ranks
    learn of the error and raise a `UserError` naming the rank and its message."""
    if not is_distributed() or world_size() == 1:
        yield
        return
    if accelerator.is_local_main_process:
        try:
            yield
        except BaseException as exc:
            _share_outcome(exc)
            raise
        _share_outcome(None)
    else:
        _share_outcome(None)  # raises when a first rank failed: the block is not run
        yield


def _share_outcome(exc: BaseException | None) -> None:
    from ddp_finetune.errors import first_line

    line = (
        None
        if exc is None
        else (str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}")
    )
    failed = [(r, text) for r, text in enumerate(gather_objects(line)) if text is not None]
    if failed and exc is None:
        r, text = failed[0]
        raise UserError(f"rank {r} stopped while this rank waited for it: {text}")


def destroy_process_group() -> None:
    """Destroy this process's process group, if it has one; call it on every way out of a run.

    Accelerate's `end_training()` does this only at the end of a successful run; an error, a stop
    request or a crash left the group to interpreter shutdown. There a gloo worker thread that
    releases a finished collective's tensors needs the GIL, which a finalizing interpreter refuses
    by ending the thread: the rank aborts with "terminate called without an active exception"
    (tests/scripts/losses_2proc.py explains the measurements). Destroying the group first lets
    it drain and join those threads while Python is alive, when nothing else (such as a DDP
    model, in torch 2.14) still holds it. Idempotent.
    """
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def session():
    """Around one run in a Python process (`fit`): on every way out, the process group the run
    created is destroyed (one that existed before is the caller's, and stays) and Accelerate's
    process-wide singletons are reset, so the next run builds its Accelerator afresh (another
    mixed precision, another world) and nothing is left to interpreter shutdown."""
    had_group = is_distributed()
    try:
        yield
    finally:
        if not had_group:
            destroy_process_group()
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def is_main_process() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on the main process only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (no gradient). Returns a new tensor; identity on 1 process."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when the flag is true on at least one (used to agree on stopping)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj):
    """The main process's `obj` on every rank (any picklable value); `obj` itself on 1 process.
    Lets the ranks act on one decision that only the main process can make (what a cache holds,
    how much space the output folder has)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` on 1 process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def local_world_size() -> int:
    """Processes on this node (the launcher's `LOCAL_WORLD_SIZE`; 1 without a launcher)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is also a sum over ranks.

    Every rank computes the same loss from the summed statistics, so the gradient reaching each
    rank's local statistic is the sum of the ranks' identical upstream gradients: N times the
    single-process one. DDP then averages parameter gradients (1/N), which makes the parameter
    gradient exactly the single-process gradient of the global batch (docs/pitfalls.md, 4).
    """

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks; identity without a process group."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may run on, where that number comes from)."""
    try:
        cpus, source = len(os.sched_getaffinity(0)), "this process's CPU affinity"
    except AttributeError:  # macOS, Windows
        cpus, source = os.cpu_count() or 1, "os.cpu_count()"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cpus:
        cpus, source = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    return cpus, source


def layout() -> dict:
    """Node rank, node count and main address as the launcher set them (for the start-up line)."""
    env = os.environ
    local = local_world_size()
    return {
        "node_rank": int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
        "num_nodes": max(1, world_size() // local),
        "main_address": f"{env.get('MASTER_ADDR', 'localhost')}:{env.get('MASTER_PORT', '-')}",
    }
