"""The CUDA path of soft_couple_ checked on the CPU: the launch tables the host code builds (walked exactly as
the kernel's blocks and threads read them), and the graph-capture path (couple_with_aten_ops), which runs on
any device, against the reference bit for bit. With a GPU, the capture path also runs under a real capture."""

import numpy as np
import pytest
import torch

from itconv_fast import ops
from itconv_fast.ops import _reference

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")

# The kernel's geometry (csrc/ops/soft_couple_launch.h).
THREADS, PER_THREAD = 256, 4
CHUNK = THREADS * PER_THREAD
FIELDS = 6  # ptr offset, member count, numel, coefficient offset, mode (0 uniform, 1 staged, 2 scratch), aligned
MAX_GRID = 2**31 - 1


def plan(numels, counts, kernel="uniform", max_items=MAX_GRID, per_thread=PER_THREAD):
    flat = torch.ops.itconv_fast._soft_couple_launch_plan(list(numels), list(counts), kernel, max_items, per_thread)
    return [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]


@pytest.mark.parametrize("per_thread", [1, 2, 4])
def test_thread_map_of_one_chunk_is_a_bijection(per_thread):
    # Thread x of a block touches begin + x * per_thread + k, k < per_thread: every offset of the chunk once.
    x, k = np.meshgrid(np.arange(THREADS), np.arange(per_thread), indexing="ij")
    offsets = (x * per_thread + k).ravel()
    assert np.array_equal(np.sort(offsets), np.arange(THREADS * per_thread))


def walk(launches, numels, counts, chunk=CHUNK):
    """For every (group, member): the element ranges the blocks cover, as the kernel computes them."""
    starts = np.cumsum([0] + list(counts))
    covered = {}  # (group, member) -> list of (start, stop)
    for descs, items, ptrs, coeffs in launches:
        descs, items, ptrs = descs.numpy(), items.numpy(), ptrs.numpy()
        assert descs.shape[1] == FIELDS and items.shape[1] == 2
        assert items.shape[0] <= MAX_GRID
        for g_local, begin in items:  # one block per item
            ptr_offset, count, numel, coeff_offset, mode, aligned = descs[g_local]
            uniform = mode == 0
            assert mode == (0 if uniform else (1 if count <= 64 else 2)) and aligned == 0  # plan: no real pointers
            members = ptrs[ptr_offset : ptr_offset + count]
            group = int(np.searchsorted(starts, members[0], side="right") - 1)
            assert numel == numels[group] and count == counts[group]
            assert list(members) == list(range(starts[group], starts[group] + count))
            # The coefficients the block reads: 2 for the uniform kernel, count^2 for a matrix.
            n_coeffs = 2 if uniform else count * count
            assert coeff_offset + n_coeffs <= coeffs.numel()
            if uniform:
                assert coeffs[coeff_offset].item() == 0.5 and coeffs[coeff_offset + 1].item() == 0.5 / count
            else:
                rows = coeffs[coeff_offset : coeff_offset + n_coeffs].view(count, count)
                assert torch.allclose(rows.sum(1), torch.ones(count, dtype=torch.float64))
            assert 0 <= begin < numel and begin % chunk == 0
            stop = min(begin + chunk, numel)  # threads return past numel
            for j in range(count):
                covered.setdefault((group, j), []).append((int(begin), int(stop)))
    return covered


def assert_exact_cover(covered, numels, counts):
    for g, (numel, count) in enumerate(zip(numels, counts)):
        for j in range(count):
            ranges = sorted(covered.get((g, j), []))
            if numel == 0:
                assert not ranges
                continue
            assert ranges[0][0] == 0 and ranges[-1][1] == numel, (g, j)
            for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
                assert a1 == b0, f"group {g}, member {j}: gap or overlap at {a1}/{b0}"


@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("per_thread", [1, 4])
def test_every_element_of_every_member_covered_once(kernel, per_thread):
    numels = [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 0, 16 * 16 * 9]
    counts = [1, 2, 3, 16, 64, 5, 4, 70]  # 70 triangular: the scratch mode (no member limit)
    launches = plan(numels, counts, kernel, per_thread=per_thread)
    assert len(launches) == 1
    assert_exact_cover(walk(launches, numels, counts, chunk=THREADS * per_thread), numels, counts)


