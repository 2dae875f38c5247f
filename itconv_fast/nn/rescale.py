"""Rescaling a layer's weight by its spectral norm: W * f(sigma) with f = mu / sigma (hard) or
1 / max(sigma / mu, 1) (soft), by autograd (`rescale_weight`) or with the backward written out for sigma from a
held power vector (`HeldVectorRescale`, Miyato et al. 2018). `spectral_norm` (parametrization.py) uses both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import _reference
from .geometry import LayerGeometry

__all__ = ["rescale_factor", "rescale_weight", "HeldVectorRescale"]

_NORM_EPS = _reference._NORM_EPS


def rescale_factor(sigma: torch.Tensor, mu: float, hard: bool) -> torch.Tensor:
    """f(sigma): mu / sigma (hard) or 1 / max(sigma / mu, 1) (soft)."""
    return mu / sigma.clamp_min(_NORM_EPS) if hard else 1.0 / torch.clamp(sigma / mu, min=1.0)


def _scaled(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """weight * factor in the factor's dtype, returned in the weight's."""
    if weight.dtype == factor.dtype:
        return weight * factor
    return (weight.to(factor.dtype) * factor).to(weight.dtype)


def rescale_weight(weight: torch.Tensor, sigma: torch.Tensor, mu: float, hard: bool) -> torch.Tensor:
    """W * f(sigma), differentiated through sigma by autograd (HeldVectorRescale writes the backward out)."""
    return _scaled(weight, rescale_factor(sigma, mu, hard))


def _sigma_weight_grad(
    g: LayerGeometry, mode: str, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """d <u, A_W v> / dW in the weight's layout (u, v of one layer): u v^T for the reshaped matrix, the
    convolution's weight gradient (input v, output gradient u) for the operator."""
    if mode == "matrix" or g.kind == "linear":
        outer = torch.outer(u.reshape(-1), v.reshape(-1))
        if g.kind == "conv_transpose":
            shape = (weight.shape[1], weight.shape[0]) + tuple(weight.shape[2:])
            return outer.view(shape).transpose(0, 1)
        return outer.view(weight.shape)
    grad_weight = torch.ops.aten.convolution_backward
    if g.kind == "conv_transpose":  # <u, convT(v, W)> = <conv(u, W), v>: input u, output gradient v
        inp, out, padding = u, v, g.padding
    else:
        inp, out = v, u
        if g.symmetric_zero_padding:
            padding = tuple(g.pads[2 * (g.nd - 1 - i)] for i in range(g.nd))
        else:
            inp = F.pad(v, g.pads, mode="constant" if g.padding_mode == "zeros" else g.padding_mode)
            padding = (0,) * g.nd
    return grad_weight(
        out.unsqueeze(0),
        inp.unsqueeze(0),
        weight,
        None,
        list(g.stride),
        list(padding),
        list(g.dilation),
        False,
        [0] * g.nd,
        g.groups,
        [False, True, False],
    )[1]


class HeldVectorRescale(torch.autograd.Function):
    """W * f(sigma), f = 1 / max(sigma / mu, 1) (soft) or mu / sigma (hard), with sigma = <u, A_W v> and
    d sigma / dW taken with u, v held constant (Miyato et al. 2018). sigma comes from the power step, so
    the forward pass costs one pass over W; the backward pass is G f + <G, W> f'(sigma) d sigma / dW,
    without the [B, C_out, K] temporaries of a batched outer product."""

    @staticmethod
    def forward(ctx, weight, sigma, u, v, param):
        factor = rescale_factor(sigma, param.mu, param.hard)
        if param.hard:
            slope = -factor / sigma.clamp_min(_NORM_EPS)  # d(mu / sigma) / d sigma
        else:
            slope = torch.where(sigma / param.mu > 1.0, -factor / sigma.clamp_min(_NORM_EPS), torch.zeros_like(factor))
        ctx.save_for_backward(weight, u, v, factor, slope)
        ctx.param = param
        return _scaled(weight, factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight, u, v, factor, slope = ctx.saved_tensors
        p = ctx.param
        dtype = factor.dtype
        g, w = grad.to(dtype), weight.to(dtype)
        matrix = p.mode == "matrix" or p.geometry.kind == "linear"
        if g.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager CPU: scalars cost no device sync, so skip what is zero and fuse what is not. A layer
            # under its bound (soft mode) passes G through; otherwise one pass for <G, W> and, for
            # matrices, one addr pass for G f + coeff u v^T (instead of outer, scale, add: 3 more).
            f, s = factor.item(), slope.item()
            if s == 0.0:
                out = g if f == 1.0 else g * f
                return out.to(weight.dtype), None, None, None, None
            coeff = torch.dot(g.reshape(-1), w.reshape(-1)).item() * s
            if matrix and p.geometry.kind != "conv_transpose" and g.is_contiguous():
                out = torch.addr(g.view(g.shape[0], -1), u.reshape(-1), v.reshape(-1), beta=f, alpha=coeff)
                return out.view(weight.shape).to(weight.dtype), None, None, None, None
        else:
            coeff = torch.dot(g.reshape(-1), w.reshape(-1)) * slope  # <G, W> f'(sigma)
        if matrix:  # the scale folded into u: one pass fewer than scaling the outer product
            out = _sigma_weight_grad(p.geometry, p.mode, u * coeff, v, w)
        else:
            out = _sigma_weight_grad(p.geometry, p.mode, u, v, w).mul_(coeff)
        out = out.addcmul_(g, factor) if out.is_contiguous() else out + g * factor
        return out.to(weight.dtype), None, None, None, None
