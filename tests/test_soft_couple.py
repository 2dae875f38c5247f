"""The fused soft_couple_ op against the pure-PyTorch reference, its edge cases and bad input."""

import itertools
import math

import pytest
import torch
from conftest import devices
from hypothesis import given, settings
from hypothesis import strategies as st

from itconv_fast import ops
from itconv_fast.ops import _extension, _reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(7,), (16, 16, 3, 3), (3, 1, 5), (1,), (1025,), (2, 3, 4, 5)]

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")


def make_groups(shapes, T, dtype, device, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for shape in shapes:
        group = []
        for _ in range(T):
            if layout == "contiguous":
                t = torch.randn(shape, generator=gen, dtype=torch.float64)
            elif layout == "transposed":  # non-contiguous view of a larger tensor
                t = torch.randn(tuple(reversed(shape)) + (2,), generator=gen, dtype=torch.float64)[..., 0]
                t = t.permute(*reversed(range(len(shape))))
            elif layout == "channels_last" and len(shape) == 4:
                t = torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
            else:
                t = torch.randn(shape, generator=gen, dtype=torch.float64)
            group.append(t.to(device=device, dtype=dtype))
        groups.append(group)
    return groups


def clone_groups(groups):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in g] for g in groups]


def assert_groups_equal(actual, expected):
    for gi, (ga, ge) in enumerate(zip(actual, expected)):
        for j, (a, e) in enumerate(zip(ga, ge)):
            if not isinstance(a, torch.Tensor):
                assert a == e
                continue
            assert torch.equal(a, e), f"group {gi} member {j}: max diff {(a.double() - e.double()).abs().max()}"


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 5, 16])
@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("kernel,skip_first", [("uniform", 0), ("triangular", 0), ("uniform", 1), ("triangular", 2)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
def test_kernel_matches_reference_bitwise(device, dtype, T, lam, kernel, skip_first, layout):
    skip_first = min(skip_first, T - 1)
    groups = make_groups(SHAPES, T, dtype, device, layout)
    expected = clone_groups(groups)
    ops.soft_couple_(groups, lam, kernel=kernel, skip_first=skip_first)
    _reference.soft_couple_(expected, lam, kernel=kernel, skip_first=skip_first)
    # Same operations in the same order (no FMA contraction): identical bits, every dtype.
    assert_groups_equal(groups, expected)
    for g in groups:  # layouts are preserved (the op writes in place)
        assert all(t.stride() == g[0].stride() for t in g) or layout == "transposed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["uniform", "triangular"])
def test_reference_matches_textbook_formula(dtype, kernel):
    """The reference against g_t <- (1 - lam) g_t + lam sum_u K[t, u] g_u with K built independently."""
    T, lam, h = 6, 0.37, 2.5
    groups = make_groups([(4, 3)], T, dtype, "cpu")
    stacked = torch.stack(groups[0]).double()
    if kernel == "uniform":
        K = torch.full((T, T), 1.0 / T, dtype=torch.float64)
    else:
        idx = torch.arange(T, dtype=torch.float64)
        K = (1 - (idx[:, None] - idx[None, :]).abs() / h).clamp(min=0)
        K = K / K.sum(1, keepdim=True)
    expected = (1 - lam) * stacked + lam * torch.einsum("tu,u...->t...", K, stacked)
    _reference.soft_couple_(groups, lam, kernel=kernel, bandwidth=h if kernel == "triangular" else None)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(torch.stack(groups[0]).double(), expected, rtol=tol, atol=tol)


def test_triangular_rows_sum_to_one_and_default_bandwidth():
    for n in [1, 2, 3, 8, 16]:
        kind, m = _reference.mixing_coefficients("triangular", 1.0, None, n)
        assert kind == "matrix"
        for row in m:
            assert math.isclose(sum(row), 1.0, rel_tol=1e-12)
    # h = 1 puts no weight on neighbours: the triangular kernel is then the identity.
    _, m = _reference.mixing_coefficients("triangular", 1.0, 1.0, 4)
    assert m == [[1.0 if t == u else 0.0 for u in range(4)] for t in range(4)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_lam_zero_is_bitwise_noop(device, dtype):
    groups = make_groups(SHAPES, 5, dtype, device)
    groups[0][1][0] = -0.0  # signed zeros and non-finite values survive untouched
    groups[1][2].view(-1)[0] = float("nan")
    before = clone_groups(groups)
    ops.soft_couple_(groups, 0.0, kernel="triangular")
    for ga, gb in zip(groups, before):
        for a, b in zip(ga, gb):
            assert torch.equal(
                a.view(torch.uint8) if a.dtype != torch.float64 else a.view(torch.int64),
                b.view(torch.uint8) if b.dtype != torch.float64 else b.view(torch.int64),
            )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_lam_one_uniform_makes_members_identical(device, dtype):
    groups = make_groups(SHAPES, 16, dtype, device)
    means = [torch.stack(g).double().mean(0) for g in groups]
    ops.soft_couple_(groups, 1.0)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for g, mean in zip(groups, means):
        for t in g[1:]:
            assert torch.equal(t, g[0])
        torch.testing.assert_close(g[0].double(), mean, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", devices())
def test_skip_first_leaves_first_blocks_untouched(device):
    groups = make_groups([(10,)], 8, torch.float32, device)
    before = clone_groups(groups)
    ops.soft_couple_(groups, 1.0, skip_first=3)
    for j in range(3):
        assert torch.equal(groups[0][j], before[0][j])
    expected = torch.stack(before[0][3:]).mean(0)
    for j in range(3, 8):
        torch.testing.assert_close(groups[0][j], expected)
        assert torch.equal(groups[0][j], groups[0][3])


@pytest.mark.parametrize("device", devices())
def test_edge_sizes(device):
    empty = torch.empty(0, 3, device=device)
    groups = [[], [empty, empty.clone()], [torch.ones(3, device=device)]]
    ops.soft_couple_(groups, 0.5)  # empty groups, zero-size members, T = 1: nothing to do, no error
    assert torch.equal(groups[2][0], torch.ones(3, device=device))
    ops.soft_couple_([], 0.5)


@needs_extension
def test_many_groups_mixed_dtypes_one_call():
    """One call with groups of different T, dtypes and sizes (crossing chunk borders)."""
    groups = []
    for i, (dtype, T) in enumerate(itertools.product(DTYPES, [2, 3, 16])):
        groups += make_groups([(2049 + i,), (5,)], T, dtype, "cpu", seed=i)
    expected = clone_groups(groups)
    ops.soft_couple_(groups, 0.6, kernel="triangular", bandwidth=1.5)
    _reference.soft_couple_(expected, 0.6, kernel="triangular", bandwidth=1.5)
    assert_groups_equal(groups, expected)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing modified
# --------------------------------------------------------------------------------------------


def _good_groups():
    return [[torch.randn(3, 3) for _ in range(4)], [torch.randn(5) for _ in range(4)]]


BAD_CALLS = [
    (dict(lam=1.5), ValueError, "lam"),
    (dict(lam=-0.1), ValueError, "lam"),
    (dict(lam=float("nan")), ValueError, "lam"),
    (dict(lam="0.5"), TypeError, "lam"),
    (dict(lam=0.5, kernel="gaussian"), ValueError, "kernel"),
    (dict(lam=0.5, kernel="triangular", bandwidth=0.5), ValueError, "bandwidth"),
    (dict(lam=0.5, skip_first=-1), ValueError, "skip_first"),
    (dict(lam=0.5, skip_first=4), ValueError, "group 0: skip_first"),
    (dict(lam=0.5, skip_first=1.0), TypeError, "skip_first"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CALLS)
def test_bad_arguments_raise_and_modify_nothing(path, kwargs, exc, match):
    groups = _good_groups()
    before = clone_groups(groups)
    with pytest.raises(exc, match=match):
        ops.soft_couple_(groups, **kwargs)
    assert_groups_equal(groups, before)


@pytest.mark.parametrize(
    "corrupt,exc,match",
    [
        (lambda gs: gs[1].__setitem__(2, torch.randn(6)), ValueError, "group 1: member 2 has shape"),
        (
            lambda gs: gs[1].__setitem__(3, torch.randn(5, dtype=torch.float64)),
            TypeError,
            "group 1: member 3 has dtype",
        ),
        (lambda gs: gs.append([torch.randint(0, 3, (4,)) for _ in range(2)]), TypeError, "group 2: dtype"),
        (lambda gs: gs.append([gs[0][0], torch.randn(3, 3)]), ValueError, "overlaps"),
        (lambda gs: gs[0].__setitem__(1, gs[0][0].view(-1)[:9].view(3, 3)), ValueError, "overlaps"),
        (lambda gs: gs.append(torch.randn(3)), TypeError, "group 2"),
        (
            lambda gs: gs.insert(1, []) or gs[2].__setitem__(0, torch.randn(4)),
            ValueError,
            "group 2: member 1 has shape",
        ),
        (
            lambda gs: gs.append([torch.zeros(1).expand(3), torch.zeros(3)]),
            ValueError,
            "group 2: member 0 has internally",
        ),
        (lambda gs: gs.append([torch.zeros(3, requires_grad=True), torch.zeros(3)]), ValueError, "requires grad"),
        (lambda gs: gs.append([1.0, 2.0]), TypeError, "group 2, member 0"),
    ],
)
def test_bad_groups_raise_naming_the_group_and_modify_nothing(path, corrupt, exc, match):
    groups = _good_groups()
    corrupt(groups)
    before = clone_groups(groups)
    with pytest.raises(exc, match=match):
        ops.soft_couple_(groups, 0.5)
    # The first group is valid and comes first: it must still be untouched.
    assert_groups_equal(groups, before)


@pytest.mark.cuda
def test_mismatched_devices_rejected(path):
    groups = [[torch.randn(3), torch.randn(3, device="cuda")]]
    before = [t.clone() for t in groups[0]]
    with pytest.raises(ValueError, match="group 0: member 1 is on"):
        ops.soft_couple_(groups, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(groups[0], before))


def test_group_spanning_devices_is_refused_on_the_cpu(path):
    """A group whose first member is on the CPU and another elsewhere (here: meta) is refused before the op is
    called. The wrapper used to look only at each group's first member and passed the mixed list to the op
    (on an H200 the CPU + CUDA list crashed the process; with meta it silently did nothing)."""
    groups = [[torch.randn(3), torch.randn(3)], [torch.randn(3), torch.empty(3, device="meta")]]
    before = [t.clone() for t in groups[0]]
    with pytest.raises(ValueError, match="group 1: member 1 is on meta, member 0 on cpu"):
        ops.soft_couple_(groups, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(groups[0], before))


@needs_extension
def test_the_op_itself_refuses_a_list_on_two_devices():
    """torch.ops.itconv_fast.soft_couple_ called directly (no wrapper) with CPU and meta tensors in one list: the
    dispatcher picks the op's Meta kernel, which used to do nothing; it raises, and the CPU tensors stay as they
    were. (The CPU + CUDA list of the same kind crashed on an H200; tests/test_cuda_kernels.py checks it there.)"""
    cpu = [torch.randn(3), torch.randn(3)]
    before = [t.clone() for t in cpu]
    for group_sizes in ([3], [2, 1], [1, 1, 1]):
        with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
            torch.ops.itconv_fast.soft_couple_(
                cpu + [torch.empty(3, device="meta")], group_sizes, 0.5, "uniform", None, 0
            )
    assert all(torch.equal(a, b) for a, b in zip(cpu, before))


@needs_extension
def test_op_checks_its_own_arguments():
    """Direct torch.ops callers get the C++ checks (ValueError / TypeError) and no modification."""
    grads = [torch.randn(3) for _ in range(3)]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="lam"):
        torch.ops.itconv_fast.soft_couple_(grads, [3], 2.0, "uniform", None, 0)
    with pytest.raises(ValueError, match="group_sizes"):
        torch.ops.itconv_fast.soft_couple_(grads, [2], 0.5, "uniform", None, 0)
    with pytest.raises(ValueError, match="unknown kernel"):
        torch.ops.itconv_fast.soft_couple_(grads, [3], 0.5, "box", None, 0)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.itconv_fast.soft_couple_(grads + [torch.randn(4)], [4], 0.5, "uniform", None, 0)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


# --------------------------------------------------------------------------------------------
# Dispatcher integration
# --------------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    grads = [torch.randn(4, 3, device=device) for _ in range(5)] + [torch.randn(7, device=device) for _ in range(5)]
    for kernel, bandwidth in [("uniform", None), ("triangular", 2.0)]:
        torch.library.opcheck(
            torch.ops.itconv_fast.soft_couple_.default,
            (grads, [5, 5], 0.4, kernel, bandwidth, 1),
        )


@needs_extension
def test_works_inside_torch_compile():
    groups = make_groups([(8,), (2, 3)], 4, torch.float32, "cpu")
    expected = clone_groups(groups)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(flat):
        torch.ops.itconv_fast.soft_couple_(flat, [4, 4], 0.5, "uniform", None, 0)

    step([t for g in groups for t in g])
    _reference.soft_couple_(expected, 0.5)
    assert_groups_equal(groups, expected)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride_bytes", [4096, 4096 + 64])
def test_page_congruent_members_take_the_block_path_and_match(dtype, stride_bytes):
    """Members that start at the same offset within a 4 KiB page (as page-aligned gradients do) crowd
    one L1 set and go through the block path instead of the register path: the same bits either way."""
    T, numel = 12, 3000
    item = torch.tensor([], dtype=dtype).element_size()
    stride = stride_bytes * (numel * item // stride_bytes + 1) // item  # a multiple of stride_bytes, > numel
    buf = torch.randn(T * stride, dtype=torch.float64).to(dtype)
    groups = [[buf[t * stride : t * stride + numel] for t in range(T)]]
    expected = [[t.clone() for t in groups[0]]]
    ops.soft_couple_(groups, 0.37)
    _reference.soft_couple_(expected, 0.37)
    assert_groups_equal(groups, expected)


@needs_extension
def test_python_api_inside_torch_compile():
    """ops.soft_couple_ traced by dynamo takes the torch.ops form (the eager door is not traceable)."""
    groups = make_groups([(8,), (2, 3)], 4, torch.float32, "cpu")
    expected = clone_groups(groups)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(gs):
        ops.soft_couple_(gs, 0.5)

    step(groups)
    _reference.soft_couple_(expected, 0.5)
    assert_groups_equal(groups, expected)


@needs_extension
def test_unboxed_door_equals_torch_ops_call():
    """The eager path (the extension's unboxed call, groups as lists or tuples) and the torch.ops
    call run the same kernel: identical bits, and the door reports that it handled the call."""
    groups = make_groups([(3, 5), (4097,), (0,)], 5, torch.float32, "cpu", seed=3) + [[]]
    via_ops = clone_groups(groups)
    assert _extension.soft_couple_groups([tuple(g) for g in groups], 0.3, "triangular", 2.0, 1) is True
    flat = [t for g in via_ops for t in g]
    torch.ops.itconv_fast.soft_couple_(flat, [len(g) for g in via_ops], 0.3, "triangular", 2.0, 1)
    assert_groups_equal(groups, via_ops)


@pytest.mark.cuda
@needs_extension
def test_groups_on_two_devices_are_coupled_per_device():
    cpu = make_groups([(6,)], 3, torch.float32, "cpu")
    gpu = make_groups([(6,)], 3, torch.float32, "cuda", seed=1)
    assert _extension.soft_couple_groups(cpu + gpu, 0.5, "uniform", None, 0) is False  # did nothing
    expected = clone_groups(cpu + gpu)
    ops.soft_couple_(cpu + gpu, 0.5)
    _reference.soft_couple_(expected, 0.5)
    assert_groups_equal(cpu + gpu, expected)


# --------------------------------------------------------------------------------------------
# Property-based fuzzing
# --------------------------------------------------------------------------------------------


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    T=st.integers(1, 9),
    n_groups=st.integers(0, 3),
    lam=st.floats(0.0, 1.0),
    kernel=st.sampled_from(["uniform", "triangular"]),
    bandwidth=st.one_of(st.none(), st.floats(1.0, 10.0)),
    skip=st.integers(0, 8),
    dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(shape, T, n_groups, lam, kernel, bandwidth, skip, dtype, transpose, seed):
    skip = min(skip, T - 1)
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_groups):
        group = []
        for _ in range(T):
            t = torch.randn(shape, generator=gen).to(dtype)
            if transpose and t.dim() >= 2:
                t = t.transpose(0, -1).contiguous().transpose(0, -1)
            group.append(t)
        groups.append(group)
    expected = clone_groups(groups)
    ops.soft_couple_(groups, lam, kernel=kernel, bandwidth=bandwidth, skip_first=skip)
    _reference.soft_couple_(expected, lam, kernel=kernel, bandwidth=bandwidth, skip_first=skip)
    assert_groups_equal(groups, expected)
