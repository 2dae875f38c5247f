"""Adaptive depth: tau = 0 is the full network bit for bit, a huge tau one block a stage, and the batched
halting equals one example at a time."""

import pytest
import torch
from torch import nn

from itconv_fast.measures import AdaptiveDepthReport, adaptive_depth_report
from itconv_fast.measures.adaptive_depth import ERROR_MARGIN, adaptive_forward
from itconv_fast.measures.thinking_longer import forward_with_extra_iterations
from itconv_fast.models import IterResNet, ResidualStack


def net(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(num_classes=10, in_channels=1, width=4, blocks=3, stages=2, input_size=8)
    args.update(kw)
    return IterResNet(**args).eval().double()


def stack():
    torch.manual_seed(3)
    f = [[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)] for _ in range(2)]
    return ResidualStack(nn.Linear(5, 6), f, nn.Linear(6, 10), transitions=[nn.Linear(6, 6)]).eval().double()


def inputs(model, n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model, ResidualStack) else (n, 1, 8, 8)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, 10, (n,), generator=gen)


MODELS = {"icr": lambda: net(), "pcr-sn": lambda: net(pcr=True, sn_mu=0.8), "stack": stack}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tau_zero_is_the_full_network_bit_for_bit(name):
    model = MODELS[name]()
    x, _ = inputs(model)
    with torch.no_grad():
        logits, blocks = adaptive_forward(model, x, 0.0)
        assert torch.equal(logits, model(x)) and torch.equal(blocks, torch.full((24,), 6))
        logits, blocks = adaptive_forward(model, x, 0.0, extra_iterations=2)
        assert torch.equal(logits, forward_with_extra_iterations(model, x, 2)) and bool((blocks == 10).all())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_huge_tau_runs_one_block_a_stage(name):
    model = MODELS[name]()
    x, _ = inputs(model)
    with torch.no_grad():
        logits, blocks = adaptive_forward(model, x, 1e30, extra_iterations=3)
        z = model.stem(x)
        for s, stage in enumerate(model.stages):
            if s > 0:
                z = model.transitions[s - 1](z)
            z = z + stage.blocks[0].residual(z)  # the first block: z = x_s, PCR or not
        assert torch.equal(blocks, torch.full((24,), 2)) and torch.allclose(logits, model.head(z), atol=1e-12)


def one_at_a_time(model, x, tau, K):
    """Each example alone, its halting written out: the definition the batched pass must meet."""
    logits, counts = [], []
    for i in range(x.shape[0]):
        z, count = model.stem(x[i : i + 1]), 0
        for s, stage in enumerate(model.stages):
            if s > 0:
                z = model.transitions[s - 1](z)
            x_s, T = z, len(stage.blocks)
            for t in range(1, T + K + 1):
                new = (x_s if stage.pcr else z) + stage.blocks[min(t, T) - 1].residual(z)
                count += 1
                done = float((new - z).norm()) < tau * float(z.norm())
                z = new
                if done:
                    break
        logits.append(model.head(z))
        counts.append(count)
    return torch.cat(logits), torch.tensor(counts)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_halting_equals_one_example_at_a_time(name):
    model = MODELS[name]()
    x, _ = inputs(model)
    with torch.no_grad():
        # A tau inside the spread of the first stage's relative updates, so that examples halt at different blocks.
        stage = model.stages[0]
        z = x_s = model.stem(x)
        updates = []
        for t in range(1, 6):
            new = (x_s if stage.pcr else z) + stage.blocks[min(t, 3) - 1].residual(z)
            updates.append((new - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1))
            z = new
        candidates = torch.cat(updates).quantile(torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64))
        tau = max(candidates.tolist(), key=lambda c: len(set(adaptive_forward(model, x, c, 2)[1].tolist())))
        logits, blocks = adaptive_forward(model, x, tau, extra_iterations=2)
        expected, counts = one_at_a_time(model, x, tau, 2)
    assert torch.equal(blocks, counts) and len(set(blocks.tolist())) > 1
    assert torch.allclose(logits, expected, atol=1e-10)


def test_the_report_and_its_compute_saved():
    model = net(pcr=True, sn_mu=0.5)
    x, y = inputs(model, n=40)
    with torch.no_grad():
        y = model(x).argmax(1)
    report = adaptive_depth_report(model, (x, y), taus=[0.0, 1e30], batch_size=16)
    assert isinstance(report, AdaptiveDepthReport) and report.full_error == 0.0 and report.full_blocks == 6
    assert report.errors[0] == 0.0 and report.mean_blocks == [6.0, 2.0]
    saved = report.compute_saved
    assert saved == (1 - 2 / 6 if report.errors[1] <= ERROR_MARGIN else 0.0)
    assert report.to_dict()["compute_saved"] == saved
    assert report.full_seconds > 0 and len(report.seconds) == 2 and all(t > 0 for t in report.seconds)
    made_up = AdaptiveDepthReport([0.1, 0.2], [0.104, 0.2], [3.0, 1.0], 0.1, 6, 0, 10, [1.0, 1.0], 1.0)
    assert made_up.compute_saved == pytest.approx(0.5)  # only tau 0.1 is within half a point


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"taus": [-0.1]}, "tau"),
        ({"taus": [float("inf")]}, "tau"),
        ({"taus": []}, "empty"),
        ({"extra_iterations": -1}, "extra_iterations"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        adaptive_depth_report(model, inputs(model, n=4), **kw)
