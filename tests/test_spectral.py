"""Batched spectral norms against the exact largest singular value of the materialised operator."""

import pytest
import torch
from conftest import devices

from itconv_fast import ops
from itconv_fast.models.stage_spectral_norm import StageSpectralNorm, bn_scale, fold_batchnorm
from itconv_fast.ops import _reference

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")


def operator_matrix(w, H, W):
    """The zero-padded, same-size convolution with kernel w [C_out, C_in, kh, kw] as a dense matrix."""
    c_out, c_in, kh, kw = w.shape
    n = c_in * H * W
    eye = torch.eye(n, dtype=w.dtype, device=w.device).view(n, c_in, H, W)
    return torch.nn.functional.conv2d(eye, w, padding=(kh // 2, kw // 2)).reshape(n, -1).T


def exact_norms(weight, H, W):
    return torch.stack([torch.linalg.matrix_norm(operator_matrix(w, H, W), ord=2) for w in weight])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,size", [((3, 4, 2, 3, 3), (5, 5)), ((2, 3, 3, 3, 3), (4, 6)), ((2, 2, 5, 1, 3), (3, 3))]
)
def test_operator_mode_converges_to_exact_norm_from_below(path, device, dtype, shape, size):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype, device=device)
    exact = exact_norms(w.double(), *size).to(dtype)
    u = ops.init_power_vector(w, "operator", size)
    sigma = ops.batched_spectral_norm(w, u, mode="operator", n_iter=3000, input_size=size)
    rounding = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.all(sigma <= exact * (1 + rounding))
    torch.testing.assert_close(sigma, exact, rtol=1e-3, atol=0)
    # u is persistent: one more step from the converged vector stays converged.
    again = ops.batched_spectral_norm(w, u, mode="operator", n_iter=1, input_size=size)
    torch.testing.assert_close(again, sigma, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_mode_equals_reshaped_matrix_norm(path, device, dtype):
    torch.manual_seed(1)
    w = torch.randn(5, 6, 4, 3, 3, dtype=dtype, device=device)
    u = ops.init_power_vector(w, "matrix")
    sigma = ops.batched_spectral_norm(w, u, mode="matrix", n_iter=3000)
    exact = torch.linalg.matrix_norm(w.double().reshape(5, 6, -1), ord=2).to(dtype)
    torch.testing.assert_close(sigma, exact, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=0)


@needs_extension
@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_kernels_match_reference_step_by_step(mode):
    torch.manual_seed(2)
    w = torch.randn(4, 8, 8, 3, 3, dtype=torch.float64)
    u = ops.init_power_vector(w, mode, (6, 6))
    u_ref = u.clone()
    op = getattr(torch.ops.itconv_fast, f"power_iteration_{mode}_")
    v, sigma = op(w, u, 3)
    v_ref, sigma_ref = getattr(_reference, f"power_iteration_{mode}_")(w, u_ref, 3)
    torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma, sigma_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [(3, 3), (5, 5), (8, 8), (12, 12)])
def test_gram_bound_is_never_below_exact_and_reasonably_tight(size):
    torch.manual_seed(3)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    exact = exact_norms(w, *size)
    bound = ops.batched_spectral_norm(w, mode="gram", n_iter=6)
    assert torch.all(bound >= exact * (1 - 1e-12))
    assert torch.all(bound <= exact * 1.6)  # loosest on tiny maps (SPEC: 1.24-1.42 at 3 x 3)


