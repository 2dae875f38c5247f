"""What a layer's linear map is, independent of its weights' values (`LayerGeometry`), and the work on B
layers of one geometry at once: their linear maps as grouped convolutions, their Gram bounds, and the power
steps and sigmas that `spectral_norm` and `BatchedSpectralNorm` run (one batched call per group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _reference
from ..ops.spectral import SPECTRAL_MODES, compiled_power_iteration, gram_spectral_bound, run_power_iteration

__all__ = ["LayerGeometry", "MODES", "supported_layer", "layer_geometry", "gram_sigmas", "transposed_linear"]

MODES = SPECTRAL_MODES  # (defined once, in ops.spectral)
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
        return (
            self.kind == "conv"
            and self.nd == 2
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and kh % 2 == 1
            and kw % 2 == 1
            and self.pads == (kw // 2, kw // 2, kh // 2, kh // 2)
        )


def transposed_linear(module: nn.Module) -> bool:
    """A linear layer that stores its weight transposed, [in, out], and computes x @ W + b: Hugging Face
    transformers' `Conv1D` (GPT-2's attention and MLP projections), parametrized or not (torch's parametrize makes
    a subclass). Recognised by name, without importing transformers."""
    conv1d = any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)
    return conv1d and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def supported_layer(module: nn.Module) -> bool:
    """Whether `spectral_norm` accepts this module type (Linear, ConvNd, ConvTransposeNd, transformers' Conv1D;
    not lazy ones)."""
    if transposed_linear(module):
        return True
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(
        module, nn.modules.lazy.LazyModuleMixin
    )


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def layer_geometry(module: nn.Module, name: str = "module") -> LayerGeometry:
    """The LayerGeometry of a supported layer; TypeError naming the layer for anything else."""
    if not supported_layer(module):
        raise TypeError(
            f"spectral_norm: {name} is a {type(module).__name__}; supported layers are nn.Linear, "
            f"nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d (lazy layers after their first forward) and "
            f"transformers' Conv1D"
        )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        raise ValueError(f"spectral_norm: {name} has no non-empty weight")
    if isinstance(module, nn.Linear) or transposed_linear(module):
        # A transposed linear layer is normalised as stored: W and its transpose have the same singular values,
        # and dividing either by sigma is the same division (its power vectors swap their roles).
        return LayerGeometry("linear", 0, tuple(weight.shape))
    nd = len(module.kernel_size)
    kind = "conv_transpose" if module.transposed else "conv"
    if kind == "conv":
        # nn.Conv*d computes these F.pad paddings for every padding (int, tuple, 'same', 'valid').
        pads = tuple(int(p) for p in module._reversed_padding_repeated_twice)
        padding = module.padding if isinstance(module.padding, str) else _tuple(module.padding, nd)
    else:
        pads, padding = (), _tuple(module.padding, nd)
    return LayerGeometry(
        kind,
        nd,
        tuple(weight.shape),
        _tuple(module.stride, nd),
        padding,
        _tuple(module.dilation, nd),
        int(module.groups),
        module.padding_mode,
        _tuple(module.output_padding, nd) if kind == "conv_transpose" else (),
        pads,
    )


def check_mode_supports(geometry: LayerGeometry, mode: str, name: str) -> None:
    if mode not in MODES:
        raise ValueError(f"spectral_norm: unknown mode {mode!r} for {name}; expected one of {MODES}")
    if mode in ("operator", "gram") and geometry.padding_mode not in ("zeros", "circular"):
        raise ValueError(
            f"spectral_norm: {name} uses padding_mode={geometry.padding_mode!r}; mode {mode!r} supports "
            f"zero and circular padding only (with {geometry.padding_mode} padding the layer is not a "
            f"convolution and its norm can exceed the kernel's); use mode='matrix'"
        )


# ---------------------------------------------------------------------------------------------------
# The linear maps of B same-geometry layers at once: grouped convolutions with groups = B * groups.


def output_size(geometry: LayerGeometry, input_size: tuple) -> tuple:
    if geometry.kind == "linear":
        return ()
    x = torch.empty((1, geometry.in_channels) + tuple(input_size), device="meta")
    w = torch.empty(geometry.weight_shape, device="meta")
    return tuple(_forward_map(geometry, x, w).shape[2:])


def _forward_map(g: LayerGeometry, x: torch.Tensor, wcat: torch.Tensor) -> torch.Tensor:
    """x [B, C_in, *in] -> [B, C_out, *out]: every layer's map on its own slice. wcat:
    the B weights concatenated along dim 0."""
    B, spatial = x.shape[0], x.shape[-g.nd :] if g.nd else ()
    xs = x.reshape((1, B * g.in_channels) + tuple(spatial))
    if g.kind == "conv":
        if g.symmetric_zero_padding:
            y = _CONV[g.nd](
                xs,
                wcat,
                None,
                g.stride,
                tuple(g.pads[2 * (g.nd - 1 - i)] for i in range(g.nd)),
                g.dilation,
                B * g.groups,
            )
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
            target = tuple(
                s + g.pads[2 * (g.nd - 1 - i)] + g.pads[2 * (g.nd - 1 - i) + 1] for i, s in enumerate(input_size)
            )
        k = g.kernel_size
        natural = [(o - 1) * s - 2 * p + d * (kk - 1) + 1 for o, s, p, d, kk in zip(out, g.stride, pad, g.dilation, k)]
        output_padding = tuple(t - n for t, n in zip(target, natural))
        x = _CONV_T[g.nd](ys, wcat, None, g.stride, pad, output_padding, B * g.groups, g.dilation)
        if not g.symmetric_zero_padding:
            x = _pad_adjoint(x, g.pads, g.padding_mode)
    return x.reshape((B, g.in_channels) + tuple(input_size))


def as_matrix(g: LayerGeometry, weight: torch.Tensor) -> torch.Tensor:
    """torch's reshaping: [C_out, -1] for Linear / conv, dim 1 first for ConvTranspose (as torch does)."""
    if g.kind == "conv_transpose":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return weight.reshape(weight.shape[0], -1)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return _reference._normalize_rows(x)


