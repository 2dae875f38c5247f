"""Spectral norms (SPEC 3): batched power iterations (operator and matrix modes) and the Gram bound, typed,
validated wrappers around `torch.ops.itconv_fast.power_iteration_*`.

Every argument is checked before any tensor is touched (a rejected call modifies nothing); then the call
goes to the compiled kernel for the tensors' device, or, where there is none, to the pure-PyTorch reference
(`itconv_fast.ops._reference`) with one warning per op and process.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _extension, _reference

__all__ = [
    "batched_spectral_norm",
    "power_iteration",
    "compiled_power_iteration",
    "run_power_iteration",
    "sigma_weight_grad",
    "gram_spectral_bound",
    "gram_bound_nd",
    "init_power_vector",
    "SPECTRAL_MODES",
]

SPECTRAL_MODES = ("operator", "matrix", "gram")

if _extension.loaded():

    @torch.library.register_fake("itconv_fast::power_iteration_operator_")
    def _power_iteration_operator_fake(weight, u, n_iter):
        v = weight.new_empty((weight.shape[0], weight.shape[2], u.shape[2], u.shape[3]))
        return v, weight.new_empty((weight.shape[0],))

    @torch.library.register_fake("itconv_fast::power_iteration_matrix_")
    def _power_iteration_matrix_fake(weight, u, n_iter):
        v = weight.new_empty((weight.shape[0], weight.shape[2] * weight.shape[3] * weight.shape[4]))
        return v, weight.new_empty((weight.shape[0],))

    @torch.library.register_fake("itconv_fast::power_iteration_operator_.list")
    def _power_iteration_operator_list_fake(weights, u, n_iter):
        v = weights[0].new_empty((len(weights), weights[0].shape[1], u.shape[2], u.shape[3]))
        return v, weights[0].new_empty((len(weights),))

    @torch.library.register_fake("itconv_fast::power_iteration_matrix_.list")
    def _power_iteration_matrix_list_fake(weights, u, n_iter):
        v = weights[0].new_empty((len(weights), weights[0][0].numel()))
        return v, weights[0].new_empty((len(weights),))


def _kernels_shape(weight) -> tuple:
    """[B, C_out, C_in, kh, kw] of a 5-D weight or of a sequence of B same-shaped 4-D kernels."""
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 5:
            raise ValueError(
                f"batched_spectral_norm: weight must be a 5-D tensor [B, C_out, C_in, kh, kw] or a "
                f"sequence of 4-D kernels, got shape {tuple(weight.shape)}"
            )
        return tuple(weight.shape)
    if not isinstance(weight, Sequence) or len(weight) == 0:
        raise ValueError(
            f"batched_spectral_norm: weight must be a 5-D tensor or a non-empty sequence of 4-D kernels, "
            f"got {type(weight).__name__}{' (empty)' if isinstance(weight, Sequence) else ''}"
        )
    first = weight[0]
    for b, w in enumerate(weight):
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            got = f"shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"batched_spectral_norm: kernel {b} must be a 4-D tensor [C_out, C_in, kh, kw], got {got}")
        if w.shape != first.shape or w.dtype != first.dtype or w.device != first.device:
            raise ValueError(
                f"batched_spectral_norm: kernel {b} is {tuple(w.shape)} {w.dtype} on {w.device}, "
                f"kernel 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
            )
    return (len(weight),) + tuple(first.shape)


def lead_kernel(weight) -> torch.Tensor:
    """The tensor whose dtype and device stand for all kernels: the 5-D weight, or the list's first."""
    return weight if isinstance(weight, torch.Tensor) else weight[0]


