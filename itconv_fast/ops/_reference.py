"""Pure-PyTorch reference implementations of the ops.

Short and obviously correct: the tests compare the kernels with these, and they serve as the
fallback when the compiled extension is absent. They perform the same floating-point operations in
the same order as the kernels (see csrc/ops/soft_couple.h), so float results agree bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def default_bandwidth(n: int) -> float:
    """The triangular kernel's default bandwidth for n coupled blocks (SPEC 2: h = T / 2, at least 1)."""
    return max(1.0, n / 2.0)


def mixing_coefficients(kernel: str, lam: float, bandwidth: Optional[float], n: int):
    """Coefficients of one group's mix, in double precision.

    Returns ("uniform", a, b) with out_t = a * g_t + b * sum_u g_u, or ("matrix", M) with
    out_t = sum_u M[t][u] g_u and M = (1 - lam) I + lam K, K's rows summing to 1.
    """
    if kernel == "uniform":
        return ("uniform", 1.0 - lam, lam / n)
    h = default_bandwidth(n) if bandwidth is None else float(bandwidth)
    matrix = []
    for t in range(n):
        weights = [max(0.0, 1.0 - abs(float(t - u)) / h) for u in range(n)]
        row_sum = 0.0
        for w in weights:
            row_sum += w
        matrix.append([lam * (w / row_sum) + ((1.0 - lam) if t == u else 0.0) for u, w in enumerate(weights)])
    return ("matrix", matrix)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A 0-dim tensor of the accumulation dtype: the coefficient is rounded to that dtype first, as in C++.
    return torch.tensor(value, dtype=torch.float64).to(dtype=dtype, device=device)


def soft_couple_(
    groups: Sequence[Sequence[torch.Tensor]],
    lam: float,
    *,
    kernel: str = "uniform",
    bandwidth: Optional[float] = None,
    skip_first: int = 0,
) -> None:
    """Reference soft gradient coupling, in place. Expects validated arguments (see ops.soft_couple_)."""
    if lam == 0.0:
        return
    for group in groups:
        members = list(group)[skip_first:]
        n = len(members)
        if n <= 1 or members[0].numel() == 0:
            continue
        acc = _acc_dtype(members[0].dtype)
        device = members[0].device
        values = [g.to(acc) for g in members]
        coeffs = mixing_coefficients(kernel, lam, bandwidth, n)
        if coeffs[0] == "uniform":
            a, b = _scalar(coeffs[1], acc, device), _scalar(coeffs[2], acc, device)
            total = values[0].clone()
            for v in values[1:]:
                total = total + v
            shared = b * total
            mixed = [a * v + shared for v in values]
        else:
            m = [[_scalar(c, acc, device) for c in row] for row in coeffs[1]]
            mixed = []
            for t in range(n):
                out = m[t][0] * values[0]
                for u in range(1, n):
                    out = out + m[t][u] * values[u]
                mixed.append(out)
        for g, out in zip(members, mixed):
            g.copy_(out)


# ---------------------------------------------------------------------------------------------
# Spectral norms (SPEC section 3)
# ---------------------------------------------------------------------------------------------

_NORM_EPS = 1e-12


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)).view_as(x)


