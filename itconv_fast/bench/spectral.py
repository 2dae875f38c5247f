"""Spectral norms of every block conv of the paper's ResNets: batched against per-layer power iterations and
torch's spectral_norm; the Gram bound's tightness."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .. import ops
from .runner import label_backend, run_comparison

# Spectral norms


def resnet_block_convs(width=16, blocks=16, stages=3, input_size=32, device="cpu", seed=0):
    """The 2 x T block convolutions of every stage of the paper's ResNet: [(weights list, (H, W))] per slot."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots = []
    for s in range(stages):
        c, h = width * 2**s, input_size // 2**s
        for _ in range(2):
            ws = [torch.randn(c, c, 3, 3, generator=gen, device=device) * (2.0 / (9 * c)) ** 0.5 for _ in range(blocks)]
            slots.append((ws, (h, h)))
    return slots


def spectral_cases(slots, device="cpu") -> dict[str, Callable[[], object]]:
    """One power step for every block conv: batched (one call per stage and slot) against per-layer loops."""
    from torch.nn.utils.parametrizations import spectral_norm

    # Batched: one call per stage and slot, on the list of the T blocks' kernels (read where they lie,
    # as the model passes them; a 5-D stack would cost a copy of every weight per call).
    u_op = [ops.init_power_vector(ws, "operator", size) for ws, size in slots]
    u_mat = [ops.init_power_vector(ws, "matrix") for ws, _ in slots]

    def batched(mode, us):
        def run():
            for (ws, size), u in zip(slots, us):
                ops.batched_spectral_norm(ws, u, mode=mode, n_iter=1, input_size=size)

        return run

    # Per layer, matrix: torch's own parametrization (one power step per weight access in training mode).
    convs = []
    for ws, _ in slots:
        for w in ws:
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False).to(device)
            with torch.no_grad():
                conv.weight.copy_(w)
            convs.append(spectral_norm(conv).train())

    def per_layer_matrix():
        for conv in convs:
            conv.weight  # noqa: B018  (runs the power step and the division)

    # Per layer, operator: the conv / conv_transpose loop written by hand.
    per_layer_u = [
        [
            torch.nn.functional.normalize(torch.randn((1, w.shape[0]) + size, device=device).flatten(), dim=0).view(
                (1, w.shape[0]) + size
            )
            for w in ws
        ]
        for ws, size in slots
    ]

    def per_layer_operator():
        with torch.no_grad():
            for (ws, _), us in zip(slots, per_layer_u):
                for w, u in zip(ws, us):
                    v = torch.nn.functional.conv_transpose2d(u, w, padding=1)
                    v = v / v.norm().clamp_min(1e-12)
                    wv = torch.nn.functional.conv2d(v, w, padding=1)
                    sigma = wv.norm()
                    u.copy_(wv / sigma.clamp_min(1e-12))

    return {
        "batched operator": batched("operator", u_op),
        "per-layer operator loop": per_layer_operator,
        "batched matrix": batched("matrix", u_mat),
        "per-layer torch spectral_norm (matrix)": per_layer_matrix,
    }


def run_spectral_benchmark(widths=(16, 64), device="cpu", min_run_time=1.0):
    cases = {w: spectral_cases(resnet_block_convs(width=w, device=device), device) for w in widths}
    report, table = run_comparison(
        cases,
        label="one power step, all 96 block convs of ResNet-101",
        reference="batched operator",
        device=device,
        min_run_time=min_run_time,
        name="spectral",
    )
    report["gram_seconds"] = {}
    for width in widths:
        by_case = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        report["ratios"][f"width {width}"]["per-layer matrix / batched matrix"] = (
            by_case["per-layer torch spectral_norm (matrix)"] / by_case["batched matrix"]
        )
        # The certified bound is far costlier (its kernel doubles per step, cost ~ C^3 k^2): one timed
        # call per step count, at width 16 only (width 64 has 256-channel kernels: minutes).
        if width > 16:
            continue
        slots = resnet_block_convs(width=width, device=device)
        for steps in (3, 4):
            start = time.perf_counter()
            for ws, _ in slots:
                ops.gram_spectral_bound(torch.stack(ws), steps)
            report["gram_seconds"][f"width {width}, {steps} steps"] = time.perf_counter() - start
    return report, label_backend(table)


def gram_tightness(sizes=((3, 3), (8, 8), (16, 16)), channels=4, n_kernels=8, steps=(3, 4, 5, 6), kernels=None, seed=0):
    """bound / exact for random (or given) 3x3 kernels: exact = the materialised operator's 2-norm."""
    gen = torch.Generator().manual_seed(seed)
    if kernels is None:
        kernels = torch.randn(n_kernels, channels, channels, 3, 3, generator=gen, dtype=torch.float64)
    out = {}
    for h, w in sizes:
        c_in = kernels.shape[2]
        n = c_in * h * w
        eye = torch.eye(n, dtype=torch.float64).view(n, c_in, h, w)
        exact = torch.stack(
            [
                torch.linalg.matrix_norm(torch.nn.functional.conv2d(eye, k, padding=1).reshape(n, -1).T, ord=2)
                for k in kernels
            ]
        )
        for t in steps:
            ratio = ops.gram_spectral_bound(kernels, t) / exact
            out[f"{h}x{w}, {t} steps"] = {
                "min": ratio.min().item(),
                "mean": ratio.mean().item(),
                "max": ratio.max().item(),
            }
    return out
