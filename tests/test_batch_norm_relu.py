"""The fused BatchNorm + ReLU (ops.batch_norm_relu, nn.batch_norm_relu, BatchNormReLU2d): the CPU kernel against
the reference and against ATen's two ops, over shapes (one to many channel tiles, one value per plane, 2-D to 5-D),
layouts (contiguous, channels-last, strided), dtypes; ReLU's mask in the backward is the forward's exactly; the
module bookkeeping is nn.BatchNorm's; opcheck and gradcheck; bad input changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from itconv_fast import ops
from itconv_fast.models import IterResNet
from itconv_fast.nn import BatchNormReLU2d, batch_norm_relu
from itconv_fast.ops import _extension, _reference

needs_kernel = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not built")
CL = torch.channels_last

SHAPES = [
    (8, 16, 5, 7),
    (3, 3, 1, 1),
    (2, 5, 9, 9),
    (4, 24, 6, 6),
    (2, 7, 3, 3),
    (16, 40, 8, 8),
    (1, 2, 1, 3),
    (2, 1, 4, 4),
    (64, 8, 32, 32),
    (5, 4),
    (2, 3, 4, 5, 6),
]


def layouts_for(shape):
    out = ["contiguous"]
    if len(shape) == 4:
        out += ["channels_last", "strided"]
    return out


def make_input(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=CL)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def params(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return w, b, rm, rv


TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_cpu_kernel_matches_the_reference(shape, dtype):
    for layout in layouts_for(shape):
        x = make_input(shape, layout, dtype)
        w, b, rm, rv = params(shape[1], dtype)
        got = torch.ops.itconv_fast.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
        want = _reference.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
        for name, g_, w_ in zip(("out", "mean", "invstd", "running_mean", "running_var"), got, want):
            torch.testing.assert_close(g_, w_, **TOL[dtype], msg=f"{layout} {name}")
        expected_layout = CL if layout == "channels_last" else torch.contiguous_format
        assert got[0].is_contiguous(memory_format=expected_layout)
        # The backward from the same saved statistics: masks agree exactly, values to rounding.
        dy = make_input(shape, layout, dtype, seed=3)
        got_b = torch.ops.itconv_fast.batch_norm_relu_backward(dy, x, w, b, got[1], got[2])
        want_b = _reference.batch_norm_relu_backward(dy, x, w, b, got[1], got[2])
        for name, g_, w_ in zip(("grad_input", "grad_weight", "grad_bias"), got_b, want_b):
            torch.testing.assert_close(g_, w_, **TOL[dtype], msg=f"{layout} {name}")
        assert got_b[0].is_contiguous(memory_format=expected_layout)


@needs_kernel
@pytest.mark.parametrize("shape", [(8, 16, 5, 7), (16, 40, 8, 8), (64, 8, 32, 32), (2, 3, 4, 5, 6)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_values_gradients_and_buffers_match_atens_two_ops_in_float64(shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels-last is 4-D")
    x = make_input(shape, layout, torch.float64).requires_grad_()
    w, b, rm, rv = params(shape[1], torch.float64)
    w.requires_grad_(), b.requires_grad_()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm2, rv2 = rm.clone(), rv.clone()
    y = ops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5)
    y2 = torch.relu(F.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5))
    dy = make_input(shape, layout, torch.float64, seed=5)
    y.backward(dy), y2.backward(dy)
    for a, e in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad), (rm, rm2), (rv, rv2)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_backward_mask_is_the_forwards_output_above_zero(layout, dtype):
    """Values whose normalised value is exactly 0 (the mean, with bias 0) or positive but rounding to 0 in the
    input's dtype (bias 1e-9 in half precision) have output 0, so no gradient may pass there."""
    # Every channel holds -1, 0, 1 sixteen times: its mean is exactly 0, so x = 0 normalises to exactly its bias.
    x = torch.tensor([-1.0, 0.0, 1.0]).repeat(16).reshape(3, 4, 4, 1).expand(3, 4, 4, 4).permute(0, 3, 1, 2).to(dtype)
    x = x.contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    pdt = torch.float32
    w = torch.ones(4, dtype=pdt)
    b = torch.tensor([0.0, 1e-9, -1e-9, 0.0], dtype=pdt)
    rm, rv = torch.zeros(4, dtype=pdt), torch.ones(4, dtype=pdt)
    out, mean, invstd, _, _ = torch.ops.itconv_fast.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    dy = torch.ones_like(x)
    _, _, grad_bias = torch.ops.itconv_fast.batch_norm_relu_backward(dy, x, w, b, mean, invstd)
    dims = [0, 2, 3]
    expected = (dy.float() * (out.float() > 0)).sum(dims)
    torch.testing.assert_close(grad_bias, expected, rtol=0, atol=0)
    assert (out.float() == 0).any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_inputs_with_float_parameters_match_the_reference(dtype, layout):
    x = make_input((4, 24, 6, 6), layout, dtype)
    w, b, rm, rv = params(24, torch.float32)
    got = torch.ops.itconv_fast.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    want = _reference.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), rtol=1e-2, atol=1e-2)
    dy = make_input((4, 24, 6, 6), layout, dtype, seed=4)
    for g_, w_ in zip(
        torch.ops.itconv_fast.batch_norm_relu_backward(dy, x, w, b, got[1], got[2]),
        _reference.batch_norm_relu_backward(dy, x, w, b, got[1], got[2]),
    ):
        torch.testing.assert_close(g_.float(), w_.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    x = make_input((32, 16, 16, 16), "channels_last", torch.float32)
    w, b, rm, rv = params(16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.itconv_fast.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    finally:
        torch.set_num_threads(threads)
    many = torch.ops.itconv_fast.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    for a, e in zip(one, many):
        assert torch.equal(a, e)


@needs_kernel
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((3, 5, 4, 4), layout, torch.float32).requires_grad_()
    w, b, rm, rv = params(5, torch.float32)
    torch.library.opcheck(
        torch.ops.itconv_fast.batch_norm_relu.default, (x, w.requires_grad_(), b.requires_grad_(), rm, rv, 0.1, 1e-5)
    )
    out = torch.ops.itconv_fast.batch_norm_relu(x.detach(), w.detach(), b.detach(), rm, rv, 0.1, 1e-5)
    torch.library.opcheck(
        torch.ops.itconv_fast.batch_norm_relu_backward.default,
        (torch.randn_like(x), x.detach(), w.detach(), b.detach(), out[1], out[2]),
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(layout):
    x = make_input((3, 4, 3, 3), layout, torch.float64).requires_grad_()
    w, b, _, _ = params(4, torch.float64)
    w.requires_grad_(), b.requires_grad_()

    def f(x, w, b):  # fresh buffers per call: gradcheck calls f many times
        return ops.batch_norm_relu(
            x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), w, b, True, 0.1, 1e-5
        )

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


def _bn_pair(**kwargs):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6, **kwargs)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    twin = torch.nn.BatchNorm2d(6, **kwargs)
    twin.load_state_dict(bn.state_dict())
    return bn, twin


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"momentum": 0.0}, {"momentum": 1.0}],
    ids=str,
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_module_helper_keeps_nn_batchnorms_bookkeeping(kwargs, mode):
    bn, twin = _bn_pair(**kwargs)
    bn.train(mode == "train"), twin.train(mode == "train")
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(step)).contiguous(memory_format=CL)
        torch.testing.assert_close(batch_norm_relu(bn, x), torch.relu(twin(x)), rtol=1e-5, atol=1e-5)
    for (name, a), (_, e) in zip(bn.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)


