"""Adaptive depth: the halting network against the full one, at equal error, timed side by side."""

from __future__ import annotations

import torch

from .runner import label_backend, run_comparison


def run_adaptive_depth_benchmark(
    width=16, blocks=8, side=32, n=512, mu=0.5, taus=(0.003, 0.01, 0.03, 0.1, 0.3), device="cpu", min_run_time=1.0
):
    """A converging network (weight-shared blocks, the recurrent init; PCR with spectral normalization mu < 1: a
    contraction, its updates shrink by mu a block; random weights)
    on random inputs labelled by its own predictions (the full network's error is 0): the update rule at the
    largest tau whose error stays within adaptive_depth.ERROR_MARGIN, against the full forward, interleaved.
    The report records that tau, its mean blocks and its FLOPs against the full network's."""
    from ..measures.adaptive_depth import ERROR_MARGIN, adaptive_depth_report, adaptive_forward
    from ..models import IterResNet

    torch.manual_seed(0)
    model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, input_size=side, sn_mu=mu, pcr=True,
                       init="recurrent")  # fmt: skip
    model = model.to(device).eval()
    model.refresh_spectral(50)
    x = torch.randn(n, 3, side, side, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    found = adaptive_depth_report(model, (x, y), taus=taus, confidences=(), agreements=(), batch_size=n)
    curve = found.curve("update")
    fits = [i for i, e in enumerate(curve.errors) if e <= found.full_error + ERROR_MARGIN]
    best = max(fits, key=lambda i: curve.levels[i])  # tau = 0-like levels always fit: the list is never empty
    tau = curve.levels[best]
    key = f"{width}x{blocks}@{side}px,n={n},mu={mu:g}"

    def halting():
        with torch.no_grad():
            return adaptive_forward(model, x, tau)

    def full():
        with torch.no_grad():
            return model(x)

    report, table = run_comparison(
        {key: {"halting (update rule)": halting, "full network": full}},
        label=f"adaptive depth at equal error (tau {tau:g})",
        reference="halting (update rule)",
        device=device,
        min_run_time=min_run_time,
        name="adaptive_depth",
        warmup=1,
    )
    report["equal_error"] = {
        "tau": tau,
        "error": curve.errors[best],
        "full_error": found.full_error,
        "mean_blocks": curve.mean_blocks[best],
        "full_blocks": found.full_blocks,
        "flops_share": curve.mean_flops[best] / found.full_flops,
    }
    return report, label_backend(table)