def _check_spectral(weight, u, mode, n_iter, input_size):
    shape = _kernels_shape(weight)
    lead = lead_kernel(weight)
    if lead.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"batched_spectral_norm: weight must be float32 or float64, got {lead.dtype}")
    if math.prod(shape) == 0:
        raise ValueError(f"batched_spectral_norm: weight is empty {shape}")
    if mode not in SPECTRAL_MODES:
        raise ValueError(f"batched_spectral_norm: unknown mode {mode!r}; expected one of {SPECTRAL_MODES}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"batched_spectral_norm: n_iter must be an int >= 1, got {n_iter!r}")
    B, c_out, c_in, kh, kw = shape
    if mode == "operator":
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"batched_spectral_norm: operator mode needs odd kernel sizes, got {kh}x{kw}")
        if input_size is None and u is None:
            raise ValueError("batched_spectral_norm: operator mode needs input_size=(H, W) (or u)")
        if input_size is not None:
            if len(tuple(input_size)) != 2 or any(int(s) < 1 for s in input_size):
                raise ValueError(f"batched_spectral_norm: input_size must be (H, W) with H, W >= 1, got {input_size!r}")
        expected = (B, c_out) + (tuple(int(s) for s in input_size) if input_size is not None else tuple(u.shape[2:]))
    else:
        expected = (B, c_out)
    if u is not None and mode != "gram":
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != expected:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"batched_spectral_norm: u must have shape {expected} for mode {mode!r}, got {got}")
        if u.dtype != lead.dtype or u.device != lead.device:
            raise ValueError(
                f"batched_spectral_norm: u is {u.dtype} on {u.device}, weight {lead.dtype} on {lead.device}"
            )
    return expected


def init_power_vector(weight, mode: str, input_size=None, generator=None) -> torch.Tensor:
    """A random unit starting vector u for `batched_spectral_norm` (one per kernel); weight as there."""
    B, c_out = _kernels_shape(weight)[:2]
    lead = lead_kernel(weight)
    shape = (B, c_out) + (tuple(input_size) if mode == "operator" else ())
    u = torch.randn(shape, generator=generator, dtype=lead.dtype).to(lead.device)
    return _reference._normalize_rows(u)


# Kernels with more work C_in C_out H W than this go kernel by kernel on the CPU (grouped convolutions of
# large kernels are slow there); the same threshold as csrc/ops/spectral_norm.cpp (kGroupedMaxWork).
_GROUPED_MAX_WORK = 2**20


def _conv_weight_grad(v: torch.Tensor, u: torch.Tensor, weight_shape) -> torch.Tensor:
    """d <u_b, conv(v_b, W_b)> / d W_b for every b: [B, C_out, C_in, kh, kw]."""
    B, c_out, c_in, kh, kw = weight_shape
    H, W = u.shape[2:]
    pad = (kh // 2, kw // 2)
    if u.is_cpu and c_in * c_out * H * W > _GROUPED_MAX_WORK:
        return torch.stack(
            [
                torch.nn.grad.conv2d_weight(v[b : b + 1], (c_out, c_in, kh, kw), u[b : b + 1], padding=pad)
                for b in range(B)
            ]
        )
    grad = torch.nn.grad.conv2d_weight(
        v.reshape(1, B * c_in, H, W), (B * c_out, c_in, kh, kw), u.reshape(1, B * c_out, H, W), padding=pad, groups=B
    )
    return grad.view(weight_shape)


class _SigmaOfKernelListWithFixedVectors(torch.autograd.Function):
    """_SigmaWithFixedVectors for kernels given as a list: the same formula, one gradient per kernel."""

    @staticmethod
    def forward(ctx, u, v, sigma, mode, *kernels):
        ctx.save_for_backward(u, v)
        ctx.mode, ctx.shape = mode, (len(kernels),) + tuple(kernels[0].shape)
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad_sigma):
        u, v = ctx.saved_tensors
        grad = sigma_weight_grad(u, v, ctx.mode, ctx.shape) * grad_sigma.view(-1, 1, 1, 1, 1)
        return (None, None, None, None) + tuple(grad.unbind(0))


class _SigmaWithFixedVectors(torch.autograd.Function):
    """sigma_b = <u_b, W_b v_b> (computed by the power-iteration op), with d sigma_b / d W_b = u_b v_b^T
    (in the convolution's sense for operator mode): the iteration vectors held constant (Miyato et al.
    2018). Costs nothing in the forward pass; one weight-gradient convolution in the backward pass."""

    @staticmethod
    def forward(ctx, weight, u, v, sigma, mode):
        ctx.save_for_backward(u, v)
        ctx.mode, ctx.shape = mode, weight.shape
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad_sigma):
        u, v = ctx.saved_tensors
        grad = sigma_weight_grad(u, v, ctx.mode, ctx.shape)
        return grad * grad_sigma.view(-1, 1, 1, 1, 1), None, None, None, None