def test_batchnormrelu2d_is_a_batchnorm2d_with_the_relu():
    torch.manual_seed(0)
    fused, plain = BatchNormReLU2d(5), torch.nn.BatchNorm2d(5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(fused(x), torch.relu(plain(x)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-5, atol=1e-7)


def test_a_module_with_its_own_forward_runs_unfused():
    class Doubled(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    bn, x = Doubled(3), torch.randn(2, 3, 4, 4)
    twin = Doubled(3)
    assert torch.equal(batch_norm_relu(bn, x), torch.relu(twin(x)))


@pytest.mark.parametrize("sn_mu", [None, 0.95])
def test_iterresnet_fused_and_unfused_agree(sn_mu):
    torch.manual_seed(0)
    fused = IterResNet(10, 1, width=8, blocks=2, stages=2, input_size=16, sn_mu=sn_mu).to_channels_last().train()
    unfused = IterResNet(10, 1, width=8, blocks=2, stages=2, input_size=16, sn_mu=sn_mu).to_channels_last().train()
    unfused.load_state_dict(fused.state_dict())
    unfused.fuse_bn_relu(False)
    x = torch.randn(6, 1, 16, 16)
    a, e = fused(x), unfused(x)
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    a.square().sum().backward(), e.square().sum().backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), unfused.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, p), (_, q) in zip(fused.named_buffers(), unfused.named_buffers()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
        (dict(running_var=torch.ones(2, 4)), ValueError, "running_var must have shape"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(input=torch.ones(3, 4, 2, 2, dtype=torch.int64)), TypeError, "float32"),
        (dict(input=torch.ones(4)), ValueError, r"\[N, C"),
        (dict(bias=torch.ones(4, device="meta")), ValueError, "bias is on meta"),
    ],
    ids=["weight", "running_var", "momentum", "eps", "dtype", "1-D", "device"],
)
def test_bad_input_is_refused_and_changes_nothing(bad, error, match):
    args = dict(
        input=torch.randn(3, 4, 2, 2),
        running_mean=torch.zeros(4),
        running_var=torch.ones(4),
        weight=torch.ones(4),
        bias=torch.zeros(4),
        training=True,
        momentum=0.1,
        eps=1e-5,
    )
    args.update(bad)
    before = [args["running_mean"].clone(), args["running_var"].clone()]
    with pytest.raises(error, match=match):
        ops.batch_norm_relu(**args)
    assert torch.equal(args["running_mean"], before[0]) and torch.equal(args["running_var"], before[1])


