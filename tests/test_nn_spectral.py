"""itconv_fast.nn: spectral_norm on any layer, BatchedSpectralNorm, against materialised operators."""

import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.nn.utils import parametrize

from itconv_fast import lipschitz_report
from itconv_fast import nn as inn
from itconv_fast.measures.lipschitz import circular_exact_sigmas
from itconv_fast.nn import geometry as geo
from itconv_fast.nn import parametrization
from itconv_fast.ops import _extension


def dense_operator(layer: nn.Module, input_size) -> torch.Tensor:
    """The layer's linear map (bias off) as a matrix [out, in], by applying it to every basis vector."""
    with torch.no_grad():
        c_in = layer.in_channels
        n = c_in * math.prod(input_size)
        eye = torch.eye(n, dtype=torch.float64).reshape((n, c_in) + tuple(input_size))
        bias, layer.bias = layer.bias, None
        try:
            out = layer(eye).reshape(n, -1)
        finally:
            layer.bias = bias
        return out.T


def exact_norm(layer, input_size) -> float:
    return torch.linalg.matrix_norm(dense_operator(layer, input_size), ord=2).item()


# (layer, input size): strides 1-2, groups, dilation, every padding form, 1-D / 3-D, transposed.
GEOMETRIES = [
    ("conv2d", lambda: nn.Conv2d(3, 5, 3, padding=1), (6, 7)),
    ("stride2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (7, 6)),
    ("groups", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (8, 8)),
    ("dilation", lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2), (7, 7)),
    ("same-even", lambda: nn.Conv2d(3, 4, 4, padding="same"), (6, 6)),
    ("valid", lambda: nn.Conv2d(3, 4, 3, padding=0), (6, 6)),
    ("circular", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (6, 5)),
    ("circular-stride2", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"), (6, 6)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), (11,)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), (3, 4, 3)),
    ("transpose-stride2", lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 5)),
    ("transpose-groups", lambda: nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2), (4, 5)),
    ("linear", lambda: nn.Linear(7, 5), ()),
]


def converged(layer, n_iter=3000):
    """Runs n_iter more power steps on a parametrized layer (no gradient)."""
    p = layer.parametrizations.weight[0]
    with torch.no_grad():
        p.power_step([layer.parametrizations.weight.original], [p], n_iter)
    return p


