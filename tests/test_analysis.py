"""Refinement measures, anytime inference and convergence traces (itconv_fast.measures.analysis), each pinned against
a direct computation that perturbs one block at a time, in float64."""

import math

import pytest
import torch

from itconv_fast.measures import plot_analysis
from itconv_fast.measures.analysis import MEASURES, analyze
from itconv_fast.measures.indices import compute_indices
from itconv_fast.models import IterResNet

K = 4


def net(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(num_classes=10, in_channels=1, width=4, blocks=3, stages=2, input_size=8)
    args.update(kw)
    return IterResNet(**args).double().eval()


def data(model, n=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: n // 4] = (y[: n // 4] + 1) % 10
    return x, y


def step(model, stage, t, z, x_s):
    return (x_s if model.pcr else z) + stage.blocks[t].residual(z)


def forward(model, x, s=None, stage_fn=None):
    """Logits with stage s replaced by stage_fn(stage, x_s) -> z (the rest unchanged)."""
    z = model.stem(x)
    for i, stage in enumerate(model.stages):
        if i > 0:
            z = model.transitions[i - 1](z)
        if i == s:
            z = stage_fn(stage, z)
        else:
            x_i = z
            for t in range(len(stage.blocks)):
                z = step(model, stage, t, z, x_i)
    return model.head(z)


def loss_err(logits, y):
    return (torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) != y).double().mean().item())


@pytest.fixture(scope="module", params=[False, True], ids=["icr", "pcr"])
def case(request):
    model = net(pcr=request.param, sn_mu=0.9 if request.param else None)
    x, y = data(model)
    return model, x, y, analyze(model, (x, y), extra_iterations=K, batch_size=20)


def test_indices_are_those_of_compute_indices(case):
    model, x, y, report = case
    plain = compute_indices(model, (x, y), extra_iterations=K, batch_size=20)
    assert report.indices.to_dict() == plain.to_dict()


def test_drop_and_twice_against_direct_forwards(case):
    model, x, y, report = case
    with torch.no_grad():
        for s, stage in enumerate(model.stages):
            T = len(stage.blocks)
            for t in range(T):

                def drop(stage, x_s, t=t):
                    z = x_s
                    for u in range(T):
                        if u != t:
                            z = step(model, stage, u, z, x_s)
                    return z

                def twice(stage, x_s, t=t):
                    z = x_s
                    for u in range(T):
                        z = step(model, stage, u, z, x_s)
                        if u == t:
                            z = step(model, stage, u, z, x_s)
                    return z

                block = report.stages[s].refinement[t]
                assert (block.drop_loss, block.drop_error) == pytest.approx(
                    loss_err(forward(model, x, s, drop), y), rel=1e-9
                )
                assert (block.twice_loss, block.twice_error) == pytest.approx(
                    loss_err(forward(model, x, s, twice), y), rel=1e-9
                )


def test_cosines_and_ratios_against_one_backward_per_block(case):
    model, x, y, report = case
    for s, stage in enumerate(model.stages):
        T = len(stage.blocks)
        for t in range(T):
            with torch.no_grad():
                # z_{t-1} and x_s of the unperturbed run
                z = model.stem(x)
                for i in range(s):
                    x_i = z
                    for u in range(T):
                        z = step(model, model.stages[i], u, z, x_i)
                    z = model.transitions[i](z)
                x_s = z
                for u in range(t):
                    z = step(model, stage, u, z, x_s)
            leaf = z.clone().requires_grad_(True)

            def rest(stage_unused, x_s_unused):
                zz = leaf
                for u in range(t, T):
                    zz = step(model, stage, u, zz, x_s)
                return zz

            # The rest of the network from z_{t-1}: x_s held fixed (it is upstream of z_{t-1}).
            out = rest(None, None)
            for i in range(s + 1, len(model.stages)):
                x_i = model.transitions[i - 1](out)
                out = x_i
                for u in range(T):
                    out = step(model, model.stages[i], u, out, x_i)
            loss = torch.nn.functional.cross_entropy(model.head(out), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaf)
            with torch.no_grad():
                delta = (step(model, stage, t, leaf, x_s) - leaf).flatten(1)
                g = -grad.flatten(1)
                cos = (delta * g).sum(1) / (delta.norm(dim=1) * g.norm(dim=1))
                ratio = delta.norm(dim=1) / leaf.flatten(1).norm(dim=1)
            block = report.stages[s].refinement[t]
            assert block.cosine_mean == pytest.approx(cos.mean().item(), rel=1e-9, abs=1e-12)
            assert block.ratio_mean == pytest.approx(ratio.mean().item(), rel=1e-9)
            assert block.cosine_quartiles[1] == pytest.approx(
                cos.median().item() if len(cos) % 2 else torch.quantile(cos, 0.5).item(), rel=1e-9, abs=1e-12
            )
            assert torch.allclose(report.per_example[(s, f"cosine_block{t + 1}")], cos, rtol=1e-9, atol=1e-12)


