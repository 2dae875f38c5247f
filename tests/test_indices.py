"""The three indices: cached vs reference vs a hand-written loop, and the defining edge cases."""

import math

import pytest
import torch

from itconv_fast.measures.indices import compute_indices, index_flops
from itconv_fast.models import IterResNet


def net(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(num_classes=10, in_channels=1, width=4, blocks=3, stages=2, input_size=8)
    args.update(kw)
    return IterResNet(**args).eval()


def labelled(model, n=96, wrong=20, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10
    return x, y


def hand_errors(model, x, y, s, K):
    """e_conv, e_drop, e_div of stage s written out directly from the public structure."""

    def run(stage_fn):
        with torch.no_grad():
            z = model.stem(x)
            for i, stage in enumerate(model.stages):
                if i > 0:
                    z = model.transitions[i - 1](z)
                if i == s:
                    z = stage_fn(stage, z)
                else:
                    x_i = z
                    for b in stage.blocks:
                        z = (x_i if model.pcr else z) + b.residual(z)
            return (model.head(z).argmax(1) != y).float().mean().item()

    def stage_run(keep, extra=0):
        def fn(stage, x_s):
            z = x_s
            for t, b in enumerate(stage.blocks, start=1):
                if keep(t):
                    z = (x_s if model.pcr else z) + b.residual(z)
            for _ in range(extra):
                z = (x_s if model.pcr else z) + stage.blocks[-1].residual(z)
            return z

        return fn

    T = len(model.stages[s].blocks)
    e_conv = [run(stage_run(lambda t, c=c: t <= c)) for c in range(1, T)]
    e_drop = [run(stage_run(lambda t, d=d: t != d)) for d in range(1, T + 1)]
    e_div = [run(stage_run(lambda t: True, extra=k)) for k in range(1, K + 1)]
    return e_conv, e_drop, e_div


@pytest.mark.parametrize("pcr", [False, True])
@pytest.mark.parametrize("sn_mu", [None, 0.8])
def test_methods_agree_with_each_other_and_a_hand_written_loop(pcr, sn_mu):
    model = net(pcr=pcr, sn_mu=sn_mu)
    x, y = labelled(model)
    K = 5
    cached = compute_indices(model, (x, y), extra_iterations=K, batch_size=40)  # several batches
    reference = compute_indices(model, (x, y), extra_iterations=K, method="reference", batch_size=96)
    assert cached.error == reference.error == pytest.approx(20 / 96)
    for s, (a, b) in enumerate(zip(cached.stages, reference.stages)):
        assert a.e_conv == b.e_conv and a.e_drop == b.e_drop and a.e_div == b.e_div
        e_conv, e_drop, e_div = hand_errors(model, x, y, s, K)
        assert (
            a.e_conv == pytest.approx(e_conv) and a.e_drop == pytest.approx(e_drop) and a.e_div == pytest.approx(e_div)
        )
        assert len(a.e_conv) == 2 and len(a.e_drop) == 3 and len(a.e_div) == K
    assert (cached.ci, cached.ri, cached.di) == (reference.ci, reference.ri, reference.di)


def test_index_formulas_on_the_raw_curves():
    model = net(seed=3)
    x, y = labelled(model, wrong=10)
    r = compute_indices(model, (x, y), extra_iterations=3)
    e_star, e_ch = r.error, r.chance_error
    phi = lambda e: min(1.0, max(0.0, (e - e_star) / (e_ch - e_star)))  # noqa: E731
    for st in r.stages:
        assert st.ci == pytest.approx(1 - sum(map(phi, st.e_conv)) / len(st.e_conv))
        assert st.ri == pytest.approx(
            1 - sum(min(1, abs(e - st.e_drop[-1]) / (e_ch - e_star)) for e in st.e_drop[:-1]) / (len(st.e_drop) - 1)
        )
        assert st.di == pytest.approx(sum(map(phi, st.e_div)) / len(st.e_div))
    assert r.ci == pytest.approx(sum(st.ci for st in r.stages) / len(r.stages))
    assert e_ch == pytest.approx(0.9) and r.n == 96


def test_zero_residuals_give_ci_one_ri_one_di_zero():
    model = net()
    with torch.no_grad():
        for stage in model.stages:
            for b in stage.blocks:
                b.conv2.weight.zero_()
    x, y = labelled(model)
    r = compute_indices(model, (x, y), extra_iterations=4)
    assert (r.ci, r.ri, r.di) == (1.0, 1.0, 0.0)
    for st in r.stages:
        assert all(u == 0 for u in st.relative_update) and st.fixed_point_residual == 0


def test_network_at_chance_gives_nan_with_a_reason():
    model = net()
    x, y = labelled(model, wrong=96)
    r = compute_indices(model, (x, y), extra_iterations=2)
    assert math.isnan(r.ci) and math.isnan(r.ri) and math.isnan(r.di)
    assert any("chance" in note for note in r.notes)
    assert r.to_dict()["ci"] is None  # JSON-ready


def test_single_block_stages_have_undefined_ci_and_ri():
    model = net(blocks=1)
    x, y = labelled(model)
    r = compute_indices(model, (x, y), extra_iterations=2)
    assert math.isnan(r.ci) and math.isnan(r.ri) and not math.isnan(r.di)
    assert any("T = 1" in note for note in r.notes)


def test_custom_error_and_chance_and_iterable_data():
    model = net()
    x, y = labelled(model)
    batches = [(x[:50], y[:50]), (x[50:], y[50:])]
    r = compute_indices(
        model, batches, extra_iterations=2, chance_error=0.95, error_fn=lambda logits, t: logits.argmax(1) != t
    )
    assert r.chance_error == 0.95 and r.n == 96


def test_bad_arguments():
    model = net()
    x, y = labelled(model)
    with pytest.raises(ValueError, match="extra_iterations"):
        compute_indices(model, (x, y), extra_iterations=0)
    with pytest.raises(ValueError, match="no data"):
        compute_indices(model, [], extra_iterations=2)
    with pytest.raises(ValueError, match="method"):
        compute_indices(model, (x, y), method="fast")


def test_flop_count_favours_the_cached_method():
    counts = index_flops(IterResNet(10, 3, width=16, blocks=16, stages=3))
    assert counts["reference_blocks"] == 6816 and counts["cached_blocks"] == 2712