@pytest.mark.parametrize("name,make,size", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_operator_sigma_matches_the_materialised_operator(name, make, size):
    torch.manual_seed(0)
    layer = make().double()
    if isinstance(layer, nn.Linear):
        exact = torch.linalg.matrix_norm(layer.weight, ord=2).item()
    else:
        exact = exact_norm(layer, size)
    inn.spectral_norm(layer, mode="operator", input_size=size or None, init_iterations=0)
    p = converged(layer)
    sigma = p.sigmas([layer.parametrizations.weight.original], [p])[0].item()
    assert sigma <= exact * (1 + 1e-12)  # a power iteration approaches from below
    assert sigma == pytest.approx(exact, rel=1e-4)
    # The certified bound is above the true norm (strides and circular padding only lower it).
    g = inn.gram_sigmas(p.geometry, [layer.parametrizations.weight.original], 6).item()
    assert g >= exact * (1 - 1e-9)


@pytest.mark.parametrize("dilation,groups,k", [(1, 1, 3), (2, 1, 3), (1, 2, 3), (1, 1, 5), (1, 1, 7)])
def test_fft_exact_values_for_circular_padding(dilation, groups, k):
    torch.manual_seed(1)
    pad = dilation * (k - 1) // 2
    layer = nn.Conv2d(4, 6, k, padding=pad, dilation=dilation, groups=groups, padding_mode="circular").double()
    size = (5, 6)  # kernel 7 > 5: taps wrap around
    exact = exact_norm(layer, size)
    fft = circular_exact_sigmas(inn.layer_geometry(layer), [layer.weight], size).item()
    assert fft == pytest.approx(exact, rel=1e-10)
    inn.spectral_norm(layer, input_size=size, init_iterations=0)
    p = converged(layer)
    assert p.sigmas([layer.parametrizations.weight.original], [p])[0].item() == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("name,make,size", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("hard", [False, True])
def test_normalised_layer_is_mu_lipschitz(name, make, size, hard):
    torch.manual_seed(2)
    layer = make().double()
    mu = 0.3  # below every layer's norm here: the soft form rescales too
    inn.spectral_norm(layer, mu=mu, hard=hard, input_size=size or None, init_iterations=3000)
    layer.eval()
    if isinstance(layer, nn.Linear):
        norm = torch.linalg.matrix_norm(layer.weight, ord=2).item()
        x, y = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 7, dtype=torch.float64)
    else:
        norm = exact_norm(layer, size)
        x = torch.randn((64, layer.in_channels) + size, dtype=torch.float64)
        y = torch.randn((64, layer.in_channels) + size, dtype=torch.float64)
    assert norm <= mu * (1 + 1e-3)
    if hard:
        assert norm == pytest.approx(mu, rel=1e-3)
    with torch.no_grad():
        ratio = ((layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max().item()
    assert ratio <= mu * (1 + 1e-3)


def test_soft_normalisation_leaves_small_layers_alone():
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    before = layer.weight.detach().clone()
    inn.spectral_norm(layer, mu=100.0, input_size=(6, 6))
    assert torch.equal(layer.weight, before)
    inn_hard = inn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double(), mu=100.0, hard=True, input_size=(6, 6))
    assert not torch.equal(inn_hard.weight, inn_hard.parametrizations.weight.original)


@pytest.mark.parametrize(
    "name,make,size",
    GEOMETRIES[:4] + GEOMETRIES[6:7] + GEOMETRIES[10:],
    ids=[g[0] for g in GEOMETRIES[:4] + GEOMETRIES[6:7] + GEOMETRIES[10:]],
)
@pytest.mark.parametrize("mode", ["operator", "matrix"])
@pytest.mark.parametrize(
    "mu,hard,training", [(0.1, False, True), (100.0, False, True), (0.1, True, True), (0.1, False, False)]
)
@pytest.mark.parametrize("scalar_path", [True, False], ids=["cpu-scalars", "tensor-only"])
def test_gradient_is_that_of_sigma_with_the_vectors_held(
    name, make, size, mode, mu, hard, training, scalar_path, monkeypatch
):
    """d/dW of W / max(sigma/mu, 1) (or W mu / sigma), sigma = <u, A_W v> with this forward's vectors, by
    plain autograd; the layer's own backward is the fused held-vector formula, on its eager-CPU path
    (Python scalars, addr) and on the tensor-only path that CUDA and torch.compile take."""
    if not scalar_path:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(4)
    layer = make().double()
    inn.spectral_norm(layer, mode=mode, mu=mu, hard=hard, input_size=size or None)
    layer.train(training)
    p = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original
    r = torch.randn_like(w)
    (layer.weight * r).sum().backward()  # training mode: one power step, then sigma
    got = w.grad.clone()
    w.grad = None
    u, v = p._u.clone(), p._v.clone()
    if mode == "matrix" or isinstance(layer, nn.Linear):
        sigma = torch.dot(u, geo.as_matrix(p.geometry, w) @ v.reshape(-1))
    else:
        sigma = (u * geo._forward_map(p.geometry, v[None], w)[0]).sum()
    factor = mu / sigma if hard else 1 / torch.clamp(sigma / mu, min=1)
    (w * factor * r).sum().backward()
    torch.testing.assert_close(got, w.grad, rtol=1e-10, atol=1e-12)


def test_one_power_step_per_training_forward_and_none_in_eval():
    torch.manual_seed(5)
    layer = inn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_size=(5, 5), init_iterations=0)
    p = layer.parametrizations.weight[0]
    u0 = p._u.clone()
    _ = layer.weight
    u1 = p._u.clone()
    assert not torch.equal(u0, u1)
    layer.eval()
    _ = layer.weight
    _ = layer.weight
    assert torch.equal(p._u, u1)


def test_matrix_mode_agrees_with_torch_spectral_norm():
    """hard, mu = 1, converged: torch's spectral_norm and ours divide by the same reshaped-kernel norm."""
    torch.manual_seed(6)
    for make in (lambda: nn.Conv2d(3, 5, 3), lambda: nn.ConvTranspose2d(4, 3, 3), lambda: nn.Linear(6, 4)):
        a, b = make().double(), make().double()
        b.load_state_dict(a.state_dict())
        torch.nn.utils.parametrizations.spectral_norm(a, n_power_iterations=1)
        inn.spectral_norm(b, mode="matrix", hard=True, init_iterations=3000)
        for _ in range(3000):
            _ = a.weight  # torch: one step per access in training mode
        a.eval(), b.eval()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-7, atol=1e-9)


