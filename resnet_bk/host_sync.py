"""Which operators of a forward would stop it from being captured in a CUDA graph: those that read a
value back to the host (`.item()`, `int(t)`, a data-dependent shape such as `nonzero` or a boolean
mask index) and those that build a tensor from Python data (`torch.tensor(...)`, on a GPU a copy
from host memory). Both are refused while a CUDA stream captures; a refused capture can leave the
process's CUDA random-number state unusable, so a caller asks here first instead of trying.

The check runs the forward once under a dispatch mode, on any device (also the CPU, where a test can
run it): `host_syncs(lambda: model(x))` -> the offending operators' names, [] when it can be captured.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that return a value or a shape only the data decides (the host waits for the device).
_READS_BACK = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
# A tensor made from Python data (torch.tensor, as_tensor of a list): a host-to-device copy on a GPU.
_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


def _bool_index(func, args) -> bool:
    """x[mask] / x[mask] = v with a boolean mask: the result's shape is the mask's count."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in _READS_BACK or _bool_index(func, args):
            name = f"{func.overloadpacket.__name__} (reads a value back)"
        elif func in _FROM_HOST:
            name = "torch.tensor from Python data (a host-to-device copy)"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave without output_size (reads a value back)"
        if name is not None and name not in self.found:
            self.found.append(name)
        return func(*args, **kwargs)


def host_syncs(forward: Callable[[], object]) -> list[str]:
    """Run forward() once; return the distinct host syncs it made, in order ([] = capture-safe)."""
    recorder = _Recorder()
    with recorder:
        forward()
    return recorder.found
