"""Fused BatchNorm + ReLU, the pair every pre-activation block runs twice: relu(F.batch_norm(...)) in one
kernel forward and one backward (training mode), a typed, validated wrapper around
`torch.ops.itconv_fast.batch_norm_relu`. Same values as the two ATen ops to float rounding (the sums run in
another order); in evaluation mode, and without running statistics or affine parameters, it is those two ops.

Every argument is checked before any tensor is touched (a rejected call modifies nothing); then the call goes to
the compiled kernel for the tensors' device, or, where there is none, to the pure-PyTorch reference
(`itconv_fast.ops._reference`) with one warning per process.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from . import _extension, _reference

__all__ = ["batch_norm_relu"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


if _extension.loaded():

    @torch.library.register_fake("itconv_fast::batch_norm_relu")
    def _batch_norm_relu_fake(input, weight, bias, running_mean, running_var, momentum, eps):
        out = torch.empty_like(input, memory_format=_reference._bn_layout(input))
        stat = input.new_empty((input.shape[1],), dtype=_reference._acc_dtype(input.dtype))
        return out, stat, torch.empty_like(stat), torch.empty_like(running_mean), torch.empty_like(running_var)

    @torch.library.register_fake("itconv_fast::batch_norm_relu_backward")
    def _batch_norm_relu_backward_fake(grad_out, input, weight, bias, save_mean, save_invstd):
        return (
            torch.empty_like(input, memory_format=_reference._bn_layout(input)),
            torch.empty_like(weight),
            torch.empty_like(weight),
        )

    # The op's autograd is C++ (csrc/ops/batch_norm_relu.cpp): a Python one costs a visible share of a
    # small step (benchmarks/NOTES.md).


class _ReferenceBatchNormReLU(torch.autograd.Function):
    """The reference with the kernel's backward (the fallback where no kernel serves)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd, new_mean, new_var = _reference.batch_norm_relu(
            input, weight, bias, running_mean, running_var, momentum, eps
        )
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _reference.batch_norm_relu_backward(grad_out, *ctx.saved_tensors)
        return grads + (None,) * 4


def check_arguments(input, running_mean, running_var, weight, bias, momentum, eps) -> None:
    """Raises ValueError / TypeError naming the first bad argument of batch_norm_relu (touches nothing)."""
    name = "batch_norm_relu"
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError(
            f"{name}: input must be a tensor [N, C, ...], got "
            f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}"
        )
    if input.dtype not in _DTYPES:
        raise TypeError(f"{name}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    C = input.shape[1]
    for label, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != C:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must have shape [C={C}], got {got}")
        if t.device != input.device:
            raise ValueError(f"{name}: {label} is on {t.device}, input on {input.device}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{name}: momentum must be in [0, 1], got {momentum}")
    if not float(eps) > 0.0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")


def _fusable(input, running_mean, running_var, weight, bias, training) -> bool:
    """The kernel's case: training, running statistics, affine, more than one value per channel, and parameters
    of one dtype that the input may be normalised with."""
    if not training or any(t is None for t in (running_mean, running_var, weight, bias)):
        return False
    C = input.shape[1]
    if C == 0 or input.numel() // C < 2:
        return False  # F.batch_norm's own error (or empty result) is the one users know
    dtypes = {t.dtype for t in (running_mean, running_var, weight, bias)}
    return len(dtypes) == 1 and dtypes.pop() in (input.dtype, _reference._acc_dtype(input.dtype))


def batch_norm_relu(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """`torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))`.

    In training mode with running statistics, weight and bias, one fused kernel forward and one backward: the
    output is written with ReLU applied, the backward recomputes ReLU's mask from the input (bit for bit the
    forward's), the running statistics are updated in place as F.batch_norm updates them. A channels-last 4-D
    input keeps its layout (output and input gradient); other inputs are normalised contiguous. Double backward
    (create_graph) through the fused path raises a RuntimeError rather than return a wrong second derivative.
    Otherwise the two ATen ops run.
    """
    check_arguments(input, running_mean, running_var, weight, bias, momentum, eps)
    return checked_batch_norm_relu(input, running_mean, running_var, weight, bias, training, momentum, eps)


def checked_batch_norm_relu(input, running_mean, running_var, weight, bias, training, momentum, eps) -> torch.Tensor:
    """batch_norm_relu on arguments that `check_arguments` has accepted (nn.batch_norm_relu checks them before it
    counts the batch, then calls this: one check a call on the training path)."""
    if not _fusable(input, running_mean, running_var, weight, bias, training):
        return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    if _extension.has_kernels_for(input.device):
        out, _, _, new_mean, new_var = torch.ops.itconv_fast.batch_norm_relu(
            input, weight, bias, running_mean, running_var, float(momentum), float(eps)
        )
        running_mean.copy_(new_mean)  # buffers, and the new values carry no gradient: no no_grad context needed
        running_var.copy_(new_var)
        return out
    _extension.warn_fallback("batch_norm_relu", input.device)
    return _ReferenceBatchNormReLU.apply(input, weight, bias, running_mean, running_var, float(momentum), float(eps))
