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

from itconv_fast import _reference

emulation = pytest.importorskip("itconv_fast._device_emulation", reason="emulation extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1024  # kThreads * kPerThread of soft_couple_launch.h
GUARD = 7


_sentinels = iter(range(1, 10**9))


def guarded(values: torch.Tensor):
    """values copied into the middle of a larger buffer whose guard elements hold a value of their own (a
    different one per buffer, so that mixing guards of several members would change them; NaN guards
    would not show a write: NaN mixed is NaN): (view, whole buffer)."""
    flat = values.reshape(-1)
    buf = torch.full((flat.numel() + 2 * GUARD,), 1000.0 + next(_sentinels) % 1000, dtype=values.dtype)
    buf[GUARD:GUARD + flat.numel()] = flat
    buf.sentinel = buf[0].clone()
    return buf[GUARD:GUARD + flat.numel()].view(values.shape), buf


def guards_intact(buf) -> bool:
    return bool((buf[:GUARD] == buf.sentinel).all() and (buf[-GUARD:] == buf.sentinel).all())


def couple_both(shapes_per_group, dtype, lam, kernel, skip_first=0, max_items=2**31 - 1, emulated=emulation, seed=0):
    """Runs the emulated kernel and the reference on the same random gradients; returns (emulated, reference,
    guard buffers)."""
    gen = torch.Generator().manual_seed(seed)
    groups_ref, flat, sizes, bufs = [], [], [], []
    for size, shape in shapes_per_group:
        members = [torch.randn(shape, generator=gen).to(dtype) for _ in range(size)]
        groups_ref.append([m.clone() for m in members])
        for m in members:
            view, buf = guarded(m)
            flat.append(view)
            bufs.append(buf)
        sizes.append(size)
    emulated.soft_couple_(flat, sizes, lam, kernel, None, skip_first, max_items)
    _reference.soft_couple_(groups_ref, lam, kernel=kernel, skip_first=skip_first)
    return flat, [m for g in groups_ref for m in g], bufs


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("numel", [1, 255, 257, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3])
def test_coupling_kernel_is_bit_exact_around_chunk_boundaries(dtype, kernel, numel):
    got, want, bufs = couple_both([(3, (numel,)), (2, (numel + 1,))], dtype, 0.6, kernel)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(guards_intact(b) for b in bufs)


@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("size", [2, 16, 17, 64])  # every staging bucket (16, 64) and its edges
def test_coupling_kernel_up_to_the_largest_group(kernel, size):
    got, want, bufs = couple_both([(size, (300,))], torch.float32, 0.7, kernel)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(guards_intact(b) for b in bufs)


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


def test_coupling_kernel_rejects_what_the_cuda_launcher_rejects():
    members = [torch.randn(10) for _ in range(65)]
    with pytest.raises(ValueError, match="at most 64 coupled blocks"):
        emulation.soft_couple_(members, [65], 0.5, "triangular")
    assert all(torch.isfinite(m).all() for m in members)


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


def test_the_shim_reports_a_barrier_deadlock_instead_of_hanging():
    with pytest.raises(RuntimeError, match="barrier deadlock: 16 threads at __syncthreads, 16 at a warp shuffle"):
        emulation.emulate_syncthreads_deadlock()


# ---------------------------------------------------------------------------------------------------
# Mutants: the harness above must fail on planted bugs.

MUTATIONS = {
    # An off-by-one in the coupling kernel's bound: the thread of element numel writes one past the member.
    "soft_couple_device.cuh": ("if (i >= numel) return;", "if (i > numel) return;"),
    # The barrier between normalising v (each thread its own columns) and reading all of v (one warp per row).
    "spectral_norm_device.cuh": (
        "for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);\n    __syncthreads();",
        "for (int64_t k = threadIdx.x; k < cols; k += kThreads) vb[k] = static_cast<scalar_t>(static_cast<acc_t>(vb[k]) / vnorm);"),
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
    return load(name="itconv_fast_device_emulation_mutant", sources=[str(folder / "device_emulation.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc", "emulation"), os.path.join(ROOT, "csrc", "ops")],
                extra_cflags=["-O2", "-ffp-contract=off",
                              # the build runs through a shell: the quotes of the include path are escaped
                              f'-DITCONV_SOFT_COUPLE_DEVICE=\\"{folder / "soft_couple_device.cuh"}\\"',
                              f'-DITCONV_SPECTRAL_NORM_DEVICE=\\"{folder / "spectral_norm_device.cuh"}\\"'],
                build_directory=str(folder), verbose=False)


@pytest.mark.slow
def test_harness_catches_a_planted_off_by_one(mutant):
    """`i >= numel` -> `i > numel`: for a member whose size is not a multiple of the chunk, the thread of
    element `numel` mixes and writes one element past every member. The values inside agree; the guard
    after each member is overwritten: the guard check fails, as it must."""
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