@needs_kernel
def test_the_op_refuses_bad_input_itself():
    x, w = torch.randn(3, 4, 2, 2), torch.ones(4)
    with pytest.raises(ValueError, match="more than one value per channel"):
        torch.ops.itconv_fast.batch_norm_relu(torch.randn(1, 4, 1, 1), w, w, w, w, 0.1, 1e-5)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.itconv_fast.batch_norm_relu(x, w.double(), w, w, w, 0.1, 1e-5)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.itconv_fast.batch_norm_relu_backward(torch.randn(3, 4, 2, 1), x, w, w, w, w)


def test_one_value_per_channel_raises_as_f_batch_norm_does():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.batch_norm_relu(torch.randn(1, 4, 1, 1), torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4), True)


def test_the_reference_serves_without_the_kernel(monkeypatch):
    monkeypatch.setattr(_extension, "has_kernels_for", lambda device: False)
    monkeypatch.setattr(_extension, "_quiet", True)
    x = make_input((4, 6, 3, 3), "channels_last", torch.float64).requires_grad_()
    w, b, rm, rv = params(6, torch.float64)
    w.requires_grad_(), b.requires_grad_()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm2, rv2 = rm.clone(), rv.clone()
    y = ops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5)
    y2 = torch.relu(F.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5))
    y.sum().backward(), y2.sum().backward()
    for a, e in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad), (rm, rm2), (rv, rv2)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, layout",
    [
        ((8, 16, 5, 7), "channels_last"),
        ((16, 40, 8, 8), "channels_last"),
        ((4, 3, 33, 33), "contiguous"),
        ((6, 5), "contiguous"),
    ],
    ids=str,
)
def test_the_cuda_kernels_match_the_reference(shape, layout, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = make_input(shape, layout, dtype)
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    w, b, rm, rv = params(shape[1], pdt)
    dy = make_input(shape, layout, dtype, seed=3)
    got = torch.ops.itconv_fast.batch_norm_relu(*(t.cuda() for t in (x, w, b, rm, rv)), 0.1, 1e-5)
    want = _reference.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
    for g_, e in zip(got, want):
        torch.testing.assert_close(g_.cpu().double(), e.double(), **tol)
    got_b = torch.ops.itconv_fast.batch_norm_relu_backward(dy.cuda(), x.cuda(), w.cuda(), b.cuda(), got[1], got[2])
    want_b = _reference.batch_norm_relu_backward(dy, x, w, b, got[1].cpu(), got[2].cpu())
    for g_, e in zip(got_b, want_b):
        torch.testing.assert_close(g_.cpu().double(), e.double(), **tol)


@needs_kernel
def test_double_backward_is_refused_not_silently_wrong():
    x = make_input((3, 4, 3, 3), "contiguous", torch.float64).requires_grad_()
    w, b, rm, rv = params(4, torch.float64)
    out = ops.batch_norm_relu(x, rm, rv, w.requires_grad_(), b.requires_grad_(), True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_a_module_call_with_bad_input_leaves_the_module_untouched():
    bn = BatchNormReLU2d(4)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match="float32"):
        bn(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_backward_fills_no_zero_gradients_for_the_statistics():
    """The op's four non-differentiable outputs (batch and running statistics) get no gradient: autograd would
    otherwise fill a zero tensor for each before every backward, four launches a layer a step on a GPU."""
    from itconv_fast.bench.launch_counter import LaunchCounter

    bn = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = ops.batch_norm_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5)
    with LaunchCounter() as counter:
        out.sum().backward()
    assert not any(op.startswith("aten::zeros") for op in counter.by_op), counter.by_op
    assert counter.by_op.get("itconv_fast::batch_norm_relu_backward.default") == 1
