"""Spectral normalization of residual functions: a Lipschitz bound mu per block (SPEC section 3).

For the residual function f(z) = Conv2(ReLU(BN2(Conv1(ReLU(BN1(z)))))) of block t the upper bound is

    L^_t = sigma(Conv2) * sigma(D2 . Conv1 . D1),    D = diag(gamma / sqrt(running_var + eps)),

with BN's linear parts folded into Conv1's kernel (K'[o, i] = d2[o] K1[o, i] d1[i]). The block then
computes f~_t = f_t / c_t with c_t = max(L^_t / mu, 1): unchanged when L^_t <= mu, bounded by mu otherwise.
(The paper prints c = max(mu / L^, 1), a typo: with it the constraint would not hold.)

`StageSpectralNorm` holds the persistent power-iteration vectors of a stage's T blocks as buffers and
computes every block's correction with one batched call per conv slot.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.spectral import (
    SPECTRAL_MODES,
    batched_spectral_norm,
    init_power_vector,
    lead_kernel,
    power_iteration,
    sigma_weight_grad,
)

__all__ = ["StageSpectralNorm", "fold_batchnorm", "bn_scale", "check_mu"]


def check_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or math.isnan(mu) or mu <= 0:
        raise ValueError(f"spectral normalization: mu must be a number > 0, got {mu!r}")
    return float(mu)


def bn_scale(weight: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """The diagonal of a BatchNorm's linear part in eval form: gamma / sqrt(running_var + eps)."""
    return weight / torch.sqrt(running_var + eps)


def stacked_bn_scales(norms) -> torch.Tensor:
    """[T, C]: every BatchNorm's scale gamma / sqrt(running_var + eps), as one operation on stacked values
    when they share eps (not T: a step's autograd graph is a few nodes shorter per stage, which shows at small
    widths)."""
    eps = norms[0].eps
    if any(n.eps != eps for n in norms):
        return torch.stack([bn_scale(n.weight, n.running_var, n.eps) for n in norms])
    return bn_scale(torch.stack([n.weight for n in norms]), torch.stack([n.running_var for n in norms]), eps)


