"""Count the host syncs of a block of code: the calls that would make the CPU wait for a GPU.

    with host_syncs("cpu") as seen:
        loss_fn(logits, targets).backward()
    assert seen == []

On CUDA, `torch.cuda.set_sync_debug_mode("error")` makes any synchronizing call raise. On the
CPU nothing waits, so the calls that would wait on a GPU are recorded instead: every aten op
that reads a value back to the host (`_local_scalar_dense`: `.item()`, `bool(t)`, `int(t)`,
also inside C++ ops such as `F.one_hot`), ops whose output size depends on the data
(`nonzero`, `masked_select`, boolean indexing), tensors made from Python data
(`torch.tensor([...])`: a copy from the host), and the Python-level reads `tolist`, `numpy`,
`cpu`. The same code path then runs on both devices (the CPU twin of the CUDA check).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_WAITING_OPS = {
    "aten._local_scalar_dense",
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.lift_fresh",
    "aten.lift_fresh_copy",
}
_PYTHON_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class _Recorder(TorchDispatchMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in _WAITING_OPS:
            self.seen.append(name)
        elif name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.seen.append("aten.index (boolean mask)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs(device: str):
    """A list of the host syncs made inside the block (on CUDA: any one raises at once)."""
    seen: list[str] = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    originals = {name: getattr(torch.Tensor, name) for name in _PYTHON_READS}
    own = {name for name in _PYTHON_READS if name in vars(torch.Tensor)}  # the others are inherited

    def recording(name):
        def method(self, *args, **kwargs):
            seen.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return method

    for name in _PYTHON_READS:
        setattr(torch.Tensor, name, recording(name))
    try:
        with _Recorder(seen):
            yield seen
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)