def test_anytime_curves_against_direct_forwards(case):
    model, x, y, report = case
    T = len(model.stages[0].blocks)

    def run_k(stage, x_s, k):
        z = x_s
        for i in range(k):
            z = step(model, stage, min(i, T - 1), z, x_s)
        return z

    with torch.no_grad():
        for s in range(len(model.stages)):
            direct = [
                loss_err(forward(model, x, s, lambda st, xs, k=k: run_k(st, xs, k)), y) for k in range(1, T + K + 1)
            ]
            assert report.stages[s].anytime_loss == pytest.approx([d[0] for d in direct], rel=1e-9)
            assert report.stages[s].anytime_error == pytest.approx([d[1] for d in direct])
        for k in range(1, T + K + 1):
            z = model.stem(x)
            for i, stage in enumerate(model.stages):
                if i > 0:
                    z = model.transitions[i - 1](z)
                z = run_k(stage, z, k)
            loss, err = loss_err(model.head(z), y)
            assert report.anytime_all_loss[k - 1] == pytest.approx(loss, rel=1e-9)
            assert report.anytime_all_error[k - 1] == pytest.approx(err)
    assert report.stages[0].anytime_error[T - 1] == pytest.approx(report.indices.error)


def test_traces_against_direct_extra_iterations(case):
    model, x, y, report = case
    T = len(model.stages[0].blocks)
    with torch.no_grad():
        z = model.stem(x)
        for s, stage in enumerate(model.stages):
            if s > 0:
                z = model.transitions[s - 1](z)
            x_s = z
            for t in range(T):
                z = step(model, stage, t, z, x_s)
            zs = [z]
            for _ in range(K + 1):
                zs.append(step(model, stage, T - 1, zs[-1], x_s))
            residual = torch.stack(
                [(b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1) for a, b in zip(zs, zs[1:])], 1
            )
            assert torch.allclose(report.per_example[(s, "fixed_point_residual")], residual, rtol=1e-9)
            trace = report.stages[s].trace
            assert trace["fixed_point_residual"]["median"] == pytest.approx(
                residual.median(0).values.tolist() if len(x) % 2 else torch.quantile(residual, 0.5, dim=0).tolist(),
                rel=1e-9,
            )
            assert trace["relative_update"]["share_below"] == pytest.approx(
                (residual[:, :K] < 0.05).double().mean(0).tolist()
            )
            assert ("contraction" in trace) == model.pcr


def test_zero_residual_functions_give_zero_cosine_zero_ratio_flat_anytime():
    model = net()
    with torch.no_grad():
        for stage in model.stages:
            for block in stage.blocks:
                block.conv2.weight.zero_()
    x, y = data(model)
    report = analyze(model, (x, y), extra_iterations=K)
    for st in report.stages:
        for block in st.refinement:
            assert block.cosine_mean == 0 and block.cosine_quartiles == [0, 0, 0]
            assert block.ratio_mean == 0
        assert len(set(st.anytime_error)) == 1 and max(st.anytime_loss) - min(st.anytime_loss) < 1e-12
        assert st.trace["fixed_point_residual"]["median"] == [0.0] * (K + 1)
    assert len(set(report.anytime_all_error)) == 1


