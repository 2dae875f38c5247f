"""The toolkit's ops: typed, validated wrappers around `torch.ops.itconv_fast.*`.

Every op checks its arguments completely before any tensor is touched (a rejected call modifies
nothing), then dispatches to the compiled kernel for the tensors' device, or, where there is none (the
extension not built, or built without CUDA kernels and given CUDA tensors), to the pure-PyTorch
reference in `itconv_fast._reference`, with one warning per op and process.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _extension, _reference

__all__ = [
    "extension_loaded",
    "soft_couple_",
    "COUPLING_KERNELS",
    "batched_spectral_norm",
    "gram_spectral_bound",
    "init_power_vector",
    "SPECTRAL_MODES",
]

COUPLING_KERNELS = ("uniform", "triangular")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def extension_loaded() -> bool:
    """True when the compiled extension `itconv_fast._C` is loaded (else the references serve)."""
    return _extension.loaded()


# --------------------------------------------------------------------------------------------
# soft_couple_
# --------------------------------------------------------------------------------------------

if _extension.loaded():

    @torch.library.register_fake("itconv_fast::soft_couple_")
    def _soft_couple_fake(grads, group_sizes, lam, kernel, bandwidth, skip_first):
        return None


def _memory_span(t: torch.Tensor):
    """(storage address, first byte, one past the last byte) that t can touch."""
    if t.numel() == 0:
        return None
    item = t.element_size()
    start = t.storage_offset()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    base = t.untyped_storage().data_ptr()
    return (t.device, base + start * item, base + (start + extent + 1) * item)


def _check_coupling_settings(lam, kernel, bandwidth, skip_first) -> tuple[float, Optional[float]]:
    """Checks the scalar arguments; returns lam and bandwidth as floats."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"soft_couple_: lam must be a number, got {type(lam).__name__}")
    lam = float(lam)
    if math.isnan(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"soft_couple_: lam must lie in [0, 1], got {lam}")
    if kernel not in COUPLING_KERNELS:
        raise ValueError(f"soft_couple_: unknown kernel {kernel!r}; expected one of {COUPLING_KERNELS}")
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise TypeError(f"soft_couple_: bandwidth must be a number or None, got {type(bandwidth).__name__}")
        if math.isnan(bandwidth) or bandwidth < 1:
            raise ValueError(f"soft_couple_: bandwidth must be >= 1, got {bandwidth}")
        bandwidth = float(bandwidth)
    if isinstance(skip_first, bool) or not isinstance(skip_first, int):
        raise TypeError(f"soft_couple_: skip_first must be an int, got {type(skip_first).__name__}")
    if skip_first < 0:
        raise ValueError(f"soft_couple_: skip_first must be >= 0, got {skip_first}")
    return lam, bandwidth


def _as_groups(groups) -> list[list[torch.Tensor]]:
    """Checks the structure (a sequence of sequences of tensors) and returns it as lists."""
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError("soft_couple_: groups must be a sequence of groups (sequences of tensors)")
    out = []
    for gi, group in enumerate(groups):
        if isinstance(group, torch.Tensor) or not isinstance(group, Sequence):
            raise TypeError(f"soft_couple_: group {gi} must be a sequence of tensors, got {type(group).__name__}")
        members = list(group)
        for j, t in enumerate(members):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"soft_couple_: group {gi}, member {j} is a {type(t).__name__}, not a tensor")
        out.append(members)
    return out