def test_gram_bound_with_more_inputs_than_outputs():
    torch.manual_seed(4)
    w = torch.randn(2, 2, 5, 3, 3, dtype=torch.float64)
    assert torch.all(ops.gram_spectral_bound(w, 5) >= exact_norms(w, 6, 6))


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_gradient_matches_svd_gradient_at_convergence(path, mode):
    torch.manual_seed(5)
    size = (4, 4)
    w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    u = ops.init_power_vector(w.detach(), mode, size)
    sigma = ops.batched_spectral_norm(w, u, mode=mode, n_iter=3000, input_size=size)
    (grad,) = torch.autograd.grad(sigma.sum(), w)
    if mode == "operator":
        exact = torch.stack([torch.linalg.matrix_norm(operator_matrix(wb, *size), ord=2) for wb in w])
    else:
        exact = torch.linalg.matrix_norm(w.reshape(2, 3, -1), ord=2)
    (expected,) = torch.autograd.grad(exact.sum(), w)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_sigma_gradient_formula_by_gradcheck(mode):
    """d sigma / dW with u, v held constant equals the autograd gradient of <u, W v> (gradcheck)."""
    torch.manual_seed(9)
    w = torch.randn(2, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    u = ops.init_power_vector(w.detach(), mode, (4, 4))
    u0 = u.clone()

    def sigma_fixed(weight):  # one step from the same starting vector every time
        u.copy_(u0)
        return ops.batched_spectral_norm(weight, u, mode=mode, n_iter=1, input_size=(4, 4))

    sigma = sigma_fixed(w)
    (grad,) = torch.autograd.grad(sigma.sum(), w)
    u_fixed = u.clone()
    v_fixed = getattr(_reference, f"power_iteration_{mode}_")(w.detach(), u0.clone(), 1)[0]
    if mode == "operator":
        expr = lambda W: sum(
            (u_fixed[b] * torch.nn.functional.conv2d(v_fixed[b : b + 1], W[b], padding=1)[0]).sum() for b in range(2)
        )  # noqa: E731
    else:
        expr = lambda W: torch.einsum("bo,bok,bk->", u_fixed, W.reshape(2, 3, -1), v_fixed)  # noqa: E731
    (expected,) = torch.autograd.grad(expr(w), w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_gram_bound_is_differentiable():
    w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gram_spectral_bound(x, 3), (w,))


@needs_extension
@pytest.mark.parametrize("threads", [1, 2])
def test_matrix_kernel_large_matrices_match_reference(threads):
    """Matrices of a few MB (the second sweep reads them from cache), a row count that leaves a tail
    after the four-row sweeps, one and two threads: the reference's numbers."""
    torch.manual_seed(3)
    w = torch.randn(3, 301, 60, 3, 3, dtype=torch.float64)  # 301 x 540 doubles = 1.3 MB each
    u = ops.init_power_vector(w, "matrix")
    u_ref = u.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        v, sigma = torch.ops.itconv_fast.power_iteration_matrix_(w, u, 2)
    finally:
        torch.set_num_threads(before)
    v_ref, sigma_ref = _reference.power_iteration_matrix_(w, u_ref, 2)
    torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma, sigma_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,channels", [("operator", 4), ("operator", 130), ("matrix", 4), ("matrix", 130)])
def test_kernel_list_equals_stacked_weight(path, mode, channels):
    """A list of B kernels (read in place) gives what their 5-D stack gives: sigma, the updated u and
    the gradient of every kernel. 130 channels takes the CPU's kernel-by-kernel operator path."""
    torch.manual_seed(4)
    kernels = [torch.randn(channels, channels, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    stacked = torch.stack(kernels).detach().requires_grad_()
    size = (4, 4)
    u_list = ops.init_power_vector(kernels, mode, size)
    u_stack = u_list.clone()
    sigma_list = ops.batched_spectral_norm(kernels, u_list, mode=mode, n_iter=2, input_size=size)
    sigma_stack = ops.batched_spectral_norm(stacked, u_stack, mode=mode, n_iter=2, input_size=size)
    torch.testing.assert_close(sigma_list, sigma_stack, rtol=1e-12, atol=0)
    torch.testing.assert_close(u_list, u_stack, rtol=1e-12, atol=1e-14)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (sigma_list * weights).sum().backward()
    (sigma_stack * weights).sum().backward()
    for b, k in enumerate(kernels):
        torch.testing.assert_close(k.grad, stacked.grad[b], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: [], "non-empty sequence"),
        (lambda: [torch.randn(4, 2, 3, 3), torch.randn(4, 3, 3, 3)], "kernel 1 is"),
        (lambda: [torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3, dtype=torch.float64)], "kernel 1 is"),
        (lambda: [torch.randn(4, 2, 3, 3), torch.randn(2, 3, 3)], "kernel 1 must be a 4-D tensor"),
        (lambda: [torch.randn(4, 2, 3, 3), "w"], "kernel 1 must be a 4-D tensor"),
    ],
)
def test_bad_kernel_lists_raise_and_modify_nothing(make, match):
    kernels = make()
    u = torch.randn(len(kernels), 4)
    u_before = u.clone()
    with pytest.raises(ValueError, match=match):
        ops.batched_spectral_norm(kernels, u, mode="matrix")
    assert torch.equal(u, u_before)


