"""Memory layouts on the CPU: a network that runs some stages channels-last and the convolutions of the others NHWC
(IterResNet.to_channels_last) mixes no layouts inside an elementwise operation (ATen's mixed-layout loops are about
30x slower than its vectorised ones); to_memory_format's gradient comes back in its input's layout; the head's
GlobalAvgPool2d gives nn.AdaptiveAvgPool2d(1)'s values and gradients, bit for bit, keeping a channels-last gradient
channels-last."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from itconv_fast.models import IterResNet, iter_resnet
from itconv_fast.nn import GlobalAvgPool2d, to_memory_format

CL = torch.channels_last


def layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"  # also for tensors that are both (C = 1 or H = W = 1): they fit either
    return "nhwc" if t.is_contiguous(memory_format=CL) else "strided"


class MixedLayouts(TorchDispatchMode):
    """Records the elementwise operations whose activation operands (4-D, batch `n`) differ in layout (the fused
    BatchNorm + ReLU's backward too: it would copy its gradient into the input's layout first)."""

    OPS = {
        torch.ops.aten.threshold_backward.default,
        torch.ops.aten.add.Tensor,
        torch.ops.aten.add_.Tensor,
        torch.ops.aten.mul.Tensor,
        torch.ops.aten.relu.default,
        torch.ops.aten.clamp_min.default,
    }
    if hasattr(torch.ops.itconv_fast, "batch_norm_relu_backward"):
        OPS.add(torch.ops.itconv_fast.batch_norm_relu_backward.default)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.mixed = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            acts = [
                a
                for a in args
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[0] == self.n and a.shape[-1] > 1
            ]
            if len({layout(a) for a in acts}) > 1:
                self.mixed.append((str(func), [tuple(a.shape) for a in acts], [a.stride() for a in acts]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sn_mu", [None, 0.95])
@pytest.mark.parametrize("min_width, narrow_convolutions", [(16, True), (16, False), (32, True), (1, True), (64, True)])
@pytest.mark.parametrize("batch", ["1 channel", "3 channels, NHWC"])  # Digitclutter; CIFAR's augmented batches
def test_a_training_step_with_channels_last_stages_mixes_no_layouts(sn_mu, min_width, narrow_convolutions, batch):
    torch.manual_seed(0)
    channels = 1 if batch == "1 channel" else 3
    model = IterResNet(10, channels, width=8, blocks=2, stages=3, input_size=32, sn_mu=sn_mu).train()
    model.to_channels_last(min_width=min_width, narrow_convolutions=narrow_convolutions)
    x, y = torch.randn(6, channels, 32, 32).contiguous(memory_format=CL), torch.randint(0, 10, (6,))
    with MixedLayouts(6) as mode:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert mode.mixed == []


@pytest.mark.parametrize("regression", ["stage input", "plain contiguous", "head"])
def test_the_recorder_sees_a_mixed_layout_relu_backward(regression, monkeypatch):
    """The guard against the layouts of before: a stage that takes its input as it comes (the first transition's
    output NCHW into NHWC blocks), conversions whose gradients keep the new layout (`.contiguous`), or the head
    pooled by ATen's mean (whose gradient is NCHW behind an NHWC ReLU)."""
    torch.manual_seed(0)
    model = IterResNet(10, 1, width=8, blocks=2, stages=3, input_size=32).train()
    model.to_channels_last(min_width=16, narrow_convolutions=regression == "plain contiguous")
    if regression == "stage input":
        model.transitions[0].conv.to(memory_format=torch.contiguous_format)
        model.transitions[0].nhwc_conv = False
        model.stages[1].memory_format = None
    elif regression == "plain contiguous":
        monkeypatch.setattr(iter_resnet, "to_memory_format", lambda x, fmt: x.contiguous(memory_format=fmt))
    else:
        model.head[2] = torch.nn.AdaptiveAvgPool2d(1)
    with MixedLayouts(6) as mode:
        model(torch.randn(6, 1, 32, 32)).sum().backward()
    assert any("threshold_backward" in op or "batch_norm_relu_backward" in op for op, _, _ in mode.mixed)


def test_channels_last_stages_take_an_nchw_input():
    torch.manual_seed(0)
    model = IterResNet(10, 1, width=8, blocks=2, stages=2, input_size=16).eval()
    z = torch.randn(3, 16, 8, 8)
    expected = model.stages[1](z)
    model.to_channels_last(min_width=16)
    out = model.stages[1](z)  # an NCHW caller (e.g. a measure feeding cached activations)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 8, 5, 3), (2, 3, 1, 1), (1, 1, 4, 4), (3, 16, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_global_avg_pool_equals_adaptive_avg_pool_bit_for_bit(dtype, shape, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    g = torch.randn(shape[0], shape[1], 1, 1, generator=gen, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = torch.nn.AdaptiveAvgPool2d(1)(a), GlobalAvgPool2d()(b)
    assert torch.equal(out, out_ref) and out.stride() == out_ref.stride()
    out_ref.backward(g)
    out.backward(g)
    assert torch.equal(b.grad, a.grad)
    assert b.grad.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


def test_global_avg_pool_without_gradients_and_twice_differentiated():
    pool = GlobalAvgPool2d()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=CL)
    with torch.no_grad():
        assert torch.equal(pool(x), torch.nn.functional.adaptive_avg_pool2d(x, 1))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pool(t).square(), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pool(t).square(), (x,))
    assert isinstance(pool, torch.nn.AdaptiveAvgPool2d) and pool.output_size == 1


@pytest.mark.parametrize("to_format", [CL, torch.contiguous_format])
def test_to_memory_format_converts_the_gradient_back(to_format):
    source = CL if to_format == torch.contiguous_format else torch.contiguous_format
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=source).requires_grad_()
    y = to_memory_format(x, to_format)
    assert torch.equal(y, x) and y.is_contiguous(memory_format=to_format)
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=to_format)
    y.backward(g)
    assert torch.equal(x.grad, g) and x.grad.is_contiguous(memory_format=source)
    assert torch.autograd.gradcheck(lambda t: to_memory_format(t, to_format).square(), (x,))


def test_to_memory_format_returns_a_tensor_already_in_the_layout_and_copies_without_gradients():
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=CL)
    assert to_memory_format(x, CL) is x
    y = to_memory_format(x, torch.contiguous_format)
    assert y.is_contiguous() and torch.equal(y, x) and y.grad_fn is None
    w = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert to_memory_format(w, CL).grad_fn is None
