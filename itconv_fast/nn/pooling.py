"""Global average pooling whose backward keeps a channels-last input's layout.

ATen pools to 1 x 1 with a mean, and the mean's backward materialises the gradient NCHW whatever the input's
layout. Behind a channels-last ReLU (the head of a network run NHWC) that sends ReLU's backward down ATen's
mixed-layout loop, about 30x slower than its vectorised one (benchmarks/NOTES.md, "Layouts").
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalAvgPool2d"]


def _channels_last_only(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _ChannelsLastGlobalMean(torch.autograd.Function):
    """adaptive_avg_pool2d(x, 1) for a channels-last x; its gradient is mean's (g / (H W), expanded), bit for bit,
    written channels-last."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return nn.functional.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.shape[-2:]
        return (grad / (h * w)).expand(ctx.shape).contiguous(memory_format=torch.channels_last)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d(1) (the same values and gradients), whose gradient for a channels-last input is
    channels-last too."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled() and _channels_last_only(x):
            return _ChannelsLastGlobalMean.apply(x)
        return super().forward(x)
