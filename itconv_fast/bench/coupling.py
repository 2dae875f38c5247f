"""Soft gradient coupling: the fused op against the loops a user would write (per slot, `_foreach`,
`torch.compile` of the reference) and the memory floor, on gradients shaped like the paper's ResNets."""

from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from .runner import run_comparison

SLOTS_CONV = 2  # conv1.weight, conv2.weight
SLOTS_BN = 4  # bn1.{weight,bias}, bn2.{weight,bias}


def resnet_gradient_groups(width=16, blocks=16, stages=3, dtype=torch.float32, device="cpu", seed=0):
    """The gradients of every block parameter of the paper's ResNet (SPEC 1): stages x 6 slots groups of T."""
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for s in range(stages):
        c = width * 2**s
        for shape in [(c, c, 3, 3)] * SLOTS_CONV + [(c,)] * SLOTS_BN:
            groups.append([torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(blocks)])
    return groups


def loop_coupling(groups, lam):
    """(a) What users write today: one stack/mean/mul_/add_ round per parameter slot."""
    for group in groups:
        mean = torch.stack(group).mean(0)
        for g in group:
            g.mul_(1 - lam).add_(mean, alpha=lam)


def foreach_coupling(groups, lam):
    """(b) The best pure PyTorch we know: _foreach ops over all slots of the same T at once."""
    by_t: dict[int, list] = {}
    for group in groups:
        by_t.setdefault(len(group), []).append(group)
    for T, gs in by_t.items():
        sums = torch._foreach_add([g[0] for g in gs], [g[1] for g in gs]) if T > 1 else [g[0].clone() for g in gs]
        for u in range(2, T):
            torch._foreach_add_(sums, [g[u] for g in gs])
        torch._foreach_mul_(sums, lam / T)
        for t in range(T):
            members = [g[t] for g in gs]
            torch._foreach_mul_(members, 1 - lam)
            torch._foreach_add_(members, sums)


def compiled_reference(groups, lam):
    """(c) torch.compile of the per-slot reference (compiled once per gradient set and lam)."""
    fn = torch.compile(_reference_functional, dynamic=False)
    return lambda: fn(groups, lam)


def _reference_functional(groups, lam):
    for group in groups:
        stacked = torch.stack(group)
        mixed = (1 - lam) * stacked + lam * stacked.mean(0, keepdim=True)
        for g, m in zip(group, mixed.unbind(0)):
            g.copy_(m)


def fused_coupling(groups, lam):
    """The toolkit's op: one call for every group."""
    ops.soft_couple_(groups, lam)


def copy_floor(groups):
    """(d) The memory floor: copying the same bytes once (read + write each gradient)."""
    total = sum(g.numel() for group in groups for g in group)
    src = torch.empty(total, dtype=groups[0][0].dtype, device=groups[0][0].device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def coupling_cases(groups, lam=0.5, compile_reference=True) -> dict[str, Callable[[], object]]:
    cases = {
        "fused soft_couple_": lambda: fused_coupling(groups, lam),
        "(a) per-slot loop": lambda: loop_coupling(groups, lam),
        "(b) _foreach": lambda: foreach_coupling(groups, lam),
    }
    if compile_reference:
        cases["(c) torch.compile(reference)"] = compiled_reference(groups, lam)
    cases["(d) copy (memory floor)"] = copy_floor(groups)
    return cases


def run_coupling_benchmark(widths=(16, 64), device="cpu", min_run_time=1.0, compile_reference=True, lam=0.5):
    """One coupling step on the ResNet-101 gradient set, every implementation side by side."""
    cases = {}
    for width in widths:
        groups = resnet_gradient_groups(width=width, device=device)
        cases[width] = coupling_cases(groups, lam, compile_reference)
    return run_comparison(
        cases,
        label="soft gradient coupling, ResNet-101 gradients",
        reference="fused soft_couple_",
        device=device,
        min_run_time=min_run_time,
        name="coupling",
    )