@needs_extension
def test_list_ops_check_their_own_arguments():
    u = torch.randn(2, 4)
    with pytest.raises(ValueError, match="kernel 1 has shape"):
        torch.ops.itconv_fast.power_iteration_matrix_.list([torch.randn(4, 2, 3, 3), torch.randn(4, 3, 3, 3)], u, 1)
    with pytest.raises(ValueError, match="empty list"):
        torch.ops.itconv_fast.power_iteration_operator_.list([], torch.randn(0, 4, 5, 5), 1)
    with pytest.raises(ValueError, match="u must have shape"):
        torch.ops.itconv_fast.power_iteration_matrix_.list([torch.randn(4, 2, 3, 3)] * 3, u, 1)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    w = torch.randn(3, 4, 2, 3, 3, device=device)
    torch.library.opcheck(
        torch.ops.itconv_fast.power_iteration_operator_.default, (w, ops.init_power_vector(w, "operator", (5, 5)), 2)
    )
    torch.library.opcheck(
        torch.ops.itconv_fast.power_iteration_matrix_.default, (w, ops.init_power_vector(w, "matrix"), 2)
    )
    kernels = list(torch.randn(3, 4, 2, 3, 3, device=device).unbind(0))
    torch.library.opcheck(
        torch.ops.itconv_fast.power_iteration_operator_.list,
        (kernels, ops.init_power_vector(kernels, "operator", (5, 5)), 2),
    )
    torch.library.opcheck(
        torch.ops.itconv_fast.power_iteration_matrix_.list, (kernels, ops.init_power_vector(kernels, "matrix"), 2)
    )