def power_iteration_operator_(weight: torch.Tensor, u: torch.Tensor, n_iter: int):
    """Power iteration on each kernel's zero-padded, same-size convolution; u [B, C_out, H, W] in place.
    Returns (the unit v [B, C_in, H, W], sigma = |W v| [B]). One kernel at a time: obviously correct."""
    with torch.no_grad():
        vs, sigmas = [], []
        for b in range(weight.shape[0]):
            w = weight[b]
            pad = (w.shape[-2] // 2, w.shape[-1] // 2)
            ub = u[b : b + 1]
            for _ in range(n_iter):
                vb = _normalize_rows(torch.nn.functional.conv_transpose2d(ub, w, padding=pad))
                wv = torch.nn.functional.conv2d(vb, w, padding=pad)
                sigma = wv.norm()
                ub = wv / sigma.clamp_min(_NORM_EPS)
            u[b : b + 1].copy_(ub)
            vs.append(vb[0])
            sigmas.append(sigma)
        return torch.stack(vs), torch.stack(sigmas)


def power_iteration_matrix_(weight: torch.Tensor, u: torch.Tensor, n_iter: int):
    """Power iteration on each kernel reshaped to [C_out, C_in*kh*kw]; u [B, C_out] in place.
    Returns (v [B, C_in*kh*kw], sigma = |W v| [B])."""
    with torch.no_grad():
        w = weight.reshape(weight.shape[0], weight.shape[1], -1)
        uu = u.clone()
        for _ in range(n_iter):
            v = _normalize_rows(torch.einsum("bok,bo->bk", w, uu))
            wv = torch.einsum("bok,bk->bo", w, v)
            sigma = wv.norm(dim=1)
            uu = wv / sigma.clamp_min(_NORM_EPS).unsqueeze(1)
        u.copy_(uu)
        return v, sigma


def gram_spectral_bound(weight: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    """Certified upper bound on each zero-padded convolution's spectral norm, valid for every input size,
    by Gram iteration (Delattre, Barthelemy & Allauzen 2024, arXiv 2402.00240).

    n_iter times the kernel G is replaced by its normalised Gram kernel: G <- G G^T in the convolution
    algebra (a grouped conv of G with itself at padding k-1, so it grows by k-1 per step), keeping the log
    of the normaliser. The bound is max_o (sum_{i,taps} |G[o, i]|)^(1/2^t) times the carried scale.
    The direct form: one grouped conv per step for all B kernels (ops.gram_spectral_bound computes the
    same Gram kernels in the Fourier domain, which is much cheaper once the kernel has grown).
    """
    B, c_out, c_in = weight.shape[:3]
    g = weight if c_out >= c_in else weight.transpose(1, 2)  # |W| = |W^T|; work with the wider side out
    log_scale = torch.zeros(B, dtype=weight.dtype, device=weight.device)
    for _ in range(n_iter):
        b, co, ci, kh, kw = g.shape
        norm = g.reshape(b, -1).norm(dim=1).clamp_min(_NORM_EPS)
        g = g / norm.view(-1, 1, 1, 1, 1)
        log_scale = 2 * (log_scale + norm.log())
        # out[o, o'] = sum_i g[o, i] (x) g[o', i]: the input batch is o, channels (b, i); groups = b.
        gram = torch.nn.functional.conv2d(
            g.permute(1, 0, 2, 3, 4).reshape(co, b * ci, kh, kw),
            g.reshape(b * co, ci, kh, kw),
            padding=(kh - 1, kw - 1),
            groups=b,
        )  # [co, b * co, 2kh-1, 2kw-1]
        g = gram.view(co, b, co, 2 * kh - 1, 2 * kw - 1).permute(1, 2, 0, 3, 4)
    power = 2.0 ** (-n_iter)
    row_sums = g.abs().sum(dim=(2, 3, 4))  # [B, C]
    return (row_sums.pow(power) * torch.exp(log_scale * power).unsqueeze(1)).amax(dim=1)


def _bn_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the fused BatchNorm + ReLU writes: channels-last for a channels-last 4-D input, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _bn_coefficients(mean, invstd, weight, bias):
    """The normalisation's affine form out = relu(x a + b), as the kernels compute it (batch_norm_relu.h)."""
    a = invstd * weight.to(invstd.dtype)
    return a, bias.to(invstd.dtype) - mean * a


def batch_norm_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
):
    """Training-mode BatchNorm followed by ReLU: (out, batch mean, batch 1 / sqrt(var + eps), new running mean,
    new running variance); the running statistics move by `momentum` towards the batch's (unbiased variance)."""
    acc = _acc_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    x = input.to(acc)
    m = input.numel() // max(input.shape[1], 1)
    mean = x.double().mean(dims).to(acc)
    var = (x - mean.view(shape)).square().double().sum(dims) / m
    invstd = (1.0 / torch.sqrt(var + eps)).to(acc)
    a, b = _bn_coefficients(mean, invstd, weight, bias)
    out = torch.relu(x * a.view(shape) + b.view(shape)).to(input.dtype).contiguous(memory_format=_bn_layout(input))
    new_mean = momentum * mean.to(running_mean.dtype) + (1.0 - momentum) * running_mean
    new_var = momentum * (var * m / (m - 1)).to(running_var.dtype) + (1.0 - momentum) * running_var
    return out, mean, invstd, new_mean, new_var


def batch_norm_relu_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
):
    """Gradients (input, weight, bias) of batch_norm_relu; ReLU's mask recomputed from the input as the kernels do
    (the forward's output x a + b, rounded to the input's dtype, > 0)."""
    acc = _acc_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    m = input.numel() // max(input.shape[1], 1)
    x = input.to(acc)
    a, b = _bn_coefficients(save_mean, save_invstd, weight, bias)
    passes = (x * a.view(shape) + b.view(shape)).to(input.dtype).to(acc) > 0
    g = torch.where(passes, grad_out.to(acc), torch.zeros((), dtype=acc, device=input.device))
    centered = x - save_mean.view(shape)
    sum_g, sum_gx = g.double().sum(dims), (g * centered).double().sum(dims)
    k = (sum_gx / m).to(acc) * save_invstd * save_invstd
    dx = ((g - (sum_g / m).to(acc).view(shape)) - centered * k.view(shape)) * (save_invstd * weight.to(acc)).view(shape)
    grad_input = dx.to(input.dtype).contiguous(memory_format=_bn_layout(input))
    return grad_input, (sum_gx.to(acc) * save_invstd).to(weight.dtype), sum_g.to(acc).to(weight.dtype)
