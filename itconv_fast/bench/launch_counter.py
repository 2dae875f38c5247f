"""Counting the device ops a piece of code dispatches: the kernel launches of a step, on a machine without a GPU.

    with LaunchCounter() as counter:
        step()
    counter.launches, counter.syncs, counter.by_op.most_common(5)

A GPU step at our networks' widths is bound by its launches, not its arithmetic (benchmarks/NOTES.md), so the
number of ops that reach a kernel is the figure to keep down. The counter is a TorchDispatchMode: it sees every op
below autograd (the forward's, the backward's that the engine runs, the optimizer's), each once, as the device
would get it. Ops that launch nothing are free: views and metadata (`view`, `t`, `expand`, `detach`, ...) and
allocations that write nothing (`empty`, `empty_like`, `empty_strided`). A read of a value by the host
(`_local_scalar_dense`: `.item()`, `bool(tensor)`) is a synchronisation, counted apart. A foreach op
(`torch._foreach_*`) is one launch on ATen's fast route, where every tensor of its lists shares one device and
one dtype and is dense; off it, ATen runs it tensor by tensor, and it counts one launch a tensor.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "FREE_OPS", "SYNC_OPS"]

# Ops that launch no kernel: views and metadata changes (ATen's view ops and aliases), allocations that write
# nothing, and the profiler's markers.
FREE_OPS = frozenset(
    """
    view _unsafe_view _reshape_alias reshape as_strided t transpose permute expand expand_as unsqueeze squeeze
    slice select narrow split split_with_sizes chunk unbind unfold diagonal flatten unflatten alias detach
    view_as_real view_as_complex lift_fresh empty empty_like empty_strided new_empty new_empty_strided
    _record_function_enter_new _record_function_exit
    """.split()
)
SYNC_OPS = frozenset(("_local_scalar_dense",))


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _launches(name: str, args) -> int:
    if not name.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    tensors = [t for lst in lists for t in lst]
    if not tensors:
        return 1
    first = tensors[0]
    fast = all(t.device == first.device and t.dtype == first.dtype and _dense(t) for t in tensors)
    return 1 if fast else len(lists[0])


class LaunchCounter(TorchDispatchMode):
    """Counts, while active, the ops dispatched that launch a kernel (`launches`, and per op in `by_op`, keyed
    "namespace::name.overload") and the host reads of device values (`syncs`)."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.syncs = 0

    @property
    def launches(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._opname
        if name in SYNC_OPS:
            self.syncs += 1
        elif name not in FREE_OPS:
            self.by_op[f"{func.namespace}::{name}.{func._overloadname}"] += _launches(name, args)
        return func(*args, **(kwargs or {}))