def fold_batchnorm(conv1: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """K'[t, o, i] = d2[t, o] * K1[t, o, i] * d1[t, i] for stacked kernels [T, C_out, C_in, kh, kw]."""
    return d2[:, :, None, None, None] * conv1 * d1[:, None, :, None, None]


class _BoundedConv2(torch.autograd.Function):
    """conv2_t / c_t for every block of a stage and c_t = max(sigma(F_t) sigma(conv2_t) / mu, 1), as one autograd
    node whose backward is a handful of batched operations: the same function, differentiated by hand, as the
    composite graph of `StageSpectralNorm.forward`. (Fewer nodes alone saved nothing measurable; what it allows
    did: d sigma / dW computed in forward, where u and v are in cache. benchmarks/NOTES.md, "second pass".)

    Its inputs are computed by the caller without gradient (`StageSpectralNorm.bounded_conv2`): the kernels
    [K1; K2] stacked [2T, C, C, k, k], the BN scales d = gamma / s with s = sqrt(running_var + eps) ([2T, C]: BN1
    then BN2), the sigmas [2T] of [F; K2] (F_t = D2_t K1_t D1_t) and d sigma / d [F; K2] with the power vectors
    held constant (`sigma_weight_grad`). The trailing arguments are the parameters themselves (conv1 x T,
    conv2 x T, gamma1 x T, gamma2 x T), there for their gradients only.
    """

    @staticmethod
    def forward(ctx, kernels, d, s, grad_sigma_w, sigma, mu, *params):
        t = kernels.shape[0] // 2
        scaled = sigma[:t] * sigma[t:] / mu
        c = torch.clamp(scaled, min=1.0)
        ctx.save_for_backward(kernels, d, s, grad_sigma_w, sigma, scaled, c)
        ctx.mu = mu
        ctx.mark_non_differentiable(c)
        return kernels[t:] / c.view(-1, 1, 1, 1, 1), c

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        kernels, d, s, grad_sigma_w, sigma, scaled, c = ctx.saved_tensors
        t = kernels.shape[0] // 2
        k1, k2 = kernels[:t], kernels[t:]
        # out_t = K2_t / c_t: d/dK2_t directly, and d/dc_t through the clamp (whose gradient passes where
        # scaled >= 1) to the bound sigma(F_t) sigma(K2_t) / mu, then to both sigmas.
        grad_c = (grad_out * k2).sum(dim=(1, 2, 3, 4)).div_(c * c).neg_()
        grad_bound = torch.where(scaled >= 1.0, grad_c, torch.zeros_like(grad_c)).div_(ctx.mu)
        grad_sigma = torch.cat([grad_bound * sigma[t:], grad_bound * sigma[:t]])  # d/d sigma(F), d/d sigma(K2)
        grad_w = grad_sigma_w * grad_sigma.view(-1, 1, 1, 1, 1)
        grad_folded = grad_w[:t]
        grad_k2 = grad_w[t:].add_(grad_out / c.view(-1, 1, 1, 1, 1))
        # F = d2[o] K1[o, i] d1[i]
        d1, d2 = d[:t, None, :, None, None], d[t:, :, None, None, None]
        grad_k1 = grad_folded * d2 * d1
        weighted = grad_folded * k1
        grad_d = torch.cat([(weighted * d2).sum(dim=(1, 3, 4)), (weighted * d1).sum(dim=(2, 3, 4))])
        grad_gamma = grad_d.div_(s)
        return (None,) * 6 + grad_k1.unbind(0) + grad_k2.unbind(0) + grad_gamma.unbind(0)


class StageSpectralNorm(nn.Module):
    """Lipschitz bound mu on the T residual functions of one stage, batched over the blocks.

    Args:
        blocks: T.
        channels: the stage's width C.
        input_size: (H, W), the stage's feature-map size (operator mode measures the convolution on exactly
            this size).
        mu: the bound (> 0).
        mode: "operator" (default), "matrix" or "gram" (see batched_spectral_norm).
        n_power_iterations: power steps per training forward (default 1; gram: Gram steps, default 4: the
            kernel doubles in size each step, so a 6-step bound of a 64-channel stage costs seconds).
        init_iterations: power steps run at construction so the first bounds are already tight.
    """

    def __init__(
        self,
        blocks: int,
        channels: int,
        input_size: tuple[int, int],
        mu: float,
        mode: str = "operator",
        n_power_iterations: Optional[int] = None,
        kernel_size: int = 3,
        init_iterations: int = 20,
    ) -> None:
        super().__init__()
        self.mu = check_mu(mu)
        if mode not in SPECTRAL_MODES:
            raise ValueError(f"spectral normalization: unknown mode {mode!r}; expected one of {SPECTRAL_MODES}")
        self.mode = mode
        self.input_size = tuple(int(s) for s in input_size)
        self.n_power_iterations = n_power_iterations or (4 if mode == "gram" else 1)
        if self.n_power_iterations < 1:
            raise ValueError(f"spectral normalization: n_power_iterations must be >= 1, got {n_power_iterations}")
        self.init_iterations = init_iterations
        shape_w = torch.empty(blocks, channels, channels, kernel_size, kernel_size)
        gen = torch.Generator().manual_seed(0)
        for name in ("u1", "u2"):
            if mode == "gram":
                self.register_buffer(name, torch.empty(0))
            else:
                self.register_buffer(name, init_power_vector(shape_w, mode, self.input_size, generator=gen))

    def _apply(self, fn, recurse=True):
        # The power vectors are not activations: `.to(memory_format=torch.channels_last)` on a model would make
        # the [T, C, H, W] vectors channels-last, and the power step's grouped convolutions, their weight
        # gradient and the normalisations on them slower (benchmarks/NOTES.md). Keep them dense.
        super()._apply(fn, recurse)
        for name in ("u1", "u2"):
            buffer = getattr(self, name)
            if not buffer.is_contiguous():
                setattr(self, name, buffer.contiguous())
        return self

    def extra_repr(self) -> str:
        return (
            f"mu={self.mu}, mode={self.mode!r}, input_size={self.input_size}, "
            f"n_power_iterations={self.n_power_iterations}"
        )

    @staticmethod
    def _vectors_follow(dtype: torch.dtype, *vectors: torch.Tensor) -> None:
        """Power vectors take the weights' dtype (a model moved to float64, say), in place."""
        for u in vectors:
            if u.dtype != dtype:
                u.data = u.data.to(dtype)

    def _sigma(self, weight: torch.Tensor, u: torch.Tensor, n_iter: int, update: bool) -> torch.Tensor:
        if self.mode == "gram":
            return batched_spectral_norm(weight, mode="gram", n_iter=n_iter)
        self._vectors_follow(lead_kernel(weight).dtype, u)
        target = u if update else u.clone()
        return batched_spectral_norm(weight, target, mode=self.mode, n_iter=n_iter, input_size=self.input_size)

    def bounds(self, conv1, conv2, d1, d2, *, n_iter: Optional[int] = None, update: Optional[bool] = None):
        """L^ for every block: sigma(conv2) * sigma(D2 . conv1 . D1). conv1: [T, C, C, k, k]; conv2: the same
        or a list of T kernels [C, C, k, k]; d1/d2: [T, C].
        Updates the persistent vectors in training mode (or when update=True)."""
        n_iter = n_iter or self.n_power_iterations
        update = self.training if update is None else update
        folded = fold_batchnorm(conv1, d1, d2)
        conv2 = conv2 if isinstance(conv2, torch.Tensor) else torch.stack(list(conv2))
        if self.mode == "gram" or conv2.shape != folded.shape or conv2.dtype != folded.dtype:
            return self._sigma(folded, self.u1, n_iter, update) * self._sigma(conv2, self.u2, n_iter, update)
        # Both conv slots in one batched call ([2T, ...] kernels and vectors): one power-iteration op, one autograd
        # node and one weight-gradient convolution per stage instead of two of each (the per-call overhead is
        # most of the cost at the quick preset's sizes; benchmarks/NOTES.md). Each kernel's iteration is its own,
        # so the numbers are those of two calls.
        self._vectors_follow(folded.dtype, self.u1, self.u2)
        t = folded.shape[0]
        u = torch.cat([self.u1, self.u2])
        sigma = batched_spectral_norm(
            torch.cat([folded, conv2]), u, mode=self.mode, n_iter=n_iter, input_size=self.input_size
        )
        if update:
            with torch.no_grad():
                self.u1.copy_(u[:t])
                self.u2.copy_(u[t:])
        return sigma[:t] * sigma[t:]

    def forward(self, conv1, conv2, d1, d2) -> torch.Tensor:
        """The corrections c_t = max(L^_t / mu, 1), shape [T] (divide each block's residual by its c_t)."""
        return torch.clamp(self.bounds(conv1, conv2, d1, d2) / self.mu, min=1.0)

    def bounded_conv2(self, conv1, conv2, bn1, bn2, *, update: Optional[bool] = None):
        """(conv2_t / c_t stacked [T, C, C, k, k], c [T]) for the blocks' own modules (T conv1, T conv2, T BN1,
        T BN2), with one power step that updates the vectors in training mode (or when update=True): the values
        of forward (bit for bit), computed in a few batched operations on [2T] stacks and one autograd node
        (_BoundedConv2). Operator and matrix modes with one eps per stage; else the composite graph."""
        update = self.training if update is None else update
        t = len(conv1)
        eps = bn1[0].eps
        if self.mode == "gram" or any(n.eps != eps for n in list(bn1) + list(bn2)):
            k2 = torch.stack([m.weight for m in conv2])
            bounds = self.bounds(
                torch.stack([m.weight for m in conv1]),
                k2,
                stacked_bn_scales(bn1),
                stacked_bn_scales(bn2),
                update=update,
            )
            c = torch.clamp(bounds / self.mu, min=1.0)
            return k2 / c.to(k2.dtype).view(-1, 1, 1, 1, 1), c
        params = [m.weight for group in (conv1, conv2, bn1, bn2) for m in group]
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        with torch.no_grad():
            # Dense stacks: kernels of channels-last stages stack into strided 5-D tensors, which would send the
            # grouped power-step convolutions and every elementwise operation on them down slow paths.
            kernels = torch.stack(params[: 2 * t]).contiguous()  # [K1; K2], [2T, C, C, k, k]
            s = torch.sqrt(torch.stack([n.running_var for n in list(bn1) + list(bn2)]) + eps)  # [2T, C]
            d = torch.stack(params[2 * t :]) / s  # bn_scale of every BN: gamma / sqrt(running_var + eps)
            weight = torch.cat([fold_batchnorm(kernels[:t], d[:t], d[t:]), kernels[t:]])  # [F; K2]
            self._vectors_follow(weight.dtype, self.u1, self.u2)
            u = torch.cat([self.u1, self.u2])  # updated by the step; copied back to the buffers when training
            v, sigma = power_iteration(weight, u, mode=self.mode, n_iter=self.n_power_iterations)
            if update:
                self.u1.copy_(u[:t])
                self.u2.copy_(u[t:])
            if not differentiable:
                c = torch.clamp(sigma[:t] * sigma[t:] / self.mu, min=1.0)
                return kernels[t:] / c.view(-1, 1, 1, 1, 1), c
            # d sigma / d [F; K2] now, while u and v are in cache (in backward they are cold: 2x the time there)
            grad_sigma_w = sigma_weight_grad(u, v, self.mode, weight.shape)
        return _BoundedConv2.apply(kernels, d, s, grad_sigma_w, sigma, self.mu, *params)

    @torch.no_grad()
    def refresh(self, conv1, conv2, d1, d2, n_iter: int = 50) -> torch.Tensor:
        """Runs n_iter power steps on the current weights (converging the vectors); returns the bounds."""
        if self.mode == "gram":
            return self.bounds(conv1, conv2, d1, d2, update=False)  # nothing to converge: a certified bound
        return self.bounds(conv1, conv2, d1, d2, n_iter=n_iter, update=True)
