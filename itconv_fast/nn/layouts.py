"""Memory layouts whose gradients keep the layout of the forward tensors.

A gradient that comes back in another layout than the tensor it belongs to sends the elementwise backward that
meets it (ReLU's, a residual add's) down ATen's mixed-layout loop, many times slower on the CPU than its
vectorised one (benchmarks/NOTES.md, "Layouts", has the figures). Two places make such gradients:
- `x.contiguous(memory_format=...)`: its backward passes the gradient through in the new layout;
  `to_memory_format` converts it back.
- ATen pools to 1 x 1 with a mean, whose backward materialises the gradient NCHW whatever the input's layout;
  `GlobalAvgPool2d` writes it in the input's layout.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalAvgPool2d", "to_memory_format"]


def _channels_last_only(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last_only(x) else torch.contiguous_format


class _ToMemoryFormat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, memory_format):
        ctx.memory_format = _layout_of(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.memory_format), None


def to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """x.contiguous(memory_format=memory_format) (the same values), whose gradient is converted back to x's
    layout (channels-last or contiguous). x itself when it is already in that layout."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.contiguous(memory_format=memory_format)
    return _ToMemoryFormat.apply(x, memory_format)


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