def test_pcr_with_mu_half_contracts_at_least_geometrically():
    # Gram mode: a certified bound, so L(f~) <= 0.5 holds exactly, not only up to the power iteration's accuracy.
    model = net(pcr=True, sn_mu=0.5, sn_mode="gram", blocks=2)
    x, y = data(model)
    report = analyze(model, (x, y), extra_iterations=6, measures=("traces",))
    for s, st in enumerate(report.stages):
        factor = report.per_example[(s, "contraction")]
        assert factor.max() <= 0.5 * (1 + 1e-9)
        steps = report.per_example[(s, "step_norm")]  # ||R(z_{T+k}) - z_{T+k}||, k = 0..6
        for k in range(1, steps.shape[1]):
            assert (steps[:, k] <= 0.5**k * steps[:, 0] * (1 + 1e-9)).all()
        assert st.trace["contraction"]["lipschitz_bound"] == 0.5
        assert max(st.trace["contraction"]["max"]) <= 0.5 * (1 + 1e-9)


def test_weight_shared_network_at_k_equal_T_has_its_normal_error():
    model = net(init="recurrent", blocks=4)  # every block of a stage identical: a lam = 1 network
    x, y = data(model)
    report = analyze(model, (x, y), extra_iterations=K, measures=("anytime",))
    with torch.no_grad():
        err = (model(x).argmax(1) != y).double().mean().item()
    for st in report.stages:
        assert st.anytime_error[3] == pytest.approx(err)
    assert report.anytime_all_error[3] == pytest.approx(err)
    # Drop-out of any block of a weight-shared stage is the same perturbation: the refinement row is flat.
    full = analyze(model, (x, y), extra_iterations=K, measures=("refinement",))
    for st in full.stages:
        assert len({round(b.drop_loss, 12) for b in st.refinement}) == 1


def test_selected_measures_and_bad_arguments(tmp_path):
    model = net()
    x, y = data(model)
    only = analyze(model, (x, y), extra_iterations=2, measures=("indices",))
    assert only.stages[0].refinement == [] and only.anytime_all_error == [] and only.stages[0].trace == {}
    for bad in (dict(measures=("speed",)), dict(extra_iterations=0), dict(threshold=math.nan), dict(batch_size=0)):
        with pytest.raises(ValueError):
            analyze(model, (x, y), **bad)
    report = analyze(model, (x, y), extra_iterations=2, measures="all")
    assert report.measures == MEASURES and set(report.to_dict()) >= {"indices", "stages", "anytime_all_error"}
    plot_analysis(report, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_measures_all_writes_analysis_and_a_figure(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    tiny = [
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--width",
        "2",
        "--blocks",
        "2",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert CliRunner().invoke(main, ["train", "--out", str(out)] + tiny).exit_code == 0
    plot = tmp_path / "all.png"
    result = CliRunner().invoke(
        main, ["indices", str(out), "--measures", "all", "--extra-iterations", "3", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    indices = json.loads((out / "indices.json").read_text())
    assert analysis["indices"] == indices and analysis["measures"] == list(MEASURES)
    assert len(analysis["stages"][0]["anytime_error"]) == 2 + 3 and len(analysis["anytime_all_loss"]) == 5
    assert plot.read_bytes()[:4] == b"\x89PNG" and "cos(update, -grad)" in result.output
    bad = CliRunner().invoke(main, ["indices", str(out), "--measures", "indices,speed"])
    assert bad.exit_code == 2 and "speed" in bad.output
    bad = CliRunner().invoke(main, ["indices", str(out), "--measures", "traces", "--method", "reference"])
    assert bad.exit_code == 2
