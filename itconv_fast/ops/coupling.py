"""soft_couple_: the fused soft gradient coupling op (SPEC 2), a typed, validated wrapper around
`torch.ops.itconv_fast.soft_couple_`.

Every argument is checked before any tensor is touched (a rejected call modifies nothing); then the call
goes to the compiled kernel for the tensors' device, or, where there is none, to the pure-PyTorch reference
(`itconv_fast.ops._reference`) with one warning per op and process.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _extension, _reference

__all__ = ["soft_couple_", "COUPLING_KERNELS"]

COUPLING_KERNELS = ("uniform", "triangular")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

if _extension.loaded():

    @torch.library.register_fake("itconv_fast::soft_couple_")
    def _soft_couple_fake(grads, group_sizes, lam, kernel, bandwidth, skip_first):
        # Also the op's Meta kernel, which the dispatcher picks for a list that mixes meta tensors with others:
        # refuse such a list here, as the CPU and CUDA kernels refuse theirs, rather than skip it silently.
        devices = {t.device for t in grads}
        if len(devices) > 1:
            raise ValueError(
                f"soft_couple_: every gradient must be on one device, got {sorted(str(d) for d in devices)}"
            )
        return None


def _memory_span(t: torch.Tensor):
    """(storage address, first byte, one past the last byte) that t can touch."""
    if t.numel() == 0:
        return None
    item = t.element_size()
    start = t.storage_offset()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    base = t.untyped_storage().data_ptr()
    return (t.device, base + start * item, base + (start + extent + 1) * item)


def check_coupling_settings(lam, kernel, bandwidth, skip_first) -> tuple[float, Optional[float]]:
    """Checks the scalar arguments; returns lam and bandwidth as floats."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"soft_couple_: lam must be a number, got {type(lam).__name__}")
    lam = float(lam)
    if math.isnan(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"soft_couple_: lam must lie in [0, 1], got {lam}")
    if kernel not in COUPLING_KERNELS:
        raise ValueError(f"soft_couple_: unknown kernel {kernel!r}; expected one of {COUPLING_KERNELS}")
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise TypeError(f"soft_couple_: bandwidth must be a number or None, got {type(bandwidth).__name__}")
        if math.isnan(bandwidth) or bandwidth < 1:
            raise ValueError(f"soft_couple_: bandwidth must be >= 1, got {bandwidth}")
        bandwidth = float(bandwidth)
    if isinstance(skip_first, bool) or not isinstance(skip_first, int):
        raise TypeError(f"soft_couple_: skip_first must be an int, got {type(skip_first).__name__}")
    if skip_first < 0:
        raise ValueError(f"soft_couple_: skip_first must be >= 0, got {skip_first}")
    return lam, bandwidth


def as_coupling_groups(groups) -> list[list[torch.Tensor]]:
    """Checks the structure (a sequence of sequences of tensors) and returns it as lists."""
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError("soft_couple_: groups must be a sequence of groups (sequences of tensors)")
    out = []
    for gi, group in enumerate(groups):
        if isinstance(group, torch.Tensor) or not isinstance(group, Sequence):
            raise TypeError(f"soft_couple_: group {gi} must be a sequence of tensors, got {type(group).__name__}")
        members = list(group)
        for j, t in enumerate(members):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"soft_couple_: group {gi}, member {j} is a {type(t).__name__}, not a tensor")
        out.append(members)
    return out


def check_coupling_groups(groups: list[list[torch.Tensor]], skip_first: int) -> None:
    """Per-tensor checks, in Python (the compiled op makes the same checks, with the same messages, in C++)."""
    spans = []
    for gi, members in enumerate(groups):
        if not members:
            continue  # an empty group couples nothing
        if skip_first >= len(members):
            raise ValueError(f"soft_couple_: group {gi}: skip_first={skip_first} must be < T={len(members)}")
        first = members[0]
        if first.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"soft_couple_: group {gi}: dtype {first.dtype} is not supported; "
                "use float32, float64, float16 or bfloat16"
            )
        for j, t in enumerate(members):
            if t.shape != first.shape:
                raise ValueError(
                    f"soft_couple_: group {gi}: member {j} has shape {list(t.shape)}, member 0 has {list(first.shape)}"
                )
            if t.dtype != first.dtype:
                raise TypeError(f"soft_couple_: group {gi}: member {j} has dtype {t.dtype}, member 0 has {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"soft_couple_: group {gi}: member {j} is on {t.device}, member 0 on {first.device}")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"soft_couple_: group {gi}, member {j} requires grad; pass gradients (p.grad), not parameters"
                )
            if t.numel() > 0:
                if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
                    raise ValueError(
                        f"soft_couple_: group {gi}: member {j} has internally overlapping memory (expanded?)"
                    )
                extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                start = t.data_ptr()
                spans.append((str(t.device), start, start + extent * t.element_size(), gi, j))
    # Two members sharing memory would be written twice (and race): refuse any overlap.
    spans.sort(key=lambda s: (s[0], s[1]))
    for (dev0, _, end0, g0, j0), (dev1, start1, _, g1, j1) in zip(spans, spans[1:]):
        if dev0 == dev1 and start1 < end0:
            raise ValueError(f"soft_couple_: group {g1}, member {j1} overlaps in memory with group {g0}, member {j0}")


