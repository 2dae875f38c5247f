"""The CUDA kernels' device code, executed on the CPU under the CUDA shim (csrc/emulation/cuda_shim.h): one
fiber per CUDA thread, barriers and warp shuffles emulated, the real launch plan (for_each_launch,
plan_launches, staging buckets). Coupling must equal the reference bit for bit; the power iteration must
agree within rounding.

Every buffer the kernels write sits between guard elements (sentinel values inside one larger allocation),
so an out-of-bounds write shows up as a changed guard even where it lands in memory we own.
"""

import os
import shutil

import pytest
import torch

from itconv_fast.ops import _reference

emulation = pytest.importorskip("itconv_fast._device_emulation", reason="emulation extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1024  # kThreads * kPerThread of soft_couple_launch.h
GUARD = 7


_sentinels = iter(range(1, 10**9))


def guarded(values: torch.Tensor, aligned: bool = True):
    """values copied into the middle of a larger buffer whose guard elements hold a value of their own (a
    different one per buffer, so that mixing guards of several members would change them; NaN guards
    would not show a write: NaN mixed is NaN): (view, whole buffer). aligned: the view starts on a
    32-byte boundary (the kernel's pack path) or one element past it (its element-wise path)."""
    flat = values.reshape(-1)
    buf = torch.full((flat.numel() + 2 * GUARD + 64,), 1000.0 + next(_sentinels) % 1000, dtype=values.dtype)
    size = buf.element_size()
    start = GUARD + (-(buf.data_ptr() + GUARD * size) % 32) // size + (0 if aligned else 1)
    buf[start : start + flat.numel()] = flat
    buf.sentinel = buf[0].clone()
    buf.span = (start, start + flat.numel())
    return buf[start : start + flat.numel()].view(values.shape), buf


def guards_intact(buf) -> bool:
    lo, hi = buf.span
    return bool((buf[:lo] == buf.sentinel).all() and (buf[hi:] == buf.sentinel).all())


def couple_both(
    shapes_per_group,
    dtype,
    lam,
    kernel,
    skip_first=0,
    max_items=2**31 - 1,
    emulated=emulation,
    seed=0,
    per_thread=4,
    aligned=True,
):
    """Runs the emulated kernel and the reference on the same random gradients; returns (emulated, reference,
    guard buffers)."""
    gen = torch.Generator().manual_seed(seed)
    groups_ref, flat, sizes, bufs = [], [], [], []
    for size, shape in shapes_per_group:
        members = [torch.randn(shape, generator=gen).to(dtype) for _ in range(size)]
        groups_ref.append([m.clone() for m in members])
        for m in members:
            view, buf = guarded(m, aligned)
            flat.append(view)
            bufs.append(buf)
        sizes.append(size)
    emulated.soft_couple_(flat, sizes, lam, kernel, None, skip_first, max_items, per_thread)
    _reference.soft_couple_(groups_ref, lam, kernel=kernel, skip_first=skip_first)
    return flat, [m for g in groups_ref for m in g], bufs


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("numel", [1, 255, 257, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3])
@pytest.mark.parametrize("aligned", [True, False], ids=["packs", "elementwise"])
def test_coupling_kernel_is_bit_exact_around_chunk_boundaries(dtype, kernel, numel, aligned):
    got, want, bufs = couple_both([(3, (numel,)), (2, (numel + 1,))], dtype, 0.6, kernel, aligned=aligned)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(guards_intact(b) for b in bufs)


@pytest.mark.parametrize("per_thread", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
def test_coupling_kernel_with_fewer_elements_per_thread(per_thread, kernel):
    """The launcher gives small models 1 or 2 elements per thread (more blocks); any count 1..4 is exact."""
    numel = 256 * per_thread * 2 + 5
    got, want, bufs = couple_both([(4, (numel,)), (20, (37,))], torch.float32, 0.4, kernel, per_thread=per_thread)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(guards_intact(b) for b in bufs)


@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("size", [2, 16, 17, 64, 65, 100])  # registers, both staging buckets, the scratch mode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coupling_kernel_has_no_group_size_limit(kernel, size, dtype):
    got, want, bufs = couple_both([(size, (300,))], dtype, 0.7, kernel)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(guards_intact(b) for b in bufs)


def test_coupling_kernel_on_channels_last_members_in_the_scratch_mode():
    """The scratch copy follows each member's memory order (dense, permuted strides)."""
    gen = torch.Generator().manual_seed(3)
    members = [torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last) for _ in range(70)]
    ref = [[m.clone() for m in members]]
    emulation.soft_couple_(members, [70], 0.5, "triangular")
    _reference.soft_couple_(ref, 0.5, kernel="triangular")
    assert all(torch.equal(a, b) for a, b in zip(members, ref[0]))


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_coupling_kernel_with_mixed_dtypes_skip_first_and_split_launches(lam):
    """Four dtypes in one call (four launches), skip_first, and max_items=3 so that groups straddle launches."""
    gen = torch.Generator().manual_seed(1)
    groups = [[torch.randn(2500, generator=gen).to(dt) for _ in range(4)] for dt in DTYPES]
    ref = [[m.clone() for m in g] for g in groups]
    flat = [m for g in groups for m in g]
    emulation.soft_couple_(flat, [4] * 4, lam, "triangular", 2.0, 1, 3)
    _reference.soft_couple_(ref, lam, kernel="triangular", bandwidth=2.0, skip_first=1)
    for g, w in zip(flat, [m for g in ref for m in g]):
        assert torch.equal(g, w)


def test_coupling_kernel_rejects_bad_input_before_writing():
    members = [torch.randn(10) for _ in range(3)]
    before = [m.clone() for m in members]
    with pytest.raises(ValueError, match="lam must lie in"):
        emulation.soft_couple_(members, [3], 1.5, "triangular")
    assert all(torch.equal(a, b) for a, b in zip(members, before))


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 7), (8, 300), (40, 9), (33, 257), (130, 600)])
def test_matrix_power_iteration_kernel_matches_the_reference(dtype, rtol, rows, cols):
    """Block reductions, warp shuffles and barriers on matrices wider than the block (cols > 256) and taller
    than its 8 warps (rows > 8)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    B = 3
    w = torch.randn(B, rows, cols, 1, 1, generator=gen, dtype=dtype)
    u = _reference._normalize_rows(torch.randn(B, rows, generator=gen, dtype=dtype))
    u_ref = u.clone()
    v, sigma = emulation.power_iteration_matrix_(w, u, 3)
    v_ref, sigma_ref = _reference.power_iteration_matrix_(w, u_ref, 3)
    torch.testing.assert_close(sigma, sigma_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(u, u_ref, rtol=rtol * 10, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_list_form_reads_each_kernel_through_the_pointer_table(dtype):
    """Kernels in separate allocations (one non-contiguous) read where they lie: the same as the stacked form."""
    gen = torch.Generator().manual_seed(5)
    kernels = [torch.randn(12, 20, 3, 3, generator=gen, dtype=dtype) for _ in range(3)]
    kernels[1] = torch.randn(20, 12, 3, 3, generator=gen, dtype=dtype).transpose(0, 1)
    u = _reference._normalize_rows(torch.randn(3, 12, generator=gen, dtype=dtype))
    u_list, u_ref = u.clone(), u.clone()
    v, sigma = emulation.power_iteration_matrix_list_(kernels, u_list, 2)
    v_ref, sigma_ref = _reference.power_iteration_matrix_(torch.stack(kernels), u_ref, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sigma, sigma_ref, rtol=tol, atol=0)
    torch.testing.assert_close(u_list, u_ref, rtol=tol * 10, atol=tol)


def test_the_shim_reports_a_barrier_deadlock_instead_of_hanging():
    with pytest.raises(RuntimeError, match="barrier deadlock: 16 threads at __syncthreads, 16 at a warp shuffle"):
        emulation.emulate_syncthreads_deadlock()


# ---------------------------------------------------------------------------------------------------
# Mutants: the harness above must fail on planted bugs.

MUTATIONS = {
    # An off-by-one in the coupling kernel's bound: the last thread takes one element past the member.
    "soft_couple_device.cuh": (
        "numel - first < per_thread ? numel - first : per_thread",
        "numel - first <= per_thread ? numel - first + 1 : per_thread",
    ),
    # The barrier between normalising v (each thread its own columns) and reading all of v (one warp per row).
    "spectral_norm_device.cuh": (
        "for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = "
        "static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);\n    __syncthreads();",
        "for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = "
        "static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);",
    ),
}


@pytest.fixture(scope="module")
def mutant(tmp_path_factory):
    """The emulation module compiled with both device files mutated (one JIT build, about a minute)."""
    from torch.utils.cpp_extension import load

    folder = tmp_path_factory.mktemp("mutant")
    for name, (old, new) in MUTATIONS.items():
        source = open(os.path.join(ROOT, "csrc", "ops", "cuda", name)).read()
        assert source.count(old) == 1, f"the mutation site in {name} moved: update MUTATIONS"
        (folder / name).write_text(source.replace(old, new))
    shutil.copy(os.path.join(ROOT, "csrc", "emulation", "device_emulation.cpp"), folder / "device_emulation.cpp")
    return load(
        name="itconv_fast_device_emulation_mutant",
        sources=[str(folder / "device_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "emulation"), os.path.join(ROOT, "csrc", "ops")],
        extra_cflags=[
            "-O2",
            "-ffp-contract=off",
            # the build runs through a shell: the quotes of the include path are escaped
            f'-DITCONV_SOFT_COUPLE_DEVICE=\\"{folder / "soft_couple_device.cuh"}\\"',
            f'-DITCONV_SPECTRAL_NORM_DEVICE=\\"{folder / "spectral_norm_device.cuh"}\\"',
        ],
        build_directory=str(folder),
        verbose=False,
    )


@pytest.mark.slow
def test_harness_catches_a_planted_off_by_one(mutant):
    """`numel - first < per_thread` -> `<=`: the last thread of a member whose size is not a multiple of
    per_thread takes one element too many and writes one element past every member. The values inside
    agree; the guard after each member is overwritten: the guard check fails, as it must."""
    got, want, bufs = couple_both([(3, (CHUNK + 1,))], torch.float32, 0.6, "uniform", emulated=mutant)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not all(guards_intact(b) for b in bufs)
    # The faithful build on the same input leaves the guards alone.
    _, _, bufs = couple_both([(3, (CHUNK + 1,))], torch.float32, 0.6, "uniform")
    assert all(guards_intact(b) for b in bufs)


@pytest.mark.slow
def test_harness_catches_a_missing_barrier(mutant):
    """Without the barrier after v is normalised, warp 0 runs ahead (the shim runs the lowest thread until its
    next barrier) and reads the columns that threads 32-255 have not normalised yet: sigma comes out wrong
    for any matrix wider than 32 columns, and the comparison with the reference fails."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 40, 300, 1, 1, generator=gen, dtype=torch.float64)
    u = _reference._normalize_rows(torch.randn(2, 40, generator=gen, dtype=torch.float64))
    _, sigma_ref = _reference.power_iteration_matrix_(w, u.clone(), 2)
    _, sigma_mutant = mutant.power_iteration_matrix_(w, u.clone(), 2)
    _, sigma_faithful = emulation.power_iteration_matrix_(w, u.clone(), 2)
    torch.testing.assert_close(sigma_faithful, sigma_ref, rtol=1e-12, atol=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(sigma_mutant, sigma_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("rows,cols", [(65, 9), (130, 257), (300, 900), (64, 40)])
def test_multi_block_matrix_step_matches_the_reference(dtype, rtol, rows, cols):
    """The tiled path (four launches per step, several blocks per matrix, partials combined in tile order),
    forced on every size here; 300 x 900 is one the launcher sends there itself (2^18 elements or more)."""
    gen = torch.Generator().manual_seed(rows + 7 * cols)
    w = torch.randn(2, rows, cols, 1, 1, generator=gen, dtype=dtype)
    u = _reference._normalize_rows(torch.randn(2, rows, generator=gen, dtype=dtype))
    u_ref, u_single = u.clone(), u.clone()
    v, sigma = emulation.power_iteration_matrix_(w, u, 2, True)
    v_ref, sigma_ref = _reference.power_iteration_matrix_(w, u_ref, 2)
    _, sigma_single = emulation.power_iteration_matrix_(w, u_single, 2, False)
    torch.testing.assert_close(sigma, sigma_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(u, u_ref, rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(sigma, sigma_single, rtol=rtol, atol=0)
    # The list form takes the same path.
    kernels = [k.clone() for k in w.unbind(0)]
    u_list = _reference._normalize_rows(torch.randn(2, rows, generator=gen, dtype=dtype))
    u_list_ref = u_list.clone()
    _, sigma_list = emulation.power_iteration_matrix_list_(kernels, u_list, 1, True)
    _, sigma_list_ref = _reference.power_iteration_matrix_(w, u_list_ref, 1)
    torch.testing.assert_close(sigma_list, sigma_list_ref, rtol=rtol, atol=0)