def test_members_above_2_to_the_31_elements():
    # Offsets only: nothing is allocated. Items must reach past 2^31 without wrapping.
    numels = [2**31 + 3 * CHUNK + 17, 5]
    counts = [2, 3]
    (launch,) = plan(numels, counts)
    descs, items, _, _ = launch
    assert items.dtype == torch.int64 and descs.dtype == torch.int64
    first = items[items[:, 0] == 0, 1]
    assert first.numel() == -(-numels[0] // CHUNK)
    assert torch.equal(first, torch.arange(0, numels[0], CHUNK, dtype=torch.int64))
    assert first[-1].item() > 2**31 and first[-1].item() + CHUNK >= numels[0]
    assert descs[0, 2].item() == numels[0]


def test_lists_longer_than_one_launch_are_split_and_still_covered_once():
    numels = [5 * CHUNK + 3, 2 * CHUNK, 1, 4 * CHUNK]
    counts = [3, 2, 2, 64]
    launches = plan(numels, counts, max_items=4)
    total = sum(-(-n // CHUNK) for n in numels)
    assert len(launches) == -(-total // 4)
    assert all(items.shape[0] <= 4 for _, items, _, _ in launches)
    # A group straddling two launches has a descriptor in each.
    assert sum(descs.shape[0] for descs, _, _, _ in launches) > len(numels)
    assert_exact_cover(walk(launches, numels, counts), numels, counts)


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="max_items"):
        plan([4], [2], max_items=0)
    with pytest.raises(ValueError, match="member counts"):
        plan([4, 5], [2])


# ----- the graph-capture path: ATen operations only, bit-equal to the reference -----

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def groups_of(shapes, T, dtype, device, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        members = []
        for _ in range(T):
            t = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            members.append(t.t() if transposed and t.dim() == 2 else t)
        out.append(members)
    return out


def run_aten_path(groups, lam, kernel, bandwidth=None, skip_first=0):
    torch.ops.itconv_fast._soft_couple_aten_(
        [t for g in groups for t in g], [len(g) for g in groups], lam, kernel, bandwidth, skip_first
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("T,skip_first", [(1, 0), (2, 0), (2, 1), (7, 0), (7, 1)])
def test_capture_path_equals_reference_bitwise(dtype, kernel, skip_first, lam, T):
    shapes = [(5, 3), (1025,), (16, 16, 3, 3)]
    ours, ref = groups_of(shapes, T, dtype, "cpu"), groups_of(shapes, T, dtype, "cpu")
    run_aten_path(ours, lam, kernel, skip_first=skip_first)
    _reference.soft_couple_(ref, lam, kernel=kernel, skip_first=skip_first)
    for a, b in zip(sum(ours, []), sum(ref, [])):
        assert torch.equal(a, b)


def test_capture_path_handles_non_contiguous_members_and_rejects_bad_input():
    ours, ref = (
        groups_of([(6, 4)], 3, torch.float32, "cpu", transposed=True),
        groups_of([(6, 4)], 3, torch.float32, "cpu", transposed=True),
    )
    run_aten_path(ours, 0.5, "uniform")
    _reference.soft_couple_(ref, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], ref[0]))
    before = [t.clone() for t in ours[0]]
    with pytest.raises(ValueError, match="lam"):
        run_aten_path(ours, 1.5, "uniform")
    assert all(torch.equal(a, b) for a, b in zip(ours[0], before))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
def test_op_under_cuda_graph_capture_replays_like_the_reference(dtype, kernel):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    groups = groups_of([(64, 3, 3), (4097,)], 5, dtype, "cuda")
    ops.soft_couple_(groups, 0.5, kernel=kernel)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.soft_couple_(groups, 0.5, kernel=kernel)
    for _ in range(2):  # fresh inputs in the same buffers, replayed twice
        fresh = groups_of([(64, 3, 3), (4097,)], 5, dtype, "cuda", seed=7)
        for g, f in zip(groups, fresh):
            for t, v in zip(g, f):
                t.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        ref = groups_of([(64, 3, 3), (4097,)], 5, dtype, "cpu", seed=7)
        _reference.soft_couple_(ref, 0.5, kernel=kernel)
        for a, b in zip(sum(groups, []), sum(ref, [])):
            assert torch.equal(a.cpu(), b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, script, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no GPU" in done.stderr
    assert not out.exists()
