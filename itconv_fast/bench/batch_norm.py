"""The fused BatchNorm + ReLU (ops.batch_norm_relu) against ATen's two ops, forward and backward in training mode,
at the activation shapes of the paper's ResNet (batch 128, 32 x 32 inputs)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .runner import label_backend, run_comparison

# (channels, side, layout): ResNet-101-16's three stages channels-last; ResNet-29-8's first stage NCHW (the
# quick preset keeps its 8-channel stage's BatchNorm NCHW).
BATCH_NORM_SHAPES = ((16, 32, "nhwc"), (32, 16, "nhwc"), (64, 8, "nhwc"), (8, 32, "nchw"))


def batch_norm_relu_cases(channels: int, side: int, layout: str, batch: int = 128, device: str = "cpu") -> dict:
    """{case: callable}: one training forward and backward of each implementation on the same tensors."""
    from ..ops import batch_norm_relu

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=g).to(device).contiguous(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn(batch, channels, side, side, generator=g).to(device).contiguous(memory_format=fmt)
    weight = torch.ones(channels, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    running_mean, running_var = torch.zeros(channels, device=device), torch.ones(channels, device=device)

    def fused():
        out = batch_norm_relu(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        torch.autograd.grad(out, (x, weight, bias), dy)

    def aten():
        out = torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))
        torch.autograd.grad(out, (x, weight, bias), dy)

    return {"fused batch_norm_relu": fused, "relu(F.batch_norm) (ATen)": aten}


def run_batch_norm_relu_benchmark(
    shapes=BATCH_NORM_SHAPES, batch: int = 128, device: str = "cpu", min_run_time: float = 1.0
):
    """Fused against ATen, forward + backward, per shape; keys "C x side x side layout"."""
    cases = {f"{c}x{s}x{s} {layout}": batch_norm_relu_cases(c, s, layout, batch, device) for c, s, layout in shapes}
    report, table = run_comparison(
        cases,
        label=f"BatchNorm + ReLU, training forward + backward (batch {batch})",
        reference="fused batch_norm_relu",
        device=device,
        min_run_time=min_run_time,
        name="batch_norm_relu",
    )
    return report, label_backend(table)