def _soft_couple_one_call(groups, lam, kernel, bandwidth, skip_first) -> bool:
    """The common call (lists or tuples of gradients, all on one device) as one op call, without a
    Python pass over every tensor: the op checks every member in C++, naming its group, before it
    writes anything. Returns False, having done nothing, for any other input."""
    if type(groups) not in (list, tuple) or not all(type(m) in (list, tuple) for m in groups):
        return False
    first = next((m[0] for m in groups if len(m) and isinstance(m[0], torch.Tensor)), None)
    if first is not None and not _extension.has_kernels_for(first.device):
        return False  # (the C++ side refuses mixed devices, so the first member's device is the call's)
    if torch.compiler.is_compiling():
        return False  # traced calls take the torch.ops form below (the unboxed door is not traceable)
    try:
        # The extension's unboxed door to the same dispatcher op: no IValue boxing of every tensor,
        # the flattening done in C++.
        return _extension.soft_couple_groups(groups, lam, kernel, bandwidth, skip_first)
    except (TypeError, RuntimeError):
        as_coupling_groups(groups)  # a member that is not a tensor: raise the error that names it
        raise


def soft_couple_(
    groups: Sequence[Sequence[torch.Tensor]],
    lam: float,
    *,
    kernel: str = "uniform",
    bandwidth: Optional[float] = None,
    skip_first: int = 0,
) -> None:
    """Soft gradient coupling of every group, in place, in one fused call (SPEC section 2).

    For each group (g_1..g_T, e.g. the gradients of one parameter slot across the T blocks of a stage):

        g_t <- (1 - lam) * g_t + lam * sum_u K[t, u] * g_u

    Args:
        groups: a sequence of groups; a group is a sequence of same-shaped, same-dtype, same-device
            floating-point tensors (float32/64, float16, bfloat16; any layout). Empty groups are allowed.
        lam: the coupling factor in [0, 1]. 0 leaves every tensor bit-for-bit unchanged; 1 with the
            uniform kernel replaces every member by the group mean.
        kernel: "uniform" (K = 1/T, the paper's equation 2) or "triangular" (K[t, u] proportional to
            max(0, 1 - |t - u| / bandwidth), rows normalised).
        bandwidth: the triangular kernel's width h >= 1 (default: half the number of coupled blocks).
        skip_first: leave the first k members of every group uncoupled; the kernel acts on the rest.

    Raises ValueError / TypeError naming the offending group before touching any tensor.
    Accumulates in float32 (float64 for float64 tensors).
    """
    lam, bandwidth = check_coupling_settings(lam, kernel, bandwidth, skip_first)
    if _extension.loaded() and _soft_couple_one_call(groups, lam, kernel, bandwidth, skip_first):
        return
    checked = as_coupling_groups(groups)
    # Every member's device, not only each group's first: a group that spans devices must be refused here (the
    # compiled op does not expect one: benchmarks/NOTES.md has the history).
    devices = list(dict.fromkeys(t.device for members in checked for t in members))
    if len(devices) > 1 or not all(_extension.has_kernels_for(d) for d in devices):
        # Several per-device calls, and the reference, need every group checked before anything is written.
        check_coupling_groups(checked, skip_first)
    # The op checks every group in C++ (naming it by its index here) before writing anything, and is
    # the identity for lam = 0.
    calls = [checked] if len(devices) <= 1 else [[m for m in checked if m and m[0].device == d] for d in devices]
    for call in calls:
        flat = [t for members in call for t in members]
        if not flat:
            continue  # nothing to dispatch on (and nothing to couple)
        if not _extension.has_kernels_for(flat[0].device):
            if lam != 0.0:
                _extension.warn_fallback("soft_couple_", flat[0].device)
                _reference.soft_couple_(call, lam, kernel=kernel, bandwidth=bandwidth, skip_first=skip_first)
            continue
        torch.ops.itconv_fast.soft_couple_(flat, [len(m) for m in call], lam, kernel, bandwidth, skip_first)