def _check_groups(groups: list[list[torch.Tensor]], skip_first: int) -> None:
    """Per-tensor checks, in Python (the compiled op makes the same checks, with the same messages, in C++)."""
    spans = []
    for gi, members in enumerate(groups):
        if not members:
            continue  # an empty group couples nothing
        if skip_first >= len(members):
            raise ValueError(f"soft_couple_: group {gi}: skip_first={skip_first} must be < T={len(members)}")
        first = members[0]
        if first.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"soft_couple_: group {gi}: dtype {first.dtype} is not supported; "
                "use float32, float64, float16 or bfloat16"
            )
        for j, t in enumerate(members):
            if t.shape != first.shape:
                raise ValueError(f"soft_couple_: group {gi}: member {j} has shape {list(t.shape)}, member 0 has {list(first.shape)}")
            if t.dtype != first.dtype:
                raise TypeError(f"soft_couple_: group {gi}: member {j} has dtype {t.dtype}, member 0 has {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"soft_couple_: group {gi}: member {j} is on {t.device}, member 0 on {first.device}")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"soft_couple_: group {gi}, member {j} requires grad; pass gradients (p.grad), not parameters")
            if t.numel() > 0:
                if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
                    raise ValueError(f"soft_couple_: group {gi}: member {j} has internally overlapping memory (expanded?)")
                extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                start = t.data_ptr()
                spans.append((str(t.device), start, start + extent * t.element_size(), gi, j))
    # Two members sharing memory would be written twice (and race): refuse any overlap.
    spans.sort(key=lambda s: (s[0], s[1]))
    for (dev0, _, end0, g0, j0), (dev1, start1, _, g1, j1) in zip(spans, spans[1:]):
        if dev0 == dev1 and start1 < end0:
            raise ValueError(f"soft_couple_: group {g1}, member {j1} overlaps in memory with group {g0}, member {j0}")


def _soft_couple_one_call(groups, lam, kernel, bandwidth, skip_first) -> bool:
    """The common call (lists or tuples of gradients, all on one device) as one op call, without a
    Python pass over every tensor: the op checks every member in C++, naming its group, before it
    writes anything. Returns False, having done nothing, for any other input."""
    if type(groups) not in (list, tuple) or not all(type(m) in (list, tuple) for m in groups):
        return False
    first = next((m[0] for m in groups if len(m) and isinstance(m[0], torch.Tensor)), None)
    if first is not None and not _extension.has_kernels_for(first.device):
        return False  # (the C++ side refuses mixed devices, so the first member's device is the call's)
    if torch.compiler.is_compiling():
        return False  # traced calls take the torch.ops form below (the unboxed door is not traceable)
    try:
        # The extension's unboxed door to the same dispatcher op: no IValue boxing of every tensor,
        # the flattening done in C++.
        return _extension.soft_couple_groups(groups, lam, kernel, bandwidth, skip_first)
    except (TypeError, RuntimeError):
        _as_groups(groups)  # a member that is not a tensor: raise the error that names it
        raise


def soft_couple_(
    groups: Sequence[Sequence[torch.Tensor]],
    lam: float,
    *,
    kernel: str = "uniform",
    bandwidth: Optional[float] = None,
    skip_first: int = 0,
) -> None:
    """Soft gradient coupling of every group, in place, in one fused call (SPEC section 2).

    For each group (g_1..g_T, e.g. the gradients of one parameter slot across the T blocks of a stage):

        g_t <- (1 - lam) * g_t + lam * sum_u K[t, u] * g_u

    Args:
        groups: a sequence of groups; a group is a sequence of same-shaped, same-dtype, same-device
            floating-point tensors (float32/64, float16, bfloat16; any layout). Empty groups are allowed.
        lam: the coupling factor in [0, 1]. 0 leaves every tensor bit-for-bit unchanged; 1 with the
            uniform kernel replaces every member by the group mean.
        kernel: "uniform" (K = 1/T, the paper's equation 2) or "triangular" (K[t, u] proportional to
            max(0, 1 - |t - u| / bandwidth), rows normalised).
        bandwidth: the triangular kernel's width h >= 1 (default: half the number of coupled blocks).
        skip_first: leave the first k members of every group uncoupled; the kernel acts on the rest.

    Raises ValueError / TypeError naming the offending group before touching any tensor.
    Accumulates in float32 (float64 for float64 tensors).
    """
    lam, bandwidth = _check_coupling_settings(lam, kernel, bandwidth, skip_first)
    if _extension.loaded() and _soft_couple_one_call(groups, lam, kernel, bandwidth, skip_first):
        return
    checked = _as_groups(groups)
    devices = list(dict.fromkeys(members[0].device for members in checked if members))
    if len(devices) > 1 or not all(_extension.has_kernels_for(d) for d in devices):
        # Several per-device calls, and the reference, need every group checked before anything is written.
        _check_groups(checked, skip_first)
    # The op checks every group in C++ (naming it by its index here) before writing anything, and is
    # the identity for lam = 0.
    calls = [checked] if len(devices) <= 1 else [[m for m in checked if m and m[0].device == d] for d in devices]
    for call in calls:
        flat = [t for members in call for t in members]
        if not flat:
            continue  # nothing to dispatch on (and nothing to couple)
        if not _extension.has_kernels_for(flat[0].device):
            if lam != 0.0:
                _extension.warn_fallback("soft_couple_", flat[0].device)
                _reference.soft_couple_(call, lam, kernel=kernel, bandwidth=bandwidth, skip_first=skip_first)
            continue
        torch.ops.itconv_fast.soft_couple_(flat, [len(m) for m in call], lam, kernel, bandwidth, skip_first)


# --------------------------------------------------------------------------------------------
# batched_spectral_norm
# --------------------------------------------------------------------------------------------

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
            raise ValueError(f"batched_spectral_norm: weight must be a 5-D tensor [B, C_out, C_in, kh, kw] or a "
                             f"sequence of 4-D kernels, got shape {tuple(weight.shape)}")
        return tuple(weight.shape)
    if not isinstance(weight, Sequence) or len(weight) == 0:
        raise ValueError(f"batched_spectral_norm: weight must be a 5-D tensor or a non-empty sequence of 4-D kernels, "
                         f"got {type(weight).__name__}{' (empty)' if isinstance(weight, Sequence) else ''}")
    first = weight[0]
    for b, w in enumerate(weight):
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            got = f"shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"batched_spectral_norm: kernel {b} must be a 4-D tensor [C_out, C_in, kh, kw], got {got}")
        if w.shape != first.shape or w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"batched_spectral_norm: kernel {b} is {tuple(w.shape)} {w.dtype} on {w.device}, "
                             f"kernel 0 is {tuple(first.shape)} {first.dtype} on {first.device}")
    return (len(weight),) + tuple(first.shape)