BAD = [
    (lambda w, u: dict(weight=w[0]), ValueError, "5-D"),
    (lambda w, u: dict(weight=w, u=u[:, :1]), ValueError, "u must have shape"),
    (lambda w, u: dict(weight=w, u=u[:2]), ValueError, "u must have shape"),
    (lambda w, u: dict(weight=w, u=u, mode="frobenius"), ValueError, "unknown mode"),
    (lambda w, u: dict(weight=w, mode="operator"), ValueError, "input_size"),
    (lambda w, u: dict(weight=w, u=u, n_iter=0), ValueError, "n_iter"),
    (lambda w, u: dict(weight=w.int(), u=u), TypeError, "float32 or float64"),
    (lambda w, u: dict(weight=w[..., :2, :2], u=u), ValueError, "odd"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_input_raises_and_modifies_nothing(make, exc, match):
    w = torch.randn(3, 4, 2, 3, 3)
    u = ops.init_power_vector(w, "operator", (5, 5))
    u_before, w_before = u.clone(), w.clone()
    kwargs = make(w, u)
    if "input_size" not in kwargs and kwargs.get("mode", "operator") == "operator" and "u" in kwargs:
        kwargs["input_size"] = (5, 5)
    with pytest.raises(exc, match=match):
        ops.batched_spectral_norm(**kwargs)
    assert torch.equal(u, u_before) and torch.equal(w, w_before)


# ---------------------------------------------------------------------------------------------
# Block-level bound
# ---------------------------------------------------------------------------------------------


def test_fold_batchnorm_is_the_composed_linear_map():
    torch.manual_seed(6)
    k1 = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    d1, d2 = torch.rand(1, 3, dtype=torch.float64) + 0.5, torch.rand(1, 4, dtype=torch.float64) + 0.5
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    direct = d2[0, :, None, None] * torch.nn.functional.conv2d(d1[0, :, None, None] * x, k1[0], padding=1)
    folded = torch.nn.functional.conv2d(x, fold_batchnorm(k1, d1, d2)[0], padding=1)
    torch.testing.assert_close(direct, folded)


@pytest.mark.parametrize("mode", ["operator", "matrix", "gram"])
def test_stage_norm_corrections(mode):
    torch.manual_seed(7)
    T, C, size = 3, 4, (6, 6)
    conv1 = torch.randn(T, C, C, 3, 3, dtype=torch.float64)
    conv2 = torch.randn(T, C, C, 3, 3, dtype=torch.float64)
    bn_w, bn_var = torch.rand(T, C, dtype=torch.float64) + 0.5, torch.rand(T, C, dtype=torch.float64) + 0.5
    d = bn_scale(bn_w, bn_var, 1e-5)
    sn = StageSpectralNorm(T, C, size, mu=0.9, mode=mode).double()
    bounds = sn.refresh(conv1, conv2, d, d, n_iter=500)
    exact1 = exact_norms(fold_batchnorm(conv1, d, d), *size)
    exact2 = exact_norms(conv2, *size)
    if mode == "operator":
        torch.testing.assert_close(bounds, exact1 * exact2, rtol=2e-3, atol=0)
    elif mode == "gram":
        assert torch.all(bounds >= exact1 * exact2)
    c = sn(conv1, conv2, d, d)
    torch.testing.assert_close(c, torch.clamp(bounds / 0.9, min=1.0), rtol=1e-3, atol=0)
    assert set(dict(sn.named_buffers())) == {"u1", "u2"}  # persistent, in the state_dict
    with pytest.raises(ValueError, match="mu"):
        StageSpectralNorm(T, C, size, mu=0.0)
    with pytest.raises(ValueError, match="mu"):
        StageSpectralNorm(T, C, size, mu=float("nan"))


@needs_extension
def test_large_kernels_take_the_per_kernel_path_and_agree():
    """Kernels with C_in C_out H W above 2^20 run kernel by kernel on the CPU: same result as the reference."""
    torch.manual_seed(8)
    w = torch.randn(3, 64, 64, 3, 3, dtype=torch.float64)
    assert 64 * 64 * 17 * 17 > 2**20
    u = ops.init_power_vector(w, "operator", (17, 17))
    u_ref, u_list = u.clone(), u.clone()
    v, _ = torch.ops.itconv_fast.power_iteration_operator_(w, u, 2)
    v_ref, _ = _reference.power_iteration_operator_(w, u_ref, 2)
    v_list, _ = torch.ops.itconv_fast.power_iteration_operator_.list(list(w.unbind(0)), u_list, 2)
    torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_list, v_ref, rtol=1e-10, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("path", ["grouped", "serial", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_operator_path_agrees_with_the_reference(path, dtype, monkeypatch):
    """The three ways the kernels' convolutions can run (forced for A/B measurements) give the same iteration,
    for the stack and the list form."""
    monkeypatch.setenv("ITCONV_FAST_OPERATOR_PATH", path)
    torch.manual_seed(9)
    w = torch.randn(5, 6, 4, 3, 3, dtype=dtype)
    u = ops.init_power_vector(w, "operator", (5, 7))
    u_ref, u_list = u.clone(), u.clone()
    v, sigma = torch.ops.itconv_fast.power_iteration_operator_(w, u, 3)
    v_ref, sigma_ref = _reference.power_iteration_operator_(w, u_ref, 3)
    v_list, _ = torch.ops.itconv_fast.power_iteration_operator_.list(list(w.unbind(0)), u_list, 3)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in ((u, u_ref), (v, v_ref), (sigma, sigma_ref), (v_list, v_ref), (u_list, u_ref)):
        torch.testing.assert_close(a, b, **tol)
