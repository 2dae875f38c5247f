"""itconv_fast.objectives: each term and its gradient against a direct float64 computation (ICR and PCR, one and
several stages, a ResidualStack), the fixed-point term at an exact fixed point, weight 0 = the plain step bit for
bit, objectives with coupling and spectral normalization, resume, and bad names and values."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from itconv_fast import IterResNet, ResidualStack
from itconv_fast.cli.app import main
from itconv_fast.experiments import training
from itconv_fast.experiments.config import ConfigError, config_from
from itconv_fast.experiments.step import TrainStep
from itconv_fast.nn import GradientCoupler
from itconv_fast.objectives import (
    OBJECTIVES,
    ExtraIterationLoss,
    FixedPointResidual,
    JacobianFrobenius,
    JacobianSpectral,
    ObjectiveContext,
    frozen_batchnorm_statistics,
    make_objective,
    record_stages,
)


def _iter_resnet(pcr=False, stages=1, sn_mu=None, seed=0):
    torch.manual_seed(seed)
    model = IterResNet(
        num_classes=3, in_channels=1, width=2, blocks=2, stages=stages, input_size=4, pcr=pcr, sn_mu=sn_mu
    ).double()
    return model.train()


def _stack(pcr=False):
    torch.manual_seed(1)
    f = [[nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double() for _ in range(2)] for _ in range(2)]
    return ResidualStack(
        stem=nn.Linear(2, 3).double(),
        stages=f,
        head=nn.Linear(3, 2).double(),
        transitions=[nn.Linear(3, 3).double()],
        pcr=pcr,
    ).train()


MODELS = {
    "icr-1stage": lambda: _iter_resnet(),
    "pcr-1stage": lambda: _iter_resnet(pcr=True),
    "icr-2stages": lambda: _iter_resnet(stages=2),
    "pcr-2stages": lambda: _iter_resnet(pcr=True, stages=2),
    "stack": lambda: _stack(),
    "stack-pcr": lambda: _stack(pcr=True),
}


def _data(model):
    gen = torch.Generator().manual_seed(3)
    if isinstance(model, IterResNet):
        return torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2])
    return torch.randn(4, 2, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0])


def _context(model, seed=5):
    x, y = _data(model)
    with record_stages(model) as rec:
        logits = model(x)
    return ObjectiveContext(
        model, rec.inputs, rec.outputs, x, y, nn.functional.cross_entropy, torch.Generator().manual_seed(seed)
    ), logits


def _grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)


def _block_map(stage, z, x_s):
    return (x_s if stage.pcr else z) + stage.blocks[-1].residual(z)


def _assert_grads_close(a, b, rtol=1e-7, atol=1e-10):
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert (ga is None or not ga.any()) and (gb is None or not gb.any())
        else:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fixed_point_term_and_gradient_match_a_direct_computation(kind):
    model = MODELS[kind]()
    context, _ = _context(model)
    term = FixedPointResidual()(context)
    direct = []
    with frozen_batchnorm_statistics(model):
        for stage, x_s, z in zip(model.stages, context.stage_inputs, context.stage_outputs):
            r = _block_map(stage, z, x_s) - z
            direct.append(torch.stack([r[i].pow(2).sum() / z[i].pow(2).sum() for i in range(z.shape[0])]).mean())
    expected = sum(direct) / len(direct)
    torch.testing.assert_close(term.value, expected, rtol=1e-12, atol=0)
    _assert_grads_close(_grads(model, term.value), _grads(model, expected))
    assert set(term.parts) == {f"s{s + 1}" for s in range(len(model.stages))}


@pytest.mark.parametrize("pcr", [False, True])
def test_fixed_point_term_is_zero_at_an_exact_fixed_point(pcr):
    class Zero(nn.Module):
        def forward(self, z):
            return z * 0.0

    model = ResidualStack(
        stem=nn.Linear(2, 3).double(), stages=[[Zero(), Zero()]], head=nn.Linear(3, 2).double(), pcr=pcr
    )
    context, _ = _context(model)
    assert FixedPointResidual()(context).value.item() == 0.0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_jacobian_frobenius_matches_the_materialised_jacobian(kind):
    model = MODELS[kind]()
    context, _ = _context(model, seed=11)
    term = JacobianFrobenius()(context)
    gen = torch.Generator().manual_seed(11)
    direct = []
    with frozen_batchnorm_statistics(model):
        for stage, x_s, z in zip(model.stages, context.stage_inputs, context.stage_outputs):
            eps = torch.randn(z.shape, generator=gen, dtype=z.dtype)
            # J = d R(z, x_s) / d z (x_s held), materialised with its graph to every parameter (through z too).
            jac = torch.autograd.functional.jacobian(lambda v: _block_map(stage, v, x_s), z, create_graph=True)
            jac = jac.reshape(z.numel(), z.numel())
            direct.append((eps.reshape(1, -1) @ jac).pow(2).sum() / z.numel())
    expected = sum(direct) / len(direct)
    torch.testing.assert_close(term.value, expected, rtol=1e-10, atol=0)
    _assert_grads_close(_grads(model, term.value), _grads(model, expected), rtol=1e-8)


@pytest.mark.parametrize("kind", ["icr-1stage", "pcr-2stages", "stack"])
def test_jacobian_spectral_converges_to_the_largest_singular_value(kind):
    model = MODELS[kind]()
    context, _ = _context(model)
    term = JacobianSpectral(rho=0.0, power_steps=1000)(context)
    sigmas = []
    with frozen_batchnorm_statistics(model):
        for stage, x_s, z in zip(model.stages, context.stage_inputs, context.stage_outputs):
            jac = torch.autograd.functional.jacobian(lambda v: _block_map(stage, v, x_s), z, create_graph=True)
            sigmas.append(torch.linalg.matrix_norm(jac.reshape(z.numel(), z.numel()), ord=2))
    for s, exact in enumerate(sigmas):
        assert term.parts[f"sigma_s{s + 1}"] == pytest.approx(exact.item(), rel=1e-6)
    expected = sum(sig.pow(2) for sig in sigmas) / len(sigmas)  # rho = 0: the term is the mean sigma^2
    torch.testing.assert_close(term.value, expected, rtol=1e-6, atol=0)
    _assert_grads_close(_grads(model, term.value), _grads(model, expected), rtol=1e-4, atol=1e-4)


def test_jacobian_spectral_is_zero_below_its_target():
    model = MODELS["icr-1stage"]()
    context, _ = _context(model)
    term = JacobianSpectral(rho=1e6)(context)
    assert term.value.item() == 0.0 and term.parts["sigma_s1"] > 0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_extra_iteration_loss_matches_a_perturbed_forward(kind):
    from itconv_fast.measures.evaluator import forward_with_stage_perturbed

    model = MODELS[kind]()
    context, _ = _context(model, seed=7)
    term = ExtraIterationLoss(k_max=5)(context)
    s, k = term.parts["stage"] - 1, term.parts["k"]
    assert 0 <= s < len(model.stages) and 1 <= k <= 5
    with frozen_batchnorm_statistics(model):
        # The task loss on float32 logits, as the training loop computes it.
        expected = nn.functional.cross_entropy(
            forward_with_stage_perturbed(model, context.x, s, extra=k).float(), context.y
        )
    torch.testing.assert_close(term.value, expected, rtol=1e-6, atol=0)
    _assert_grads_close(_grads(model, term.value), _grads(model, expected), rtol=1e-5, atol=1e-7)


def test_extra_iteration_draws_cover_every_stage_and_k():
    model = MODELS["icr-2stages"]()
    context, _ = _context(model)
    seen = {(p["stage"], p["k"]) for p in (ExtraIterationLoss(k_max=3)(context).parts for _ in range(80))}
    assert seen == {(s, k) for s in (1, 2) for k in (1, 2, 3)}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_leave_batchnorm_statistics_alone(name):
    model = MODELS["icr-2stages"]()
    context, _ = _context(model)
    before = copy.deepcopy(model.state_dict())
    make_objective(name, 1.0, k=3)(context).value.backward()
    after = model.state_dict()
    for key in before:
        if "running" in key or "num_batches" in key:
            assert torch.equal(before[key], after[key]), key


def _steps(objectives, lam=0.0, sn_mu=None, n=4, init="nonrecurrent"):
    torch.manual_seed(0)
    model = IterResNet(
        num_classes=3, in_channels=1, width=4, blocks=3, stages=2, input_size=8, sn_mu=sn_mu, init=init
    ).train()
    from itconv_fast.data import datasets

    class Task:
        loss = staticmethod(nn.functional.cross_entropy)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(
        model,
        Task(),
        optimizer,
        scheduler,
        GradientCoupler(model, lam),
        device=torch.device("cpu"),
        objectives=objectives,
        seed=0,
    )
    gen = torch.Generator().manual_seed(1)
    logged = []
    for _ in range(n):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(3, (8,), generator=gen)
        step(x, y, 0)
        logged.append(dict(step.last_terms))
    assert datasets  # the real tasks are exercised by the training tests below
    return model, logged


def test_weight_zero_gives_the_plain_step_bit_for_bit():
    plain, _ = _steps([])
    zero, logged = _steps([make_objective(name, 0.0, k=3) for name in OBJECTIVES])
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(logged[0]) == set(OBJECTIVES) and all(v >= 0 for v in logged[0].values())


def test_a_positive_weight_changes_the_step():
    plain, _ = _steps([])
    fixed, _ = _steps([FixedPointResidual(1.0)])
    assert not torch.equal(plain.stages[0].blocks[-1].conv2.weight, fixed.stages[0].blocks[-1].conv2.weight)


@pytest.mark.parametrize("sn_mu", [None, 0.9])
def test_objectives_with_full_coupling_keep_blocks_identical(sn_mu):
    model, logged = _steps(
        [make_objective(name, 0.5, k=3) for name in OBJECTIVES], lam=1.0, sn_mu=sn_mu, init="recurrent"
    )
    for stage in model.stages:
        first = dict(stage.blocks[0].named_parameters())
        for block in stage.blocks[1:]:
            for name, p in block.named_parameters():
                assert torch.equal(p, first[name]), name
    assert all(torch.isfinite(torch.tensor(list(entry.values()))).all() for entry in logged)


def test_make_objective_and_bad_values():
    assert make_objective("extra-iterations", 0.5, k=7).k_max == 7
    assert make_objective("jacobian-spectral", 1.0, rho=0.5).rho == 0.5
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        make_objective("nope", 1.0)
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="weight"):
            FixedPointResidual(bad)
    with pytest.raises(ValueError, match="k_max"):
        ExtraIterationLoss(1.0, k_max=0)
    with pytest.raises(ValueError, match="rho"):
        JacobianSpectral(1.0, rho=-1)


def test_record_stages_refuses_what_is_not_a_residual_model():
    with pytest.raises(TypeError, match="not a residual model"):
        with record_stages(nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------------------------------------------
# Configurations, training, CLI


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))


def _config(**kw):
    return config_from(
        "quick",
        train_size=96,
        test_size=32,
        width=4,
        blocks=2,
        batch_size=32,
        epochs=3,
        **{"objectives": {"fixed-point": 0.1, "extra-iterations": 0.2}, "objective_k": 3, **kw},
    )


def test_config_checks_objectives():
    assert _config().objectives == {"extra-iterations": 0.2, "fixed-point": 0.1}
    for bad, match in (
        ({"nope": 1.0}, "nope"),
        ({"fixed-point": -1}, "fixed-point"),
        (["fixed-point"], "mapping"),
        ({"fixed-point": "x"}, "fixed-point"),
    ):
        with pytest.raises(ConfigError, match=match):
            _config(objectives=bad)
    with pytest.raises(ConfigError, match="objective_k"):
        _config(objective_k=0)
    with pytest.raises(ConfigError, match="objective_rho"):
        _config(objective_rho=-0.5)


def test_training_logs_every_term_and_resumes_to_the_same_metrics(tmp_path, cache):
    full = training.train(_config(), str(tmp_path / "full"), progress=False)
    training.train(_config(), str(tmp_path / "part"), progress=False, stop_after_epochs=1)
    resumed = training.train(_config(), str(tmp_path / "part"), resume=True, progress=False)
    assert full["epochs"] == [
        dict(e, seconds=f["seconds"], train_seconds=f["train_seconds"])
        for e, f in zip(resumed["epochs"], full["epochs"])
    ]
    for name in ("fixed-point", "extra-iterations"):
        assert all(e[name] > 0 for e in full["epochs"])
    header = (tmp_path / "full" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["extra-iterations", "fixed-point"]
    events = list((tmp_path / "full" / "tensorboard").iterdir())
    assert events and any(b"objective/fixed-point" in p.read_bytes() for p in events)


def test_cli_objective_flags(tmp_path, cache):
    out = tmp_path / "run"
    args = [
        "train",
        "--epochs",
        "1",
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--width",
        "4",
        "--blocks",
        "2",
        "--batch-size",
        "32",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(
        main, args + ["--objective", "fixed-point:0.1", "--objective", "jacobian-spectral:1", "--objective-rho", "0.8"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["objectives"] == {"fixed-point": 0.1, "jacobian-spectral": 1.0}
    assert metrics["config"]["objective_rho"] == 0.8
    assert "fixed-point" in metrics["epochs"][0] and "jacobian-spectral" in metrics["epochs"][0]


@pytest.mark.parametrize(
    "flag,match",
    [
        (["--objective", "nope:1"], "nope"),
        (["--objective", "fixed-point"], "NAME:WEIGHT"),
        (["--objective", "fixed-point:abc"], "weight"),
        (["--objective", "fixed-point:-1"], "weight"),
        (["--objective", "fixed-point:nan"], "weight"),
        (["--objective", "fixed-point:1", "--objective", "fixed-point:2"], "twice"),
        (["--objective-k", "0"], "--objective-k"),
        (["--objective-rho", "-1"], "--objective-rho"),
    ],
)
def test_cli_bad_objectives_are_usage_errors_and_write_nothing(tmp_path, cache, flag, match):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--epochs", "1", "--train-size", "64", "--test-size", "32", "--out", str(out)] + flag
    )
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not out.exists()


def test_the_configuration_knows_every_objective():
    from itconv_fast.experiments.config import OBJECTIVE_NAMES

    assert tuple(sorted(OBJECTIVES)) == OBJECTIVE_NAMES
