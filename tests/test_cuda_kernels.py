"""The CUDA kernels on a GPU against the references (skipped without one; `pytest -m cuda` runs them, and so
does `make gpu-check`). The same device code runs on the CPU in tests/test_device_emulation.py; these add
what only the hardware shows: real warps, real memory, the pinned-table copies, other SM counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itconv_fast import ops
from itconv_fast.ops import _reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _groups(specs, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(n)] for n, shape, dtype in specs]


def _assert_exact(groups, expected):
    for g, e in zip(groups, expected):
        for a, b in zip(g, e):
            assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
def test_mixed_dtypes_in_one_call(kernel):
    """Four dtypes in one call: four launches, one per dtype, each bit-exact."""
    specs = [(4, (1000,), dt) for dt in DTYPES] + [(17, (33, 5), torch.float32), (70, (300,), torch.float64)]
    groups = _groups(specs, "cuda")
    expected = [[t.cpu() for t in g] for g in groups]
    ops.soft_couple_(groups, 0.4, kernel=kernel)
    _reference.soft_couple_(expected, 0.4, kernel=kernel)
    _assert_exact(groups, expected)


def test_misaligned_members_take_the_elementwise_path():
    base = torch.randn(4 * 1031 + 8, device="cuda")
    groups = [[base[1 + k * 1031 : 1 + k * 1031 + 1030] for k in range(4)]]  # 4-byte aligned, not 16
    expected = [[t.cpu() for t in groups[0]]]
    ops.soft_couple_(groups, 0.5)
    _reference.soft_couple_(expected, 0.5)
    _assert_exact(groups, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,cols", [(8, 300), (40, 9), (33, 257), (130, 600), (1, 1)])
def test_matrix_kernel_wide_and_tall_matrices(dtype, rows, cols):
    """Wider than the block (cols > 256) and taller than its 8 warps (rows > 8), stacked and as a list."""
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(3, rows, cols, 1, 1, generator=gen, dtype=dtype)
    u = _reference._normalize_rows(torch.randn(3, rows, generator=gen, dtype=dtype))
    _, sigma_ref = _reference.power_iteration_matrix_(w, u.clone(), 3)
    u_gpu = u.cuda()
    _, sigma = torch.ops.itconv_fast.power_iteration_matrix_(w.cuda(), u_gpu, 3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sigma.cpu(), sigma_ref, rtol=tol, atol=0)
    kernels = [k.cuda() for k in w.unbind(0)]
    kernels[1] = kernels[1].transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous: a copy, same values
    _, sigma_list = torch.ops.itconv_fast.power_iteration_matrix_.list(kernels, u.cuda(), 3)
    torch.testing.assert_close(sigma_list.cpu(), sigma_ref, rtol=tol, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    T=st.integers(1, 80),
    lam=st.floats(0.0, 1.0),
    kernel=st.sampled_from(["uniform", "triangular"]),
    skip=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fuzz_cuda_against_reference(shape, T, lam, kernel, skip, dtype, seed):
    skip = min(skip, T - 1)
    groups = _groups([(T, tuple(shape), dtype)], "cuda", seed)
    expected = [[t.cpu() for t in groups[0]]]
    ops.soft_couple_(groups, lam, kernel=kernel, skip_first=skip)
    _reference.soft_couple_(expected, lam, kernel=kernel, skip_first=skip)
    _assert_exact(groups, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_kernel_multi_block_path(dtype):
    """256 x 2304 (ResNet-101-64's stage 3 conv kernels): the tiled, several-blocks-per-matrix path."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, 256, 3, 3, generator=gen, dtype=dtype)
    u = _reference._normalize_rows(torch.randn(4, 256, generator=gen, dtype=dtype))
    _, sigma_ref = _reference.power_iteration_matrix_(w, u.clone(), 2)
    _, sigma = torch.ops.itconv_fast.power_iteration_matrix_(w.cuda(), u.cuda(), 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sigma.cpu(), sigma_ref, rtol=tol, atol=0)


def test_the_op_itself_refuses_a_list_mixing_cpu_and_cuda():
    """torch.ops.itconv_fast.soft_couple_ called directly with a CPU and a CUDA tensor (in one group, or in two):
    a ValueError from the op, nothing modified (this crashed the process on an H200, 2026-11-29)."""
    for group_sizes in ([2], [1, 1]):
        cpu, cuda = torch.randn(5), torch.randn(5, device="cuda")
        before = (cpu.clone(), cuda.clone())
        for grads in ([cpu, cuda], [cuda, cpu]):
            with pytest.raises(ValueError, match="one CUDA device|member 1 is on"):
                torch.ops.itconv_fast.soft_couple_(grads, group_sizes, 0.5, "uniform", None, 0)
        assert torch.equal(cpu, before[0]) and torch.equal(cuda, before[1])
