"""The paper's ResNet: structure contract, initialisation, spectral bounds, state dicts."""

import copy

import pytest
import torch

from itconv_fast import GradientCoupler
from itconv_fast.models import IterResNet, load_checkpoint


def small(**kw):
    args = dict(num_classes=10, in_channels=1, width=4, blocks=3, stages=3, input_size=16)
    args.update(kw)
    return IterResNet(**args)


def by_hand(model, x):
    z = model.stem(x)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        x_s = z
        for block in stage.blocks:
            z = (x_s if model.pcr else z) + block.residual(z)
    return model.head(z)


@pytest.mark.parametrize("pcr", [False, True])
@pytest.mark.parametrize("sn_mu", [None, 0.9])
def test_structure_contract_and_forward_equals_hand_run(pcr, sn_mu):
    torch.manual_seed(0)
    model = small(pcr=pcr, sn_mu=sn_mu).eval()
    assert model.pcr is pcr
    assert isinstance(model.stem, torch.nn.Conv2d) and model.stem.in_channels == 1
    assert len(model.stages) == 3 and len(model.transitions) == 2
    for s, stage in enumerate(model.stages):
        assert len(stage.blocks) == 3
        for block in stage.blocks:
            for name in ("bn1", "conv1", "bn2", "conv2"):
                assert hasattr(block, name)
            assert block.conv1.weight.shape == (4 * 2**s, 4 * 2**s, 3, 3)
    assert model.head[-1].out_features == 10
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(model, x), rtol=1e-5, atol=1e-6)


def test_recurrent_init_gives_identical_blocks_and_nonrecurrent_does_not():
    rec = small(init="recurrent")
    for stage in rec.stages:
        first = dict(stage.blocks[0].named_parameters())
        for block in stage.blocks[1:]:
            assert all(torch.equal(p, first[n]) for n, p in block.named_parameters())
    non = small()
    assert not torch.equal(non.stages[0].blocks[0].conv1.weight, non.stages[0].blocks[1].conv1.weight)


def test_bn_gamma_init_and_bad_arguments():
    model = small(bn_gamma_init=0.1)
    assert torch.all(model.stages[1].blocks[2].bn1.weight == 0.1)
    for kwargs, match in [
        (dict(init="shared"), "init"),
        (dict(sn_mu=0.0), "mu"),
        (dict(blocks=0), "blocks"),
        (dict(input_size=10), "divisible"),
    ]:
        with pytest.raises(ValueError, match=match):
            small(**kwargs)


def test_coupling_groups_cover_six_slots_per_stage():
    model = small()
    groups = model.coupling_groups()
    assert len(groups) == 3 * 6
    assert all(len(g) == 3 for g in groups)
    names = {n for n, p in model.named_parameters() if any(p is q for g in groups for q in g)}
    assert all(".blocks." in n for n in names) and len(names) == 3 * 3 * 6


def test_lam_one_keeps_recurrent_model_identical_through_training():
    torch.manual_seed(0)
    model = small(init="recurrent", sn_mu=0.9)
    coupler = GradientCoupler(model, lam=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(10):
        x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        coupler()
        opt.step()
    for stage in model.stages:
        first = dict(stage.blocks[0].named_parameters())
        for block in stage.blocks[1:]:
            assert all(torch.equal(p, first[n]) for n, p in block.named_parameters())


@pytest.mark.parametrize("mode", ["operator", "gram"])
@pytest.mark.parametrize("pcr", [False, True])
def test_spectral_normalization_bounds_every_residual_function(mode, pcr):
    torch.manual_seed(1)
    mu = 0.7
    model = small(sn_mu=mu, sn_mode=mode, pcr=pcr)
    # Give BN non-trivial statistics and scales, then measure in eval mode.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 2.0)
                m.running_mean.normal_()
                m.weight.uniform_(0.5, 2.0)
    model.eval()
    model.refresh_spectral(300)
    for s, stage in enumerate(model.stages):
        side = 16 // 2**s
        for block in stage.blocks:
            x = torch.randn(64, block.conv1.in_channels, side, side)
            y = x + 0.1 * torch.randn_like(x)
            with torch.no_grad():
                ratio = (block.residual(x) - block.residual(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
            assert torch.all(ratio <= mu * (1 + 1e-3)), ratio.max()


def test_state_dict_is_stable_and_round_trips(tmp_path):
    model = small(sn_mu=0.9)
    keys = set(model.state_dict())
    assert "stages.0.blocks.1.conv1.weight" in keys and "stages.2.sn.u1" in keys
    torch.save({"model": model.state_dict(), "model_config": model.config}, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(str(tmp_path))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nothing"))


def test_a_checkpoint_written_when_transitions_were_sequential_still_loads(tmp_path):
    """Transition was nn.Sequential(BN, ReLU, conv), its parts named 0 and 2; such checkpoints keep loading."""
    model = small(sn_mu=0.9).eval()
    state = model.state_dict()
    assert "transitions.0.bn.running_var" in state and "transitions.1.conv.weight" in state
    legacy = {
        k.replace(".bn.", ".0.").replace(".conv.", ".2.") if k.startswith("transitions.") else k: v
        for k, v in state.items()
    }
    assert "transitions.0.0.running_var" in legacy and "transitions.1.2.weight" in legacy
    torch.save({"model": legacy, "model_config": model.config}, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(str(tmp_path))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_deep_copy_uses_its_own_spectral_corrections():
    """Each block asks its own stage for the corrections: a deep copy (an EMA model, say) must ask the copy's
    stage, so changing the copy's weights changes the copy's residuals and leaves the original's alone."""
    model = small(sn_mu=0.5).eval()
    twin = copy.deepcopy(model)
    stage = twin.stages[0]
    with torch.no_grad():
        stage.blocks[0].conv2.weight.mul_(10)
        z = torch.randn(2, 4, 16, 16)
        by_blocks = z
        for block in stage.blocks:
            by_blocks = by_blocks + block.residual(by_blocks)
        assert torch.equal(stage(z), by_blocks)
        assert not torch.equal(model.stages[0](z), by_blocks)
