"""Adaptive depth: tau = 0 is the full network bit for bit, a huge tau one block a stage, the batched halting (by
the update, the read-out's confidence or its agreement) equals one example at a time, and the FLOPs count."""

import pytest
import torch
from torch import nn

from itconv_fast.data import digitclutter
from itconv_fast.measures import AdaptiveDepthReport, adaptive_depth_report
from itconv_fast.measures.adaptive_depth import ERROR_MARGIN, HaltingCurve, adaptive_forward, network_flops
from itconv_fast.measures.evaluator import stage_output
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


MODELS = {
    "icr": lambda: net(),
    "pcr-sn": lambda: net(pcr=True, sn_mu=0.8),
    "weight-shared": lambda: net(init="recurrent"),  # lam = 1's network: every block of a stage the same
    "stack": stack,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tau_zero_is_the_full_network_bit_for_bit(name):
    model = MODELS[name]()
    x, _ = inputs(model)
    with torch.no_grad():
        logits, blocks = adaptive_forward(model, x, 0.0)
        assert torch.equal(logits, model(x)) and torch.equal(blocks, torch.full((24, 2), 3))
        logits, blocks = adaptive_forward(model, x, 0.0, extra_iterations=2)
        assert torch.equal(logits, forward_with_extra_iterations(model, x, 2)) and bool((blocks == 5).all())
        # The read-out rules at levels nothing reaches: the network as trained, K extra blocks in the last stage.
        for rule, level in (("confidence", 2.0), ("agreement", 99)):
            logits, blocks = adaptive_forward(model, x, level, rule=rule)
            assert torch.equal(logits, model(x)) and torch.equal(blocks, torch.full((24, 2), 3))
            logits, blocks = adaptive_forward(model, x, level, 2, rule=rule)
            assert torch.equal(blocks, torch.tensor([[3, 5]]).expand(24, 2))


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
        assert torch.equal(blocks, torch.ones(24, 2, dtype=torch.long))
        assert torch.allclose(logits, model.head(z), atol=1e-12)


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
        tau = max(candidates.tolist(), key=lambda c: len(set(adaptive_forward(model, x, c, 2)[1].sum(1).tolist())))
        logits, blocks = adaptive_forward(model, x, tau, extra_iterations=2)
        expected, counts = one_at_a_time(model, x, tau, 2)
    assert torch.equal(blocks.sum(1), counts) and len(set(counts.tolist())) > 1
    assert torch.allclose(logits, expected, atol=1e-10)


def readout_one_at_a_time(model, x, rule, level, K, confidence_fn, decision_fn):
    """Each example alone: the earlier stages as trained, the last stage read out after every block."""
    logits, counts = [], []
    for i in range(x.shape[0]):
        z = model.stem(x[i : i + 1])
        for s, stage in enumerate(model.stages):
            if s > 0:
                z = model.transitions[s - 1](z)
            x_s, T = z, len(stage.blocks)
            last = T + K if s == len(model.stages) - 1 else T
            decisions = []
            for t in range(1, last + 1):
                z = (x_s if stage.pcr else z) + stage.blocks[min(t, T) - 1].residual(z)
                if s < len(model.stages) - 1:
                    continue
                out = model.head(z)
                decisions.append(decision_fn(out))
                agreed = rule == "agreement" and len(decisions) > level
                agreed = agreed and all(torch.equal(d, decisions[-1]) for d in decisions[-level - 1 :])
                if (rule == "confidence" and float(confidence_fn(out)) >= level) or (rule == "agreement" and agreed):
                    break
        logits.append(model.head(z))
        counts.append(t)
    return torch.cat(logits), torch.tensor(counts)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rule", ["confidence", "agreement"])
@pytest.mark.parametrize("labels", ["classes", "digit sets"])
def test_readout_halting_equals_one_example_at_a_time(name, rule, labels):
    model = MODELS[name]()
    x, _ = inputs(model, n=32)
    if labels == "classes":
        confidence_fn, decision_fn = None, None
        reference = (lambda o: o.softmax(1).amax(1)), (lambda o: o.argmax(1))
    else:  # Digitclutter's: the probability of the 3 highest outputs as a set, and that set
        confidence_fn = lambda o: digitclutter.set_confidence(o, 3)  # noqa: E731
        decision_fn = lambda o: digitclutter.top_set(o, 3)  # noqa: E731
        reference = confidence_fn, decision_fn
    with torch.no_grad():
        if rule == "confidence":  # the median confidence of the last stage's read-outs: examples halt apart
            z = model.stem(x)
            for s, stage in enumerate(model.stages[:-1]):
                z = stage_output(stage, z if s == 0 else model.transitions[s - 1](z))
            z = x_s = model.transitions[-1](z)
            stage, seen = model.stages[-1], []
            for t in range(1, 7):
                z = (x_s if stage.pcr else z) + stage.blocks[min(t, 3) - 1].residual(z)
                seen.append(reference[0](model.head(z)))
            ranked = torch.cat(seen).sort().values  # between two values: no example sits on the level
            level = float(ranked[len(ranked) // 2 : len(ranked) // 2 + 2].mean())
        else:
            level = 1
        logits, blocks = adaptive_forward(
            model, x, level, 3, rule=rule, confidence_fn=confidence_fn, decision_fn=decision_fn
        )
        expected, counts = readout_one_at_a_time(model, x, rule, level, 3, *reference)
    assert torch.equal(blocks[:, :-1], torch.full((32, 1), 3))  # the earlier stage as trained
    assert torch.equal(blocks[:, -1], counts)
    assert torch.allclose(logits, expected, atol=1e-10)
    if rule == "confidence":
        assert len(set(counts.tolist())) > 1


def test_set_confidence_is_the_probability_of_the_predicted_set():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)[0]
    assert torch.equal(digitclutter.top_set(logits, 2), torch.tensor([[True, False, False, True]]))
    expected = p[0] * p[3] * (1 - p[1]) * (1 - p[2])
    assert torch.allclose(digitclutter.set_confidence(logits, 2), expected.view(1))


def test_network_flops_count_the_convolutions_and_the_head():
    model = net(width=4, blocks=3, stages=2, input_size=8)
    x, _ = inputs(model, n=2)
    flops = network_flops(model, x)
    conv = lambda c_in, c_out, side: 2 * c_in * c_out * 9 * side * side  # noqa: E731
    assert flops["per_block"] == [2 * conv(4, 4, 8), 2 * conv(8, 8, 4)]
    head = 2 * 8 * 10
    assert flops["readout"] == head
    assert flops["fixed"] == conv(1, 4, 8) + conv(4, 8, 4) + head


def test_the_report_and_its_compute_saved():
    model = net(pcr=True, sn_mu=0.5)
    x, y = inputs(model, n=40)
    with torch.no_grad():
        y = model(x).argmax(1)
    report = adaptive_depth_report(model, (x, y), taus=[0.0, 1e30], confidences=[], agreements=[1], batch_size=16)
    assert isinstance(report, AdaptiveDepthReport) and report.full_error == 0.0 and report.full_blocks == 6
    update = report.curve("update")
    assert [c.rule for c in report.curves] == ["update", "agreement"]
    assert update.errors[0] == 0.0 and update.mean_blocks == [6.0, 2.0]
    flops = network_flops(model, x)
    assert report.full_flops == flops["fixed"] + 3 * sum(flops["per_block"])
    assert update.mean_flops == [report.full_flops, flops["fixed"] + sum(flops["per_block"])]
    saved = report.compute_saved_by("update")
    assert saved == pytest.approx(
        1 - update.mean_flops[1] / report.full_flops if update.errors[1] <= ERROR_MARGIN else 0
    )
    assert report.compute_saved == max(saved, report.compute_saved_by("agreement"))
    assert report.to_dict()["compute_saved_by_rule"]["update"] == saved
    assert report.full_seconds > 0 and len(update.seconds) == 2 and all(t > 0 for t in update.seconds)
    made_up = AdaptiveDepthReport(
        [HaltingCurve("update", [0.1, 0.2], [0.104, 0.2], [3.0, 1.0], [50.0, 20.0], [1.0, 1.0])],
        0.1, 6, 100.0, 1.0, 0, 10,
    )  # fmt: skip
    assert made_up.compute_saved == pytest.approx(0.5)  # only tau 0.1 is within half a point


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"taus": [-0.1]}, "tau"),
        ({"taus": [float("inf")]}, "tau"),
        ({"taus": [], "confidences": [], "agreements": []}, "no levels"),
        ({"agreements": [0]}, "agreement"),
        ({"agreements": [1.5]}, "agreement"),
        ({"confidences": [float("nan")]}, "confidence"),
        ({"extra_iterations": -1}, "extra_iterations"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        adaptive_depth_report(model, inputs(model, n=4), **kw)