# ---------------------------------------------------------------------------------------------------
# Gram bound of a layer (gram_spectral_bound, in ops, does the arithmetic).


def dilate_kernel(kernel: torch.Tensor, dilation: tuple) -> torch.Tensor:
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
    w = dilate_kernel(weight, g.dilation)
    a, b = w.shape[:2]
    # conv: [C_out, C_in/g]: block j is rows j*C_out/g. conv_transpose: [C_in, C_out/g]: the adjoint's kernel,
    # same norm (the Gram bound does not depend on the spatial flip).
    return w.reshape((g.groups, a // g.groups, b) + tuple(w.shape[2:]))


def gram_sigmas(geometry: LayerGeometry, weights: Sequence[torch.Tensor], n_iter: int = 4) -> torch.Tensor:
    """The certified bound of each of B same-geometry layers: [B], differentiable."""
    kernels = torch.stack([_gram_kernels(geometry, w) for w in weights])  # [B, groups, rows, cols, *k]
    B, groups = kernels.shape[:2]
    bounds = gram_spectral_bound(kernels.flatten(0, 1), n_iter)
    return bounds.view(B, groups).amax(dim=1)


# ---------------------------------------------------------------------------------------------------
# Power steps and sigma for a group of same-geometry layers.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def power_steps(
    geometry: LayerGeometry, mode: str, weights: Sequence[torch.Tensor], u: torch.Tensor, input_size: tuple, n_iter: int
):
    """n_iter power steps for B layers: u [B, ...] updated in place; returns (v [B, ...], sigma [B]), no grad.

    Every step: v = normalize(A^T u), u = normalize(A v), sigma = |A v| (the order of the compiled ops)."""
    with torch.no_grad():
        dtype = u.dtype
        w = [x.detach().to(dtype) for x in weights]
        if mode == "matrix" or geometry.kind == "linear":
            mats = [as_matrix(geometry, x).unsqueeze(-1).unsqueeze(-1) for x in w]
            return run_power_iteration(mats, u, "matrix", n_iter, caller="itconv_fast.nn.spectral_norm (matrix mode)")
        if geometry.extension_operator_path:  # the compiled composite op (any device) where the extension is loaded
            compiled = compiled_power_iteration(w, u, "operator", n_iter)
            if compiled is not None:
                return compiled
        # Any other geometry (strides, dilation, groups, padding modes), or no extension: the maps below.
        wcat = torch.cat(w)
        uu, B = u, u.shape[0]
        for _ in range(n_iter):
            v = normalize_rows(_adjoint_map(geometry, uu, wcat, input_size))
            wv = _forward_map(geometry, v, wcat)
            sigma = wv.reshape(B, -1).norm(dim=1)
            uu = wv / sigma.clamp_min(_NORM_EPS).view((-1,) + (1,) * (wv.dim() - 1))
        u.copy_(uu)
        return v, sigma


def sigmas_from_vectors(
    geometry: LayerGeometry, mode: str, weights: Sequence[torch.Tensor], u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """sigma_b = <u_b, A_b v_b> with autograd to the weights (u, v constants): [B]."""
    dtype = u.dtype
    if mode == "matrix" or geometry.kind == "linear":
        return torch.stack(
            [
                torch.dot(u[b], torch.mv(as_matrix(geometry, w.to(dtype)), v[b].reshape(-1)))
                for b, w in enumerate(weights)
            ]
        )
    wcat = torch.cat([w.to(dtype) for w in weights])
    return (u * _forward_map(geometry, v, wcat)).reshape(u.shape[0], -1).sum(dim=1)