def _lead_kernel(weight) -> torch.Tensor:
    """The tensor whose dtype and device stand for all kernels: the 5-D weight, or the list's first."""
    return weight if isinstance(weight, torch.Tensor) else weight[0]


def _check_spectral(weight, u, mode, n_iter, input_size):
    shape = _kernels_shape(weight)
    lead = _lead_kernel(weight)
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
            raise ValueError(f"batched_spectral_norm: u is {u.dtype} on {u.device}, weight {lead.dtype} on {lead.device}")
    return expected


def init_power_vector(weight, mode: str, input_size=None, generator=None) -> torch.Tensor:
    """A random unit starting vector u for `batched_spectral_norm` (one per kernel); weight as there."""
    B, c_out = _kernels_shape(weight)[:2]
    lead = _lead_kernel(weight)
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
        return torch.stack([torch.nn.grad.conv2d_weight(v[b : b + 1], (c_out, c_in, kh, kw), u[b : b + 1], padding=pad)
                            for b in range(B)])
    grad = torch.nn.grad.conv2d_weight(v.reshape(1, B * c_in, H, W), (B * c_out, c_in, kh, kw),
                                       u.reshape(1, B * c_out, H, W), padding=pad, groups=B)
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
        grad = _SigmaWithFixedVectors.weight_grad(u, v, ctx.mode, ctx.shape) * grad_sigma.view(-1, 1, 1, 1, 1)
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
    def weight_grad(u, v, mode, shape):
        if mode == "operator":
            return _conv_weight_grad(v, u, shape)
        return (u.unsqueeze(2) * v.unsqueeze(1)).view(shape)

    @staticmethod
    def backward(ctx, grad_sigma):
        u, v = ctx.saved_tensors
        grad = _SigmaWithFixedVectors.weight_grad(u, v, ctx.mode, ctx.shape)
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
    differentiable (autograd through the FFTs).
    """
    return gram_bound_nd(weight, n_iter)


def gram_bound_nd(weight: torch.Tensor, n_iter: int = 4) -> torch.Tensor:
    """gram_spectral_bound for kernels with 0-3 spatial dimensions: weight [B, C_out, C_in, *kernel]
    (0: matrices, whose Gram matrix is formed directly). Certified for every input size."""
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
    w = [k.detach() for k in weight] if as_list else weight.detach()
    device = _lead_kernel(weight).device
    # Operator mode is composite (ATen convolutions, any device); matrix mode has CPU and CUDA kernels.
    if _extension.loaded() and (mode == "operator" or _extension.has_kernels_for(device)):
        op = torch.ops.itconv_fast.power_iteration_operator_ if mode == "operator" else torch.ops.itconv_fast.power_iteration_matrix_
        v, sigma = (op.list if as_list else op.default)(w, u, n_iter)
    else:
        _extension.warn_fallback("batched_spectral_norm", device)
        ref = _reference.power_iteration_operator_ if mode == "operator" else _reference.power_iteration_matrix_
        v, sigma = ref(torch.stack(w) if as_list else w, u, n_iter)
    # u is updated in place by later calls: the backward pass needs this call's vectors.
    if as_list:
        if torch.is_grad_enabled() and any(k.requires_grad for k in weight):
            return _SigmaOfKernelListWithFixedVectors.apply(u.detach().clone(), v, sigma, mode, *weight)
        return sigma
    if weight.requires_grad and torch.is_grad_enabled():
        return _SigmaWithFixedVectors.apply(weight, u.detach().clone(), v, sigma, mode)
    return sigma
