"""The fused BatchNorm + ReLU's CUDA device code and launch sequence (csrc/ops/cuda/batch_norm_relu_device.cuh),
run on the CPU under the emulation shim (one fiber per CUDA thread, the most adversarial legal schedule for a
missing barrier), against the reference: channels-last rows in one or several 32-channel tiles, contiguous planes,
several row chunks (more than 1,024 values per channel), capped elementwise grids (the grid-stride loops), dtypes."""

from __future__ import annotations

import pytest
import torch

from itconv_fast.ops import _reference

emulation = pytest.importorskip("itconv_fast._device_emulation", reason="emulation extension not built")
CL = torch.channels_last

CASES = [  # (shape, layout, max_blocks)
    ((4, 3, 5, 5), "contiguous", 1 << 20),
    ((4, 40, 3, 3), "channels_last", 1 << 20),  # two channel tiles, the second partial
    ((2, 3, 32, 24), "contiguous", 3),  # 1,536 values a channel: two chunks; a capped grid
    ((3, 8, 24, 24), "channels_last", 5),  # 1,728 rows: two chunks
    ((6, 5), "contiguous", 1 << 20),  # [N, C], one value per plane
    ((2, 3, 2, 3, 4), "contiguous", 2),
]


def inputs(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    C = shape[1]
    w, b = torch.randn(C, generator=g).to(pdt), torch.randn(C, generator=g).to(pdt)
    rm, rv = torch.randn(C, generator=g).to(pdt), (torch.rand(C, generator=g) + 0.5).to(pdt)
    return x, dy, w, b, rm, rv


TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape, layout, max_blocks", CASES, ids=[f"{s}-{l}-{m}" for s, l, m in CASES])
def test_emulated_cuda_kernels_match_the_reference(shape, layout, max_blocks, dtype):
    x, dy, w, b, rm, rv = inputs(shape, layout, dtype)
    got = emulation.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5, max_blocks)
    want = _reference.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    for name, g_, e in zip(("out", "mean", "invstd", "running_mean", "running_var"), got, want):
        torch.testing.assert_close(g_.double(), e.double(), **TOL[dtype], msg=name)
    assert got[0].is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    got_b = emulation.batch_norm_relu_backward(dy, x, w, b, got[1], got[2], max_blocks)
    want_b = _reference.batch_norm_relu_backward(dy, x, w, b, got[1], got[2])
    for name, g_, e in zip(("grad_input", "grad_weight", "grad_bias"), got_b, want_b):
        torch.testing.assert_close(g_.double(), e.double(), **TOL[dtype], msg=name)


def test_the_emulated_backward_mask_is_the_forwards():
    """Exactly-zero normalised values (the mean with bias 0): output 0, no gradient through them."""
    x = torch.tensor([-1.0, 0.0, 1.0]).repeat(4).reshape(3, 2, 2, 1).expand(3, 2, 2, 3).permute(0, 3, 1, 2).contiguous()
    w, b = torch.ones(3), torch.zeros(3)
    out, mean, invstd, _, _ = emulation.batch_norm_relu(x, w, b, torch.zeros(3), torch.ones(3), 0.1, 1e-5)
    _, _, grad_bias = emulation.batch_norm_relu_backward(torch.ones_like(x), x, w, b, mean, invstd)
    assert (out == 0).any()
    torch.testing.assert_close(grad_bias, (out > 0).float().sum([0, 2, 3]), rtol=0, atol=0)
