"""The toolkit's ops: typed, validated wrappers around `torch.ops.itconv_fast.*`.

Every op checks its arguments completely before any tensor is touched (a rejected call modifies
nothing), then dispatches to the compiled kernel for the tensors' device, or, without the extension,
to the pure-PyTorch reference in `itconv_fast._reference` (with one warning).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _extension, _reference

__all__ = ["extension_loaded", "soft_couple_", "COUPLING_KERNELS"]

COUPLING_KERNELS = ("uniform", "triangular")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def extension_loaded() -> bool:
    """True when the compiled extension `itconv_fast._C` is loaded (else the references serve)."""
    return _extension.loaded()


# --------------------------------------------------------------------------------------------
# soft_couple_
# --------------------------------------------------------------------------------------------

if _extension.loaded():

    @torch.library.register_fake("itconv_fast::soft_couple_")
    def _soft_couple_fake(grads, group_sizes, lam, kernel, bandwidth, skip_first):
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


def _validate_coupling(groups, lam, kernel, bandwidth, skip_first) -> list[list[torch.Tensor]]:
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
    if isinstance(skip_first, bool) or not isinstance(skip_first, int):
        raise TypeError(f"soft_couple_: skip_first must be an int, got {type(skip_first).__name__}")
    if skip_first < 0:
        raise ValueError(f"soft_couple_: skip_first must be >= 0, got {skip_first}")
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError("soft_couple_: groups must be a sequence of groups (sequences of tensors)")

    checked = []
    spans = []
    for gi, group in enumerate(groups):
        if isinstance(group, torch.Tensor) or not isinstance(group, Sequence):
            raise TypeError(f"soft_couple_: group {gi} must be a sequence of tensors, got {type(group).__name__}")
        members = list(group)
        for j, t in enumerate(members):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"soft_couple_: group {gi}, member {j} is a {type(t).__name__}, not a tensor")
        if not members:
            checked.append(members)  # an empty group couples nothing
            continue
        if skip_first >= len(members):
            raise ValueError(f"soft_couple_: group {gi}: skip_first={skip_first} must be < T={len(members)}")
        first = members[0]
        if first.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"soft_couple_: group {gi}: dtype {first.dtype} is not supported; use one of {_FLOAT_DTYPES}")
        for j, t in enumerate(members[1:], start=1):
            if t.shape != first.shape:
                raise ValueError(f"soft_couple_: group {gi}: member {j} has shape {tuple(t.shape)}, member 0 has {tuple(first.shape)}")
            if t.dtype != first.dtype:
                raise TypeError(f"soft_couple_: group {gi}: member {j} has dtype {t.dtype}, member 0 has {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"soft_couple_: group {gi}: member {j} is on {t.device}, member 0 on {first.device}")
        for j, t in enumerate(members):
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"soft_couple_: group {gi}, member {j} requires grad; pass gradients (p.grad), not parameters")
            span = _memory_span(t)
            if span is not None:
                spans.append((span, gi, j))
        checked.append(members)
    # Writes to memory shared by two members would race (and couple twice): refuse any overlap.
    spans.sort(key=lambda s: (str(s[0][0]), s[0][1]))
    for (prev, pg, pj), (cur, cg, cj) in zip(spans, spans[1:]):
        if prev[0] == cur[0] and cur[1] < prev[2]:
            raise ValueError(f"soft_couple_: group {cg}, member {cj} overlaps in memory with group {pg}, member {pj}")
    return checked


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
    checked = _validate_coupling(groups, lam, kernel, bandwidth, skip_first)
    lam = float(lam)
    bandwidth = None if bandwidth is None else float(bandwidth)
    if lam == 0.0:
        return
    if not _extension.loaded():
        _extension.warn_fallback("soft_couple_")
        _reference.soft_couple_(checked, lam, kernel=kernel, bandwidth=bandwidth, skip_first=skip_first)
        return
    by_device: dict[torch.device, list[list[torch.Tensor]]] = {}
    for members in checked:
        if members:
            by_device.setdefault(members[0].device, []).append(members)
    for device_groups in by_device.values():
        flat = [t for members in device_groups for t in members]
        sizes = [len(members) for members in device_groups]
        torch.ops.itconv_fast.soft_couple_(flat, sizes, lam, kernel, bandwidth, skip_first)