def test_input_size_from_the_first_forward_and_a_warning_when_it_changes():
    torch.manual_seed(7)
    layer = inn.spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    p = layer.parametrizations.weight[0]
    assert p._u.numel() == 0
    with pytest.raises(RuntimeError, match="input size of Conv2d is not known"):
        _ = layer.weight
    layer(torch.randn(2, 3, 9, 7))
    assert p.input_size == (9, 7) and tuple(p._u.shape) == (4, 5, 4) and tuple(p._v.shape) == (3, 9, 7)
    with pytest.warns(RuntimeWarning, match=r"now sees inputs of size \(8, 8\)"):
        layer(torch.randn(2, 3, 8, 8))


def test_remove_parametrizations_leaves_the_normalised_weight():
    torch.manual_seed(8)
    layer = inn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mu=0.2, input_size=(6, 6))
    layer.eval()
    normalised = layer.weight.detach().clone()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    assert torch.equal(layer.weight, normalised)
    layer(torch.randn(1, 3, 8, 8))  # the input-size hook is inert once the parametrization is gone


@pytest.mark.parametrize("mode", inn.MODES)
def test_state_dict_round_trip_into_a_fresh_layer_of_unknown_input_size(mode):
    torch.manual_seed(9)
    a = inn.spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), mode=mode, mu=0.5)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(3):
        a(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    if mode != "gram":
        assert set(k for k in state if k.endswith(("_u", "_v"))) == {
            "parametrizations.weight.0._u",
            "parametrizations.weight.0._v",
        }
    b = inn.spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), mode=mode, mu=0.5)
    b.load_state_dict(state)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    if mode == "operator":
        assert b.parametrizations.weight[0].input_size == (9, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", inn.MODES)
def test_half_weights_iterate_in_float32(dtype, mode):
    torch.manual_seed(10)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    half = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    ref.weight.data = half.weight.data.float()
    torch.manual_seed(11)
    inn.spectral_norm(ref, mode=mode, mu=0.2, input_size=(6, 6))
    torch.manual_seed(11)
    inn.spectral_norm(half, mode=mode, mu=0.2, input_size=(6, 6))
    p = half.parametrizations.weight[0]
    if mode != "gram":
        assert p._u.dtype == torch.float32 and p._v.dtype == torch.float32
    w = half.weight
    assert w.dtype == dtype
    torch.testing.assert_close(w.float(), ref.weight, rtol=1e-2, atol=1e-3)
    half.to(dtype)  # model.half() converts buffers: the iteration goes back to float32
    _ = half.weight
    if mode != "gram":
        assert p._u.dtype == torch.float32


def test_operator_path_of_the_extension_equals_the_generic_convolutions(monkeypatch):
    """The paper's convolutions go through the compiled op; the generic grouped-conv path gives the same."""
    if not _extension.loaded():
        pytest.skip("compiled extension not built")
    torch.manual_seed(12)
    layers = [nn.Conv2d(5, 5, 3, padding=1).double() for _ in range(3)]
    geometry = inn.layer_geometry(layers[0])
    assert geometry.extension_operator_path
    u = geo.normalize_rows(torch.randn(3, 5, 6, 6, dtype=torch.float64))
    u_generic = u.clone()
    v, sigma = geo.power_steps(geometry, "operator", [m.weight for m in layers], u, (6, 6), 7)
    monkeypatch.setattr(inn.LayerGeometry, "extension_operator_path", property(lambda self: False))
    v2, sigma2 = geo.power_steps(geometry, "operator", [m.weight for m in layers], u_generic, (6, 6), 7)
    torch.testing.assert_close(sigma, sigma2, rtol=1e-12, atol=0)
    torch.testing.assert_close(v, v2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u, u_generic, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# BatchedSpectralNorm


class SmallNet(nn.Module):
    """Not ours: repeated shapes (batched), a strided conv, a transposed conv, circular padding, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.circ = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in self.body:
            x = x + torch.relu(conv(x))
        x = torch.relu(self.circ(x))
        x = torch.relu(self.up(torch.relu(self.down(x))))
        return self.head(x.mean(dim=(2, 3)))


def _per_layer(model, mode, **kw):
    for name, m in model.named_modules():
        if inn.supported_layer(m):
            inn.spectral_norm(m, mode=mode, name=name, **kw)
    return model


@pytest.mark.parametrize("mode", inn.MODES)
def test_batched_equals_per_layer(mode):
    torch.manual_seed(13)
    state = SmallNet().state_dict()
    a, b = SmallNet(), SmallNet()
    a.load_state_dict(state), b.load_state_dict(state)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(14)
    _per_layer(a, mode, mu=0.7)
    a.eval()
    with torch.no_grad():
        a(x)  # operator mode: the vectors are drawn when each layer first sees its input
    a.train()
    torch.manual_seed(14)
    sn = inn.BatchedSpectralNorm(b, mode=mode, mu=0.7, example_input=x)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (a, b))
    for step in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert sn.groups == [
        ["stem"],
        ["body.0", "body.1", "body.2"],
        ["circ"],
        ["down"],
        ["up"],
        ["head.0", "head.2"],
        ["head.4"],
    ]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_batched_runs_one_call_per_group(monkeypatch):
    torch.manual_seed(15)
    model = SmallNet()
    sn = inn.BatchedSpectralNorm(model, mode="operator", example_input=torch.randn(1, 3, 8, 8))
    calls = []
    real = parametrization.power_steps
    monkeypatch.setattr(parametrization, "power_steps", lambda g, *a, **k: calls.append(g) or real(g, *a, **k))
    model(torch.randn(2, 3, 8, 8))
    assert len(calls) == len(sn.groups) == 7


def test_batched_include_remove_and_errors():
    torch.manual_seed(16)
    model = SmallNet()
    sn = inn.BatchedSpectralNorm(model, mode="matrix", include=lambda name, m: name.startswith("body"))
    assert [n for n, _ in sn.layers] == ["body.0", "body.1", "body.2"]
    assert not parametrize.is_parametrized(model.stem)
    sn.remove()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with pytest.raises(ValueError, match=r"include names no supported layer: \['nope'\]"):
        inn.BatchedSpectralNorm(model, include=["nope"])
    # One bad layer: nothing is parametrized.
    model.body[1] = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="body.1 uses padding_mode='reflect'"):
        inn.BatchedSpectralNorm(model, mode="operator")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    inn.BatchedSpectralNorm(model, mode="matrix")  # matrix mode takes any padding


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(mu=0), "mu must be a finite number > 0 for conv"),
        (dict(mu=float("nan")), "mu must be"),
        (dict(mu=float("inf")), "mu must be"),
        (dict(mu=True), "mu must be"),
        (dict(mode="exact"), "unknown mode 'exact' for conv"),
        (dict(n_power_iterations=0), "n_power_iterations must be an int >= 1 for conv"),
        (dict(hard="yes"), "hard must be True or False"),
        (dict(input_size=(4,)), r"input_size for conv must be 2 sizes"),
        (dict(input_size=(1, 1), module=nn.Conv2d(3, 4, 5)), "conv cannot take inputs of size"),
    ],
)
def test_bad_options_raise_naming_the_layer(bad, match):
    module = bad.pop("module", nn.Conv2d(3, 4, 3, padding=1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        inn.spectral_norm(module, name="conv", **bad)
    assert not parametrize.is_parametrized(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_bad_modules_raise_naming_the_layer():
    with pytest.raises(TypeError, match="features.3 is a BatchNorm2d"):
        inn.spectral_norm(nn.BatchNorm2d(3), name="features.3")
    with pytest.raises(TypeError, match="LazyConv2d"):
        inn.spectral_norm(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match="padding_mode='replicate'; mode 'gram' supports zero and circular"):
        inn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), mode="gram")
    layer = inn.spectral_norm(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="already parametrized"):
        inn.spectral_norm(layer)
    with pytest.raises(TypeError, match="weight must be floating point"):
        inn.spectral_norm(_int_linear())


def _int_linear():
    layer = nn.Linear(3, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 3, dtype=torch.int64), requires_grad=False)
    return layer


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_torch_compile_fullgraph_training_step(mode):
    torch.manual_seed(17)
    model = SmallNet()
    x = torch.randn(2, 3, 8, 8)
    inn.BatchedSpectralNorm(model, mode=mode, mu=0.7, example_input=x)
    reference = SmallNet()
    reference.load_state_dict(model.state_dict(), strict=False)
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The same step in eager mode from the same state.
    model.load_state_dict(state)
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def _ddp_worker(rank, world, port, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = SmallNet()
        model.load_state_dict(state)
        torch.manual_seed(0)  # the same starting vectors on every rank (DDP also broadcasts buffers)
        inn.BatchedSpectralNorm(model, mode="operator", mu=0.7, example_input=torch.zeros(1, 3, 8, 8))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(123)
        for _ in range(3):
            x = torch.randn(4 * world, 3, 8, 8, generator=gen)
            opt.zero_grad()
            ddp(x.chunk(world)[rank]).square().mean().backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (a rare SIGABRT at exit otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path):
    torch.manual_seed(18)
    state = SmallNet().state_dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), state, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert any(k.endswith("._u") for k in s0)
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
    assert not torch.equal(s0["stem.parametrizations.weight.original"], state["stem.weight"])


# ---------------------------------------------------------------------------------------------------
# lipschitz_report


def test_lipschitz_report_values_and_products():
    torch.manual_seed(19)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    ).double()
    model[1].eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    report = lipschitz_report(model, x, power_iterations=3000, gram_iterations=6)
    rows = {r.name: r for r in report.layers}
    assert [r.name for r in report.layers] == ["0", "1", "3", "5", "7"]
    assert rows["0"].input_size == (6, 6) and rows["5"].input_size == (6, 6)
    for name, size in (("0", (6, 6)), ("3", (6, 6)), ("5", (6, 6))):
        exact = exact_norm(model[int(name)], size)
        assert rows[name].operator == pytest.approx(exact, rel=1e-4)
        assert rows[name].gram >= exact * (1 - 1e-9)
        assert rows[name].matrix == pytest.approx(
            torch.linalg.matrix_norm(model[int(name)].weight.reshape(6, -1), ord=2).item(), rel=1e-10
        )
    assert rows["3"].exact == pytest.approx(exact_norm(model[3], (6, 6)), rel=1e-10)
    assert rows["0"].exact is None
    bn = model[1]
    assert rows["1"].operator == pytest.approx((bn.weight / (bn.running_var + bn.eps).sqrt()).abs().max().item())
    assert report.product_operator == pytest.approx(math.prod(r.operator for r in report.layers))
    assert report.product_gram >= report.product_operator
    text = report.table()
    assert "exact (FFT)" in text and text.splitlines()[-1].startswith("product")
    assert report.to_dict()["layers"][0]["name"] == "0"


def test_lipschitz_report_measures_normalised_weights():
    torch.manual_seed(20)
    model = SmallNet()
    x = torch.randn(1, 3, 8, 8)
    inn.BatchedSpectralNorm(model, mode="operator", mu=0.5, hard=True, init_iterations=500, example_input=x)
    model.eval()
    report = lipschitz_report(model, x, power_iterations=500, gram=False)
    for row in report.layers:
        assert row.operator == pytest.approx(0.5, rel=2e-3), row.name
        assert row.gram is None


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_lipschitz_report_flags_a_lagging_power_vector_and_converging_it_holds_the_bound(mode):
    """A weight that moves faster than its power vector (a big SGD step) leaves the stored vectors behind: the
    normalised weight's norm exceeds mu. lipschitz_report names the layer; converge_power_vectors restores it."""
    torch.manual_seed(21)
    model = SmallNet()
    x = torch.randn(1, 3, 8, 8)
    inn.BatchedSpectralNorm(model, mode=mode, mu=1.0, hard=True, init_iterations=200, example_input=x)
    model.eval()
    report = lipschitz_report(model, x, power_iterations=300, gram=False)
    assert report.unheld_bounds == [] and all(r.bound == 1.0 and r.bound_held for r in report.layers if r.bound)
    conv = model.stem
    with torch.no_grad():  # a step that moves the weight along a new direction, as a large SGD step does
        original = conv.parametrizations.weight.original
        original.add_(3 * torch.randn_like(original))
    report = lipschitz_report(model, x, power_iterations=300, gram=False)
    assert [r.name for r in report.unheld_bounds] == ["stem"]
    assert "stem: norm" in report.table() and "converge_power_vectors" in report.table()
    assert report.to_dict()["unheld_bounds"] == ["stem"] and "**Warning:**" in report.to_markdown()
    assert inn.converge_power_vectors(model, steps=300) == len(report.layers)
    report = lipschitz_report(model, x, power_iterations=300, gram=False)
    assert report.unheld_bounds == []
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        inn.converge_power_vectors(model, steps=0)


def test_lipschitz_cli_on_a_script_and_on_bad_input(tmp_path):
    from click.testing import CliRunner

    from cli.app import main

    script = tmp_path / "net.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode='circular'), nn.ReLU(),\n"
        "                      nn.Flatten(), nn.Linear(4 * 6 * 6, 2))\n"
        "def example_input():\n    return torch.randn(1, 3, 6, 6)\n"
    )
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["lipschitz", str(script), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "exact (FFT)" in result.output and "product" in result.output
    assert out.exists()
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('boom')\n")
    result = CliRunner().invoke(main, ["lipschitz", str(broken)])
    assert result.exit_code == 1 and "broken.py: the script raised ValueError: boom" in result.output
    failing = tmp_path / "failing.py"
    failing.write_text("def build_model():\n    raise RuntimeError('no weights')\n")
    result = CliRunner().invoke(main, ["lipschitz", str(failing)])
    assert result.exit_code == 1 and "failing.py: the script raised RuntimeError: no weights" in result.output
    assert "Traceback" not in result.output
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = CliRunner().invoke(main, ["lipschitz", str(empty)])
    assert result.exit_code == 2 and "defines neither `model`" in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, ["lipschitz", str(junk)])
    assert result.exit_code == 2 and "junk.pt" in result.output and "Traceback" not in result.output


def test_zoo_resnets_have_torchvisions_shapes():
    """Parameter counts of torchvision's resnet18 / resnet50 (11,689,512 / 25,557,032), convs 20 / 53."""
    from itconv_fast.models import zoo

    for build, params, convs in ((zoo.resnet18, 11_689_512, 20), (zoo.resnet50, 25_557_032, 53)):
        model = build()
        assert sum(p.numel() for p in model.parameters()) == params
        assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    model = zoo.resnet18(num_classes=10, width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lipschitz_cli_on_a_training_checkpoint(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli.app import main

    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(run),
        "--train-size",
        "32",
        "--test-size",
        "16",
        "--width",
        "2",
        "--blocks",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, ["lipschitz", str(run), "--power-iterations", "20", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| layer |") and any(line.startswith("| stem |") for line in lines)
    assert any("stages.0.blocks.1.conv2" in line for line in lines) and lines[-1].startswith("| product |")
