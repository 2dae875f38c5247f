"""The spectral corrections of a stage as one autograd node (StageSpectralNorm.bounded_conv2): the same values as
the composite graph (bit for bit), the same gradients (to rounding), the same vector updates; the power vectors
stay dense under channels-last; IterResNet.forward computing every stage's corrections first changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from itconv_fast.models import IterResNet
from itconv_fast.models.stage_spectral_norm import StageSpectralNorm, bn_scale


def make_stage_parts(T=3, C=4, dtype=torch.float64, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    conv1 = [torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(dtype) for _ in range(T)]
    conv2 = [torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(dtype) for _ in range(T)]
    bn1 = [torch.nn.BatchNorm2d(C).to(dtype) for _ in range(T)]
    bn2 = [torch.nn.BatchNorm2d(C).to(dtype) for _ in range(T)]
    with torch.no_grad():
        for m in conv1 + conv2:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=dtype) * 0.3)
        for n in bn1 + bn2:
            n.weight.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
            n.running_var.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
    if channels_last:
        for m in conv1 + conv2:
            m.to(memory_format=torch.channels_last)
    return conv1, conv2, bn1, bn2


def composite(sn, conv1, conv2, bn1, bn2, update):
    """The graph bounded_conv2 replaces: StageSpectralNorm.bounds on stacked values, clamp, one division."""
    k2 = torch.stack([m.weight for m in conv2])
    bounds = sn.bounds(
        torch.stack([m.weight for m in conv1]),
        k2,
        torch.stack([bn_scale(n.weight, n.running_var, n.eps) for n in bn1]),
        torch.stack([bn_scale(n.weight, n.running_var, n.eps) for n in bn2]),
        update=update,
    )
    c = torch.clamp(bounds / sn.mu, min=1.0)
    return k2 / c.view(-1, 1, 1, 1, 1), c


def grads_of(parts, out):
    params = [m.weight for group in parts for m in group]
    return torch.autograd.grad(out, params)


@pytest.mark.parametrize("mode", ["operator", "matrix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("scale", [0.3, 1.2, 50.0])  # mu from the bounds: every block corrected; block 0 at
def test_bounded_conv2_equals_the_composite_graph(mode, dtype, update, scale, path):  # c = 1.2 (and some); none
    T, C = 3, 4
    fused_parts = make_stage_parts(T, C, dtype)
    plain_parts = copy.deepcopy(fused_parts)
    probe = StageSpectralNorm(T, C, (6, 6), mu=1.0, mode=mode).to(dtype)
    bounds = probe.bounded_conv2(*fused_parts, update=False)[1]  # mu = 1: c = max(L, 1); all L > 1 here
    assert torch.all(bounds > 1)
    mu = float(bounds.max() * 50.0 if scale == 50.0 else bounds[0] / 1.2 if scale == 1.2 else bounds.min() * 0.3)
    sn = StageSpectralNorm(T, C, (6, 6), mu=mu, mode=mode).to(dtype)
    sn_plain = copy.deepcopy(sn)
    kernels, c = sn.bounded_conv2(*fused_parts, update=update)
    kernels_ref, c_ref = composite(sn_plain, *plain_parts, update=update)
    assert torch.equal(c, c_ref) and torch.equal(kernels, kernels_ref)
    assert torch.equal(sn.u1, sn_plain.u1) and torch.equal(sn.u2, sn_plain.u2)
    if not update:  # evaluation with gradients: the vectors do not move
        fresh = StageSpectralNorm(T, C, (6, 6), mu=mu, mode=mode).to(dtype)
        assert torch.equal(sn.u1, fresh.u1)
    weights = torch.randn(kernels.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = grads_of(fused_parts, (kernels * weights).sum())
    want = grads_of(plain_parts, (kernels_ref * weights).sum())
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_bounded_conv2_gradient_is_the_fixed_vector_formula():
    """d out / d params by hand, checked against autograd through the fixed-vector formula written out densely:
    sigma_b = <u_b, conv(v_b, W_b)> with u, v constants (the convention of batched_spectral_norm)."""
    T, C, size = 2, 3, (5, 5)
    parts = make_stage_parts(T, C, torch.float64, seed=3)
    sn = StageSpectralNorm(T, C, size, mu=0.2).double()
    u0 = torch.cat([sn.u1, sn.u2]).clone()
    kernels, _ = sn.bounded_conv2(*parts, update=True)
    conv1, conv2, bn1, bn2 = parts
    # the vectors of this call: u after the step, v = normalised adjoint of u0
    d1 = torch.stack([bn_scale(n.weight, n.running_var, n.eps) for n in bn1])
    d2 = torch.stack([bn_scale(n.weight, n.running_var, n.eps) for n in bn2])
    folded = d2[:, :, None, None, None] * torch.stack([m.weight for m in conv1]) * d1[:, None, :, None, None]
    w = torch.cat([folded, torch.stack([m.weight for m in conv2])])
    with torch.no_grad():
        v = torch.stack([torch.nn.functional.conv_transpose2d(u0[b : b + 1], w[b], padding=1)[0] for b in range(2 * T)])
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        u = torch.cat([sn.u1, sn.u2])
    sigma = torch.stack(
        [(u[b] * torch.nn.functional.conv2d(v[b : b + 1], w[b], padding=1)[0]).sum() for b in range(2 * T)]
    )
    c = torch.clamp(sigma[:T] * sigma[T:] / sn.mu, min=1.0)
    dense = torch.stack([m.weight for m in conv2]) / c.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(kernels, dense, rtol=1e-10, atol=1e-12)
    weights = torch.randn(kernels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for g, w_ in zip(grads_of(parts, (kernels * weights).sum()), grads_of(parts, (dense * weights).sum())):
        torch.testing.assert_close(g, w_, rtol=1e-9, atol=1e-12)


def test_bounded_conv2_without_gradients_and_in_gram_mode():
    parts = make_stage_parts()
    sn = StageSpectralNorm(3, 4, (6, 6), mu=0.5).double()
    with torch.no_grad():
        kernels, c = sn.bounded_conv2(*parts, update=False)
    assert not kernels.requires_grad and c.shape == (3,)
    gram = StageSpectralNorm(3, 4, (6, 6), mu=0.5, mode="gram").double()
    kernels, c = gram.bounded_conv2(*parts)
    ref, c_ref = composite(copy.deepcopy(gram), *parts, update=False)
    assert torch.equal(c, c_ref) and torch.equal(kernels, ref) and kernels.requires_grad


def test_bounded_conv2_with_channels_last_kernels_equals_dense_ones():
    dense = make_stage_parts(dtype=torch.float32)
    strided = make_stage_parts(dtype=torch.float32, channels_last=True)
    assert strided[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    sn_a = StageSpectralNorm(3, 4, (6, 6), mu=0.5)
    sn_b = copy.deepcopy(sn_a)
    ka, ca = sn_a.bounded_conv2(*dense)
    kb, cb = sn_b.bounded_conv2(*strided)
    assert torch.equal(ka, kb) and torch.equal(ca, cb)
    weights = torch.randn(ka.shape)
    for g, w in zip(grads_of(strided, (kb * weights).sum()), grads_of(dense, (ka * weights).sum())):
        torch.testing.assert_close(g, w)


def test_power_vectors_stay_dense_under_channels_last():
    model = IterResNet(10, 1, width=8, blocks=2, stages=3, sn_mu=0.9)
    model.to(memory_format=torch.channels_last)
    for stage in model.stages:
        assert stage.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert stage.sn.u1.is_contiguous() and stage.sn.u2.is_contiguous()
    model.to_channels_last(min_width=1)
    assert all(stage.sn.u1.is_contiguous() for stage in model.stages)


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_forward_with_corrections_first_equals_stage_by_stage(train_mode):
    """IterResNet.forward computes every stage's corrected kernels before the stem: the same outputs, gradients
    and vector updates as running each stage on its own (which computes them on entry)."""
    torch.manual_seed(0)
    model = IterResNet(10, 1, width=8, blocks=3, stages=3, input_size=16, sn_mu=0.7).train(train_mode)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 1, 16, 16)
    out = model(x)
    z = twin.stem(x)
    for s, stage in enumerate(twin.stages):
        z = stage(twin.transitions[s - 1](z) if s > 0 else z)
    ref = twin.head(z)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_power_iteration_is_batched_spectral_norms_step(mode):
    from itconv_fast.ops.spectral import batched_spectral_norm, init_power_vector, power_iteration

    w = torch.randn(3, 4, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u = init_power_vector(w, mode, (6, 6))
    u_ref = u.clone()
    v, sigma = power_iteration(w, u, mode=mode, n_iter=2)
    assert torch.equal(sigma, batched_spectral_norm(w, u_ref, mode=mode, n_iter=2, input_size=(6, 6)))
    assert torch.equal(u, u_ref) and not sigma.requires_grad
    assert v.shape == ((3, 5, 6, 6) if mode == "operator" else (3, 45))


def test_power_iteration_rejects_bad_input_before_touching_u():
    from itconv_fast.ops.spectral import init_power_vector, power_iteration

    w = torch.randn(2, 3, 3, 3, 3)
    u = init_power_vector(w, "operator", (4, 4))
    before = u.clone()
    with pytest.raises(ValueError, match="gram"):
        power_iteration(w, u, mode="gram")
    with pytest.raises(ValueError, match="u"):
        power_iteration(w, None)
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration(w, u, n_iter=0)
    with pytest.raises(ValueError, match="shape"):
        power_iteration(w[:1], u)
    assert torch.equal(u, before)