def gram_spectral_bound(weight: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    """Certified upper bound on each zero-padded convolution's spectral norm, valid for every input size,
    by Gram iteration (Delattre, Barthelemy & Allauzen 2024, arXiv 2402.00240).

    n_iter times the kernel G is replaced by its normalised Gram kernel G G^T in the convolution algebra
    (the kernel correlated with itself at padding k-1: k -> 2k-1 taps), keeping the log of the
    normaliser; the bound is max_o (sum_{i,taps} |G[o, i]|)^(1/2^t) times the carried scale.

    The Gram kernel is formed in the Fourier domain (rfft2 at the full linear size 2k-1, so no wrap-around:
    the same numbers as the grouped conv of `_reference.gram_spectral_bound`, to rounding) because the
    kernel doubles in size each step: a direct conv costs C^3 k^4, the FFT route C^3 k^2. Batched over B,
    differentiable (autograd through the FFTs). weight: [B, C_out, C_in, *kernel] with 0-3 spatial dimensions
    (0: matrices, whose Gram matrix is formed directly).
    """
    nd = weight.dim() - 3
    g = weight if weight.shape[1] >= weight.shape[2] else weight.transpose(1, 2)
    log_scale = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    dims = tuple(range(-nd, 0))
    for _ in range(n_iter):
        if nd == 0:  # matrices: the Gram matrix itself (no FFT; size-1 FFTs also trip inductor)
            norm = g.flatten(1).norm(dim=1).clamp_min(_reference._NORM_EPS)
            g = g / norm.view(-1, 1, 1)
            log_scale = 2 * (log_scale + norm.log())
            g = g @ g.transpose(1, 2)
            continue
        b, co, ci = g.shape[:3]
        ks = tuple(g.shape[3:])
        norm = g.reshape(b, -1).norm(dim=1).clamp_min(_reference._NORM_EPS)
        g = g / norm.view((-1,) + (1,) * (g.dim() - 1))
        log_scale = 2 * (log_scale + norm.log())
        full = tuple(2 * k - 1 for k in ks)
        f = torch.fft.rfftn(g, s=full, dim=dims).reshape(b, co, ci, -1)
        spectrum = tuple(full[:-1]) + (full[-1] // 2 + 1,)
        gram = torch.einsum("boif,bpif->bopf", f, f.conj()).reshape((b, co, co) + spectrum)
        g = torch.roll(torch.fft.irfftn(gram, s=full, dim=dims), shifts=tuple(k - 1 for k in ks), dims=dims)
        g = g.transpose(1, 2)
    power = 2.0 ** (-n_iter)
    row_sums = g.abs().sum(dim=tuple(range(2, g.dim())))
    return (row_sums.pow(power) * torch.exp(log_scale * power).unsqueeze(1)).amax(dim=1)


gram_bound_nd = gram_spectral_bound  # the name nn.geometry and earlier releases use: the same function


def compiled_power_iteration(weight, u, mode: str, n_iter: int):
    """(v, sigma) of the compiled op, u updated in place; None (nothing changed) when the extension has no kernel
    for the kernels' device. `weight`: [B, ...] kernels or a sequence of B of them. No gradient, no validation
    (the callers validate)."""
    as_list = not isinstance(weight, torch.Tensor)
    # Operator mode is composite (ATen convolutions, any device); matrix mode has CPU and CUDA kernels.
    if not (_extension.loaded() and (mode == "operator" or _extension.has_kernels_for(lead_kernel(weight).device))):
        return None
    w = [k.detach() for k in weight] if as_list else weight.detach()
    ops = torch.ops.itconv_fast
    op = ops.power_iteration_operator_ if mode == "operator" else ops.power_iteration_matrix_
    return (op.list if as_list else op.default)(w, u, n_iter)


def run_power_iteration(weight, u, mode: str, n_iter: int, caller: str = "batched_spectral_norm"):
    """(v, sigma) of the compiled op, or of the pure-PyTorch reference (warning once, naming `caller`) where
    none serves; u updated in place. No gradient, no validation (the callers validate)."""
    compiled = compiled_power_iteration(weight, u, mode, n_iter)
    if compiled is not None:
        return compiled
    _extension.warn_fallback(caller, lead_kernel(weight).device)
    as_list = not isinstance(weight, torch.Tensor)
    w = torch.stack([k.detach() for k in weight]) if as_list else weight.detach()
    ref = _reference.power_iteration_operator_ if mode == "operator" else _reference.power_iteration_matrix_
    return ref(w, u, n_iter)


def power_iteration(weight: torch.Tensor, u: torch.Tensor, *, mode: str = "operator", n_iter: int = 1):
    """n_iter power steps on each of B kernels [B, C_out, C_in, kh, kw], u ([B, C_out, H, W] for "operator",
    [B, C_out] for "matrix") updated in place. Returns (v, sigma): the last unit right vectors and
    sigma = <u, W v>, without gradient (see `sigma_weight_grad`; `batched_spectral_norm` attaches it).
    Raises ValueError naming the problem before anything is modified."""
    if mode == "gram":
        raise ValueError("power_iteration: mode 'gram' has no power iteration (use gram_spectral_bound)")
    if u is None:
        raise ValueError("power_iteration: u (the persistent vectors) is required")
    _check_spectral(weight, u, mode, n_iter, None)
    return run_power_iteration(weight, u, mode, n_iter)


def sigma_weight_grad(u: torch.Tensor, v: torch.Tensor, mode: str, weight_shape) -> torch.Tensor:
    """d sigma_b / d W_b = u_b v_b^T (in the convolution's sense for operator mode) for all b, with u and v the
    vectors of `power_iteration` (held constant, Miyato et al. 2018): [B, C_out, C_in, kh, kw]."""
    if mode == "operator":
        return _conv_weight_grad(v, u, weight_shape)
    return (u.unsqueeze(2) * v.unsqueeze(1)).view(weight_shape)


def batched_spectral_norm(
    weight: Union[torch.Tensor, Sequence[torch.Tensor]],
    u: Optional[torch.Tensor] = None,
    *,
    mode: str = "operator",
    n_iter: int = 1,
    input_size=None,
) -> torch.Tensor:
    """The largest singular value of each of B same-shaped convolution kernels, in one batched call.

    Args:
        weight: [B, C_out, C_in, kh, kw] (stride 1, zero padding kh//2, kw//2), float32 or float64; or
            a sequence of B same-shaped 4-D kernels (e.g. the blocks' own weights), read where they lie
            instead of stacked into a new tensor (matrix mode, and operator mode for wide kernels on CPU).
        u: the persistent power-iteration vectors, updated in place: [B, C_out, H, W] for "operator",
            [B, C_out] for "matrix"; unused by "gram". None starts from a random vector (not kept).
        mode: "operator" (power iteration on the convolution as a linear map on input_size = (H, W); tight,
            from below), "matrix" (on the weight reshaped to [C_out, C_in*kh*kw]: the paper's and torch's
            spectral_norm), or "gram" (a certified upper bound for every input size).
        n_iter: power iterations (operator, matrix) or Gram iterations (gram).

    Returns sigma [B], differentiable in weight with the iteration vectors held constant.
    Raises ValueError naming the problem before anything is modified.
    """
    expected = _check_spectral(weight, u, mode, n_iter, input_size)
    as_list = not isinstance(weight, torch.Tensor)
    if mode == "gram":
        return gram_spectral_bound(torch.stack(list(weight)) if as_list else weight, n_iter)
    if u is None:
        u = init_power_vector(weight, mode, expected[2:] if mode == "operator" else None)
    v, sigma = run_power_iteration(weight, u, mode, n_iter)
    # u is updated in place by later calls: the backward pass needs this call's vectors.
    if as_list:
        if torch.is_grad_enabled() and any(k.requires_grad for k in weight):
            return _SigmaOfKernelListWithFixedVectors.apply(u.detach().clone(), v, sigma, mode, *weight)
        return sigma
    if weight.requires_grad and torch.is_grad_enabled():
        return _SigmaWithFixedVectors.apply(weight, u.detach().clone(), v, sigma, mode)
    return sigma
