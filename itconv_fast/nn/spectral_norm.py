"""Drop-in Lipschitz control for any PyTorch model: spectral normalization of Linear, Conv1d/2d/3d and
ConvTranspose1d/2d/3d layers, per layer or batched over a whole model.

- ``spectral_norm(module, mode=..., mu=...)``: a ``torch.nn.utils.parametrize`` parametrization with the
  habits of ``torch.nn.utils.parametrizations.spectral_norm`` (power vectors ``_u``, ``_v`` as buffers in
  the state dict; one power step per training forward, none in eval; ``remove_parametrizations`` leaves
  the normalised weight), but by default with the layer's *operator* norm: the largest singular value of
  the convolution as a linear map on its input size, stride, dilation, groups and padding included.
  torch's version normalises the kernel reshaped to a matrix, which neither bounds nor equals that.
- ``BatchedSpectralNorm(model, ...)``: the same parametrization on every supported layer, with the power
  steps of layers that share a geometry (kernel shape, stride, padding, input size, ...) run as one
  batched call per group and step instead of one per layer.

Modes (``sigma`` is what the weight is divided by; see ``MODES``):

- "operator": power iteration on the layer's linear map (from below, tight once converged). Input size
  from ``input_size=`` or the first forward. Zero and circular padding; not reflect / replicate (the map
  is then not a convolution and its norm can exceed the kernel's). Linear: the matrix norm.
- "matrix": power iteration on the weight reshaped to [C_out, C_in/groups * prod(kernel)] (torch's
  spectral_norm; ConvTranspose: [C_out/groups, C_in * prod(kernel)], torch's dim=1). Any padding mode.
- "gram": a certified upper bound valid for every input size (Gram iteration, Delattre et al. 2024):
  strides and circular padding can only lower the true norm, dilation and groups are exact
  rewritings. No vectors; costs C^3 k^d per Gram step, so it suits small and medium layers.

Soft by default: W / max(sigma / mu, 1) (rescaled only when sigma > mu, as in invertible ResNets);
``hard=True``: W * mu / sigma. float16 / bfloat16 weights: vectors and iteration in float32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import _extension, _reference
from .ops import gram_bound_nd

__all__ = ["MODES", "SpectralNorm", "spectral_norm", "BatchedSpectralNorm", "supported_layer", "layer_geometry",
           "gram_bound_nd"]

MODES = ("operator", "matrix", "gram")
_NORM_EPS = _reference._NORM_EPS
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ---------------------------------------------------------------------------------------------------
# Geometry: what a layer's linear map is, independent of its weights' values.


@dataclass(frozen=True)
class LayerGeometry:
    """A layer's linear map without its weights. Hashable: layers with equal geometries (and input sizes)
    are batched together.

    kind: "linear", "conv" or "conv_transpose". nd: spatial dimensions (0 for linear). pads: conv's
    explicit paddings in F.pad order (last dimension first, left then right)."""

    kind: str
    nd: int
    weight_shape: tuple
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"
    output_padding: tuple = ()
    pads: tuple = ()

    @property
    def in_channels(self) -> int:
        if self.kind == "linear":
            return self.weight_shape[1]
        if self.kind == "conv":
            return self.weight_shape[1] * self.groups
        return self.weight_shape[0]

    @property
    def out_channels(self) -> int:
        if self.kind == "linear":
            return self.weight_shape[0]
        if self.kind == "conv":
            return self.weight_shape[0]
        return self.weight_shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.weight_shape[2:])

    @property
    def symmetric_zero_padding(self) -> bool:
        return self.padding_mode == "zeros" and all(self.pads[2 * i] == self.pads[2 * i + 1] for i in range(self.nd))

    @property
    def extension_operator_path(self) -> bool:
        """The compiled operator-mode op covers exactly the paper's convolutions: 2-D, stride 1, no dilation
        or groups, zero padding k // 2 around an odd kernel (same size)."""
        kh, kw = self.kernel_size if self.nd == 2 else (0, 0)
        return (self.kind == "conv" and self.nd == 2 and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros" and kh % 2 == 1 and kw % 2 == 1
                and self.pads == (kw // 2, kw // 2, kh // 2, kh // 2))


def supported_layer(module: nn.Module) -> bool:
    """Whether `spectral_norm` accepts this module type (Linear, ConvNd, ConvTransposeNd; not lazy ones)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(
        module, nn.modules.lazy.LazyModuleMixin)


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def layer_geometry(module: nn.Module, name: str = "module") -> LayerGeometry:
    """The LayerGeometry of a supported layer; TypeError naming the layer for anything else."""
    if not supported_layer(module):
        raise TypeError(f"spectral_norm: {name} is a {type(module).__name__}; supported layers are nn.Linear, "
                        f"nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (lazy layers after their first forward)")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        raise ValueError(f"spectral_norm: {name} has no non-empty weight")
    if isinstance(module, nn.Linear):
        return LayerGeometry("linear", 0, tuple(weight.shape))
    nd = len(module.kernel_size)
    kind = "conv_transpose" if module.transposed else "conv"
    if kind == "conv":
        # nn.Conv*d computes these F.pad paddings for every padding (int, tuple, 'same', 'valid').
        pads = tuple(int(p) for p in module._reversed_padding_repeated_twice)
        padding = module.padding if isinstance(module.padding, str) else _tuple(module.padding, nd)
    else:
        pads, padding = (), _tuple(module.padding, nd)
    return LayerGeometry(kind, nd, tuple(weight.shape), _tuple(module.stride, nd), padding,
                         _tuple(module.dilation, nd), int(module.groups), module.padding_mode,
                         _tuple(module.output_padding, nd) if kind == "conv_transpose" else (), pads)


def _check_mode_supports(geometry: LayerGeometry, mode: str, name: str) -> None:
    if mode not in MODES:
        raise ValueError(f"spectral_norm: unknown mode {mode!r} for {name}; expected one of {MODES}")
    if mode in ("operator", "gram") and geometry.padding_mode not in ("zeros", "circular"):
        raise ValueError(f"spectral_norm: {name} uses padding_mode={geometry.padding_mode!r}; mode {mode!r} supports "
                         f"zero and circular padding only (with {geometry.padding_mode} padding the layer is not a "
                         f"convolution and its norm can exceed the kernel's); use mode='matrix'")


# ---------------------------------------------------------------------------------------------------
# The linear maps of B same-geometry layers at once: grouped convolutions with groups = B * groups.


def _output_size(geometry: LayerGeometry, input_size: tuple) -> tuple:
    if geometry.kind == "linear":
        return ()
    x = torch.empty((1, geometry.in_channels) + tuple(input_size), device="meta")
    w = torch.empty(geometry.weight_shape, device="meta")
    return tuple(_forward_map(geometry, x, w).shape[2:])


def _forward_map(g: LayerGeometry, x: torch.Tensor, wcat: torch.Tensor) -> torch.Tensor:
    """x [B, C_in, *in] -> [B, C_out, *out]: every layer's map on its own slice. wcat:
    the B weights concatenated along dim 0."""
    B, spatial = x.shape[0], x.shape[-g.nd:] if g.nd else ()
    xs = x.reshape((1, B * g.in_channels) + tuple(spatial))
    if g.kind == "conv":
        if g.symmetric_zero_padding:
            y = _CONV[g.nd](xs, wcat, None, g.stride, tuple(g.pads[2 * (g.nd - 1 - i)] for i in range(g.nd)),
                            g.dilation, B * g.groups)
        else:
            xs = F.pad(xs, g.pads, mode="constant" if g.padding_mode == "zeros" else g.padding_mode)
            y = _CONV[g.nd](xs, wcat, None, g.stride, 0, g.dilation, B * g.groups)
    else:
        y = _CONV_T[g.nd](xs, wcat, None, g.stride, g.padding, g.output_padding, B * g.groups, g.dilation)
    return y.reshape((B, g.out_channels) + tuple(y.shape[2:]))


def _pad_adjoint(z: torch.Tensor, pads: tuple, mode: str) -> torch.Tensor:
    """The adjoint of F.pad(., pads, mode) for zeros (a crop) and circular (a crop plus the wrapped borders)."""
    nd = len(pads) // 2
    for i in range(nd):
        dim, left, right = z.dim() - 1 - i, pads[2 * i], pads[2 * i + 1]
        n = z.size(dim) - left - right
        core = z.narrow(dim, left, n)
        if mode == "circular" and (left or right):
            core = core.clone()
            if left:
                core.narrow(dim, n - left, left).add_(z.narrow(dim, 0, left))
            if right:
                core.narrow(dim, 0, right).add_(z.narrow(dim, left + n, right))
        z = core
    return z


def _adjoint_map(g: LayerGeometry, y: torch.Tensor, wcat: torch.Tensor, input_size: tuple) -> torch.Tensor:
    """The transpose of _forward_map: [B, C_out, *out] -> [B, C_in, *input_size]."""
    B, out = y.shape[0], tuple(y.shape[2:])
    ys = y.reshape((1, B * g.out_channels) + out)
    if g.kind == "conv_transpose":
        x = _CONV[g.nd](ys, wcat, None, g.stride, g.padding, g.dilation, B * g.groups)
    else:
        if g.symmetric_zero_padding:
            pad = tuple(g.pads[2 * (g.nd - 1 - i)] for i in range(g.nd))
            target = tuple(input_size)
        else:
            pad = (0,) * g.nd
            target = tuple(s + g.pads[2 * (g.nd - 1 - i)] + g.pads[2 * (g.nd - 1 - i) + 1] for i, s in enumerate(input_size))
        k = g.kernel_size
        natural = [(o - 1) * s - 2 * p + d * (kk - 1) + 1 for o, s, p, d, kk in zip(out, g.stride, pad, g.dilation, k)]
        output_padding = tuple(t - n for t, n in zip(target, natural))
        x = _CONV_T[g.nd](ys, wcat, None, g.stride, pad, output_padding, B * g.groups, g.dilation)
        if not g.symmetric_zero_padding:
            x = _pad_adjoint(x, g.pads, g.padding_mode)
    return x.reshape((B, g.in_channels) + tuple(input_size))


def _as_matrix(g: LayerGeometry, weight: torch.Tensor) -> torch.Tensor:
    """torch's reshaping: [C_out, -1] for Linear / conv, dim 1 first for ConvTranspose (as torch does)."""
    if g.kind == "conv_transpose":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return weight.reshape(weight.shape[0], -1)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return _reference._normalize_rows(x)


# ---------------------------------------------------------------------------------------------------
# Gram bound of a layer (gram_bound_nd, in ops, does the arithmetic).


def _dilate(kernel: torch.Tensor, dilation: tuple) -> torch.Tensor:
    """The kernel with dilation - 1 zeros between its taps: a dilated convolution is a plain one with it."""
    if all(d == 1 for d in dilation):
        return kernel
    nd = len(dilation)
    ks = kernel.shape[-nd:]
    shape = tuple(kernel.shape[:-nd]) + tuple(d * (k - 1) + 1 for k, d in zip(ks, dilation))
    out = kernel.new_zeros(shape)
    out[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)] = kernel
    return out


def _gram_kernels(g: LayerGeometry, weight: torch.Tensor) -> torch.Tensor:
    """[groups, rows, cols, *kernel]: the layer's independent blocks, as kernels of plain convolutions whose
    norms bound (strides, circular padding) or equal (groups, dilation, transposition) the layer's."""
    if g.kind == "linear":
        return weight.unsqueeze(0)
    w = _dilate(weight, g.dilation)
    a, b = w.shape[:2]
    # conv: [C_out, C_in/g]: block j is rows j*C_out/g. conv_transpose: [C_in, C_out/g]: the adjoint's kernel,
    # same norm (the Gram bound does not depend on the spatial flip).
    return w.reshape((g.groups, a // g.groups, b) + tuple(w.shape[2:]))


def gram_sigmas(geometry: LayerGeometry, weights: Sequence[torch.Tensor], n_iter: int = 4) -> torch.Tensor:
    """The certified bound of each of B same-geometry layers: [B], differentiable."""
    kernels = torch.stack([_gram_kernels(geometry, w) for w in weights])  # [B, groups, rows, cols, *k]
    B, groups = kernels.shape[:2]
    bounds = gram_bound_nd(kernels.flatten(0, 1), n_iter)
    return bounds.view(B, groups).amax(dim=1)


# ---------------------------------------------------------------------------------------------------
# Power steps and sigma for a group of same-geometry layers.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _power_steps(geometry: LayerGeometry, mode: str, weights: Sequence[torch.Tensor], u: torch.Tensor,
                 input_size: tuple, n_iter: int):
    """n_iter power steps for B layers: u [B, ...] updated in place; returns (v [B, ...], sigma [B]), no grad.

    Every step: v = normalize(A^T u), u = normalize(A v), sigma = |A v| (the order of the compiled ops)."""
    with torch.no_grad():
        dtype = u.dtype
        w = [x.detach().to(dtype) for x in weights]
        if mode == "matrix" or geometry.kind == "linear":
            mats = [_as_matrix(geometry, x).unsqueeze(-1).unsqueeze(-1) for x in w]
            if _extension.has_kernels_for(u.device):
                return torch.ops.itconv_fast.power_iteration_matrix_.list(mats, u, n_iter)
            _extension.warn_fallback("itconv_fast.nn.spectral_norm (matrix mode)", u.device)
            return _reference.power_iteration_matrix_(torch.stack(mats), u, n_iter)
        if geometry.extension_operator_path and _extension.loaded():  # composite op: any device
            return torch.ops.itconv_fast.power_iteration_operator_.list(w, u, n_iter)
        wcat = torch.cat(w)
        uu, B = u, u.shape[0]
        for _ in range(n_iter):
            v = _normalize(_adjoint_map(geometry, uu, wcat, input_size))
            wv = _forward_map(geometry, v, wcat)
            sigma = wv.reshape(B, -1).norm(dim=1)
            uu = wv / sigma.clamp_min(_NORM_EPS).view((-1,) + (1,) * (wv.dim() - 1))
        u.copy_(uu)
        return v, sigma


def _sigmas_from_vectors(geometry: LayerGeometry, mode: str, weights: Sequence[torch.Tensor], u: torch.Tensor,
                         v: torch.Tensor) -> torch.Tensor:
    """sigma_b = <u_b, A_b v_b> with autograd to the weights (u, v constants): [B]."""
    dtype = u.dtype
    if mode == "matrix" or geometry.kind == "linear":
        return torch.stack([torch.dot(u[b], torch.mv(_as_matrix(geometry, w.to(dtype)), v[b].reshape(-1)))
                            for b, w in enumerate(weights)])
    wcat = torch.cat([w.to(dtype) for w in weights])
    return (u * _forward_map(geometry, v, wcat)).reshape(u.shape[0], -1).sum(dim=1)


def _rescale(weight: torch.Tensor, sigma: torch.Tensor, mu: float, hard: bool) -> torch.Tensor:
    factor = mu / sigma.clamp_min(_NORM_EPS) if hard else 1.0 / torch.clamp(sigma / mu, min=1.0)
    if weight.dtype == factor.dtype:
        return weight * factor
    return (weight.to(factor.dtype) * factor).to(weight.dtype)


def _sigma_weight_grad(g: LayerGeometry, mode: str, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
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
    return grad_weight(out.unsqueeze(0), inp.unsqueeze(0), weight, None, list(g.stride), list(padding),
                       list(g.dilation), False, [0] * g.nd, g.groups, [False, True, False])[1]


class _HeldVectorRescale(torch.autograd.Function):
    """W * f(sigma), f = 1 / max(sigma / mu, 1) (soft) or mu / sigma (hard), with sigma = <u, A_W v> and
    d sigma / dW taken with u, v held constant (Miyato et al. 2018). sigma comes from the power step, so
    the forward pass costs one pass over W; the backward pass is G f + <G, W> f'(sigma) d sigma / dW,
    without the [B, C_out, K] temporaries of a batched outer product."""

    @staticmethod
    def forward(ctx, weight, sigma, u, v, param):
        dtype = sigma.dtype
        ratio = sigma / param.mu
        if param.hard:
            factor = param.mu / sigma.clamp_min(_NORM_EPS)
            slope = -factor / sigma.clamp_min(_NORM_EPS)  # d(mu / sigma) / d sigma
        else:
            factor = 1.0 / torch.clamp(ratio, min=1.0)
            slope = torch.where(ratio > 1.0, -factor / sigma.clamp_min(_NORM_EPS), torch.zeros_like(factor))
        ctx.save_for_backward(weight, u, v, factor, slope)
        ctx.param = param
        if weight.dtype == dtype:
            return weight * factor
        return (weight.to(dtype) * factor).to(weight.dtype)

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


# ---------------------------------------------------------------------------------------------------
# The parametrization.


def _check_positive_int(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"spectral_norm: {what} must be an int >= 1 for {name}, got {value!r}")
    return value


class SpectralNorm(nn.Module):
    """The parametrization that `spectral_norm` registers (see the module docstring for the modes).

    Buffers ``_u`` (output space) and ``_v`` (input space), empty until the input size is known (operator
    mode without input_size: the first forward). A BatchedSpectralNorm may hand it its sigma for the current
    forward (`_batched_sigma`), computed in one call with the rest of its group.
    """

    def __init__(self, geometry: LayerGeometry, *, mode: str, mu: float, hard: bool, n_power_iterations: int,
                 input_size: Optional[tuple], init_iterations: int, gram_iterations: int, name: str,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.geometry, self.mode, self.mu, self.hard = geometry, mode, mu, hard
        self.n_power_iterations, self.init_iterations, self.gram_iterations = n_power_iterations, init_iterations, gram_iterations
        self.layer_name = name
        self.input_size = None
        self._batched_sigma = None  # set by BatchedSpectralNorm for one forward
        self.register_buffer("_u", torch.empty(0, dtype=_compute_dtype(dtype), device=device))
        self.register_buffer("_v", torch.empty(0, dtype=_compute_dtype(dtype), device=device))
        if mode != "gram":
            if geometry.kind == "linear" or mode == "matrix":
                self._initialise(())
            elif input_size is not None:
                self._initialise(input_size)

    def extra_repr(self) -> str:
        size = f", input_size={self.input_size}" if self.mode == "operator" and self.geometry.kind != "linear" else ""
        return f"mode={self.mode!r}, mu={self.mu}, hard={self.hard}{size}"

    @property
    def needs_input_size(self) -> bool:
        return self.mode == "operator" and self.geometry.kind != "linear"

    @property
    def initialised(self) -> bool:
        return self.mode == "gram" or self._u.numel() > 0

    def _vector_shapes(self, input_size: tuple) -> tuple:
        g = self.geometry
        if self.mode == "matrix" or g.kind == "linear":
            rows = g.weight_shape[1] if g.kind == "conv_transpose" else g.weight_shape[0]
            return (rows,), (math.prod(g.weight_shape) // rows,)
        return (g.out_channels,) + _output_size(g, input_size), (g.in_channels,) + tuple(input_size)

    def _initialise(self, input_size: tuple, weight: Optional[torch.Tensor] = None) -> None:
        g = self.geometry
        if self.needs_input_size:
            input_size = tuple(int(s) for s in input_size)
            if len(input_size) != g.nd or any(s < 1 for s in input_size):
                raise ValueError(f"spectral_norm: input_size for {self.layer_name} must be {g.nd} sizes >= 1 "
                                 f"(the spatial size of its input), got {input_size!r}")
            try:
                u_shape, v_shape = self._vector_shapes(input_size)
            except RuntimeError as exc:
                raise ValueError(f"spectral_norm: {self.layer_name} cannot take inputs of size {input_size} "
                                 f"({str(exc).splitlines()[0]})") from None
            self.input_size = input_size
        else:
            u_shape, v_shape = self._vector_shapes(())
        dtype, device = self._u.dtype, self._u.device
        # Like torch: random unit vectors, then init_iterations steps when the weight is at hand.
        self._u = _normalize(torch.randn((1,) + u_shape, dtype=dtype).to(device))[0]
        self._v = _normalize(torch.randn((1,) + v_shape, dtype=dtype).to(device))[0]
        if weight is not None and self.init_iterations:
            with torch.no_grad():
                self.power_step([weight], [self], self.init_iterations)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Vectors of a layer whose input size is still unknown take the saved shapes (the saved v is [C_in, *in]).
        u, v = state_dict.get(prefix + "_u"), state_dict.get(prefix + "_v")
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and self._u.numel() == 0 and u.numel() > 0:
            self._u = torch.empty_like(u, dtype=self._u.dtype, device=self._u.device)
            self._v = torch.empty_like(v, dtype=self._v.dtype, device=self._v.device)
            if self.needs_input_size:
                self.input_size = tuple(v.shape[1:])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def power_step(weights: Sequence[torch.Tensor], params: Sequence["SpectralNorm"], n_iter: int):
        """n_iter power steps on B layers of one geometry in one batched call; updates their _u and _v.
        Returns (sigma [B], u [B, ...], v [B, ...]) without gradient: this step's vectors, fresh tensors that
        later steps do not touch (the backward pass of this forward needs them)."""
        p0 = params[0]
        u = torch.stack([p._u for p in params])
        v, sigma = _power_steps(p0.geometry, p0.mode, weights, u, p0.input_size, n_iter)
        with torch.no_grad():
            torch._foreach_copy_([p._u for p in params], list(u.unbind(0)))
            torch._foreach_copy_([p._v for p in params], [x.reshape(p._v.shape) for x, p in zip(v.unbind(0), params)])
        return sigma, u, v.reshape((len(params),) + tuple(p0._v.shape))

    @staticmethod
    def sigmas(weights: Sequence[torch.Tensor], params: Sequence["SpectralNorm"]):
        """(sigma [B], u, v) from the stored vectors, no power step and no gradient; gram: (bound [B] with
        autograd, None, None)."""
        p0 = params[0]
        if p0.mode == "gram":
            return gram_sigmas(p0.geometry, [w.to(_compute_dtype(w.dtype)) for w in weights], p0.gram_iterations), None, None
        u = torch.stack([p._u for p in params])
        v = torch.stack([p._v for p in params])
        with torch.no_grad():
            return _sigmas_from_vectors(p0.geometry, p0.mode, weights, u, v), u, v

    def _sync_dtype(self, weight: torch.Tensor) -> None:
        # model.half() turns floating buffers into float16: the iteration stays in float32 regardless.
        dtype = _compute_dtype(weight.dtype)
        if self._u.dtype != dtype:
            self._u, self._v = self._u.to(dtype), self._v.to(dtype)

    def normalised(self, weight: torch.Tensor, sigma: torch.Tensor, u: Optional[torch.Tensor],
                   v: Optional[torch.Tensor]) -> torch.Tensor:
        """The weight divided by its correction; sigma's gradient is the one with u, v held constant."""
        if self.mode == "gram":
            return _rescale(weight, sigma, self.mu, self.hard)
        return _HeldVectorRescale.apply(weight, sigma, u, v, self)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pending, self._batched_sigma = self._batched_sigma, None
        if pending is not None:
            return self.normalised(weight, *pending)
        if not self.initialised:
            raise RuntimeError(f"spectral_norm: the input size of {self.layer_name} is not known yet; run one forward "
                               f"pass or pass input_size=")
        if self.mode != "gram":
            self._sync_dtype(weight)
        if self.training and self.mode != "gram":
            sigma, u, v = self.power_step([weight], [self], self.n_power_iterations)
        else:
            sigma, u, v = self.sigmas([weight], [self])
        return self.normalised(weight, sigma[0], None if u is None else u[0], None if v is None else v[0])

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Like torch's: assigning a weight stores it as given (it is normalised on the next read).
        return value


def _input_size_hook(param: SpectralNorm):
    nd = param.geometry.nd

    def hook(module, args):
        if _parametrization(module) is not param or not args or not isinstance(args[0], torch.Tensor):
            return
        size = tuple(args[0].shape[-nd:])
        if param.input_size is None:
            param._initialise(size, parametrize_original(module))
        elif size != param.input_size:
            warnings.warn(f"spectral_norm: {param.layer_name} now sees inputs of size {size}; its operator norm is "
                          f"measured on {param.input_size}", RuntimeWarning, stacklevel=2)

    return hook


def parametrize_original(module: nn.Module) -> torch.Tensor:
    return module.parametrizations["weight"].original


def spectral_norm(
    module: nn.Module,
    *,
    mode: str = "operator",
    mu: float = 1.0,
    input_size: Optional[Sequence[int]] = None,
    n_power_iterations: int = 1,
    hard: bool = False,
    init_iterations: int = 15,
    gram_iterations: int = 4,
    name: Optional[str] = None,
) -> nn.Module:
    """Registers a spectral-norm parametrization on ``module.weight`` and returns the module.

    Args:
        module: nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d.
        mode: "operator" (the layer's norm on its input size; default), "matrix" (torch's reshaped kernel)
            or "gram" (certified bound for every input size). See the module docstring.
        mu: the bound (> 0). hard: always divide by sigma / mu (default: only when sigma > mu).
        input_size: the spatial size of the layer's input (operator mode); None: from the first forward.
        n_power_iterations: power steps per training forward. init_iterations: steps when the vectors are
            created (torch uses 15). gram_iterations: Gram steps (mode "gram").
        name: how errors and reports call the layer (default: its class name).
    """
    name = name or type(module).__name__
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"spectral_norm: mu must be a finite number > 0 for {name}, got {mu!r}")
    if not isinstance(hard, bool):
        raise ValueError(f"spectral_norm: hard must be True or False for {name}, got {hard!r}")
    geometry = layer_geometry(module, name)
    _check_mode_supports(geometry, mode, name)
    _check_positive_int(n_power_iterations, "n_power_iterations", name)
    _check_positive_int(gram_iterations, "gram_iterations", name)
    if isinstance(init_iterations, bool) or not isinstance(init_iterations, int) or init_iterations < 0:
        raise ValueError(f"spectral_norm: init_iterations must be an int >= 0 for {name}, got {init_iterations!r}")
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"spectral_norm: {name}.weight is already parametrized; remove that first")
    weight = module.weight
    if not weight.is_floating_point():
        raise TypeError(f"spectral_norm: {name}.weight must be floating point, got {weight.dtype}")
    param = SpectralNorm(geometry, mode=mode, mu=float(mu), hard=hard, n_power_iterations=n_power_iterations,
                         input_size=None, init_iterations=init_iterations, gram_iterations=gram_iterations,
                         name=name, dtype=weight.dtype, device=weight.device)
    if param.needs_input_size and input_size is not None:
        param._initialise(tuple(input_size), weight)
    elif mode != "gram" and not param.needs_input_size and init_iterations:
        with torch.no_grad():
            param.power_step([weight], [param], init_iterations)
    # unsafe: skips torch's trial call (which would need the input size; the parametrization keeps shape
    # and dtype by construction).
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    if param.needs_input_size:
        module._itconv_sn_hook = module.register_forward_pre_hook(_input_size_hook(param))
    return module


def _parametrization(module: nn.Module) -> Optional[SpectralNorm]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations["weight"] if isinstance(p, SpectralNorm)]
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# Batched over a model.


class BatchedSpectralNorm:
    """Spectral normalization of every supported layer of `model`, power steps batched per geometry group.

    Registers `spectral_norm` on every nn.Linear / ConvNd / ConvTransposeNd selected by `include` (None:
    all; a callable (qualified_name, module) -> bool; or a collection of qualified names), and a forward
    pre-hook on `model` that, per group of layers with the same geometry, dtype, device and input size,
    runs one batched call (power steps in training, sigma from the stored vectors in eval) and hands each
    layer its sigma. Results equal applying `spectral_norm` to each layer (to float rounding); the state
    lives in the layers' parametrizations (the model's state_dict). Layers whose input size is still
    unknown (operator mode, no input_size) run on their own in the first forward; the groups form after it.

    Args: as `spectral_norm`; input_sizes: {qualified_name: size} for operator mode, or pass
    `example_input` to run one forward (in eval, no gradient) that records every layer's size.
    `remove()` takes the hook and the parametrizations away, leaving the normalised weights.
    """

    def __init__(self, model: nn.Module, *, mu: float = 1.0, mode: str = "operator",
                 include: Union[None, Callable[[str, nn.Module], bool], Iterable[str]] = None,
                 n_power_iterations: int = 1, hard: bool = False, init_iterations: int = 15, gram_iterations: int = 4,
                 input_sizes: Optional[dict] = None, example_input=None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BatchedSpectralNorm: model must be an nn.Module, got {type(model).__name__}")
        selected = self._select(model, include)
        if not selected:
            raise ValueError("BatchedSpectralNorm: the model has no supported layer (nn.Linear, ConvNd, "
                             "ConvTransposeNd) selected by include")
        input_sizes = dict(input_sizes or {})
        unknown = set(input_sizes) - {n for n, _ in selected}
        if unknown:
            raise ValueError(f"BatchedSpectralNorm: input_sizes names layers that are not selected: {sorted(unknown)}")
        # Check every layer before changing any.
        for qualified, module in selected:
            geometry = layer_geometry(module, qualified)
            _check_mode_supports(geometry, mode, qualified)
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"BatchedSpectralNorm: {qualified}.weight is already parametrized")
        self.model, self.mode = model, mode
        self.layers: list[tuple[str, nn.Module]] = []
        for qualified, module in selected:
            spectral_norm(module, mode=mode, mu=mu, input_size=input_sizes.get(qualified),
                          n_power_iterations=n_power_iterations, hard=hard, init_iterations=init_iterations,
                          gram_iterations=gram_iterations, name=qualified)
            self.layers.append((qualified, module))
        self.n_power_iterations = n_power_iterations
        self._groups: Optional[list[list[tuple[nn.Module, SpectralNorm]]]] = None
        self._hook = model.register_forward_pre_hook(self._pre_forward)
        self._post_hook = model.register_forward_hook(self._post_forward)
        if example_input is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(example_input)
            model.train(was_training)

    @staticmethod
    def _select(model, include):
        layers = [(n, m) for n, m in model.named_modules() if supported_layer(m)]
        if include is None:
            return layers
        if callable(include):
            return [(n, m) for n, m in layers if include(n, m)]
        names = set(include)
        missing = names - {n for n, _ in layers}
        if missing:
            raise ValueError(f"BatchedSpectralNorm: include names no supported layer: {sorted(missing)}")
        return [(n, m) for n, m in layers if n in names]

    @property
    def groups(self) -> list[list[str]]:
        """The layers' qualified names, grouped as the batched calls run them (empty before sizes are known)."""
        names = {id(m): n for n, m in self.layers}
        return [[names[id(m)] for m, _ in group] for group in (self._build_groups() or [])]

    def _build_groups(self):
        if self._groups is None:
            params = [(m, _parametrization(m)) for _, m in self.layers]
            if any(p is None or not p.initialised for _, p in params):
                return None
            keyed: dict = {}
            for m, p in params:
                w = parametrize_original(m)
                key = (p.geometry, p.mode, p.input_size, w.dtype, w.device, p.n_power_iterations, p.gram_iterations)
                keyed.setdefault(key, []).append((m, p))
            self._groups = list(keyed.values())
        return self._groups

    def _pre_forward(self, model, args):
        groups = self._build_groups()
        if groups is None:  # operator-mode sizes are learnt in this forward, layer by layer
            return
        for group in groups:
            modules, params = zip(*group)
            weights = [parametrize_original(m) for m in modules]
            if params[0].mode != "gram":
                for p, w in zip(params, weights):
                    p._sync_dtype(w)
            if params[0].training and params[0].mode != "gram":
                sigma, u, v = SpectralNorm.power_step(weights, params, self.n_power_iterations)
            else:
                sigma, u, v = SpectralNorm.sigmas(weights, params)
            for b, p in enumerate(params):
                p._batched_sigma = (sigma[b], None if u is None else u[b], None if v is None else v[b])

    def _post_forward(self, model, args, output):
        # A layer the forward did not use must not keep this forward's sigma for a later read of its weight.
        for _, m in self.layers:
            _parametrization(m)._batched_sigma = None

    def step(self) -> None:
        """Runs the batched update without a forward (e.g. to converge the vectors before evaluation)."""
        with torch.no_grad():
            self._pre_forward(self.model, ())
        for _, m in self.layers:
            _parametrization(m)._batched_sigma = None

    def remove(self) -> None:
        """Removes the hook and the parametrizations; the layers keep their normalised weights."""
        self._hook.remove()
        self._post_hook.remove()
        for _, m in self.layers:
            hook = getattr(m, "_itconv_sn_hook", None)
            if hook is not None:
                hook.remove()
                del m._itconv_sn_hook
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.layers = []
        self._groups = None
