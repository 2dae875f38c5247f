"""The toy inverse problem (paper Fig 1): the error-corrective iteration converges, the trained networks'
extra iterations diverge, and the probes are what they claim to be."""

import json

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments.toy import EPS, A, ToyConfig, ToyResNet, error_corrective, run_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return run_toy(str(out), ToyConfig(steps=800)), out


def test_error_corrective_iteration_converges_geometrically():
    z = torch.tensor([[0.8, -0.6], [-0.3, 0.9]])
    x = z * torch.tensor(A)
    traj = error_corrective(x, 30)
    errors = [float((v - z).abs().max()) for v in traj]
    # Each coordinate contracts by |1 - eps_i a_i| (0.55 and 0.4) per step.
    rate = max(abs(1 - e * a) for e, a in zip(EPS, A))
    for before, after in zip(errors, errors[1:]):
        assert after <= rate * before + 1e-7
    assert errors[-1] < 1e-7


def test_trained_networks_fit_and_their_extra_iterations_diverge(toy):
    report, _ = toy
    facts = report["facts"]
    assert facts["algorithm"]["extra_error_nonincreasing"]
    assert facts["algorithm"]["error_after_K_extra"] < facts["algorithm"]["final_error"]
    for name in ("resnet", "recurrent_resnet"):
        r = report["results"][name]
        assert r["readout_error"][-1] < 0.01 * r["readout_error"][0]  # it learned the inverse
        assert facts[name]["extra_over_final"] > 100  # and overshoots when iterated further
        assert r["extra_error"][-1] > r["extra_error"][0]


def test_recurrent_network_drop_out_is_the_same_for_every_block(toy):
    report, _ = toy
    drops = report["results"]["recurrent_resnet"]["dropout_error"]
    assert max(drops) - min(drops) <= 1e-6 * max(drops)
    assert len(report["results"]["resnet"]["dropout_error"]) == report["config"]["blocks"]


def test_probes_match_a_direct_computation():
    torch.manual_seed(0)
    net = ToyResNet(blocks=3, state=4, hidden=5, recurrent=False)
    x = torch.randn(7, 2)
    with torch.no_grad():
        h = net.encoder(x)
        h1 = h + net.layers[0](h)
        h3_drop2 = h1 + net.layers[2](h1)
        assert torch.equal(net.states(x, drop=2)[-1], h3_drop2)
        full = net.states(x, extra=2)
        assert torch.equal(full[-1], full[-2] + net.layers[2](full[-2]))
        assert len(full) == 3 + 1 + 2


def test_cli_writes_json_and_png(tmp_path):
    result = CliRunner().invoke(main, ["toy", "--out", str(tmp_path), "--steps", "200", "--extra-iterations", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "toy.json").read_text())
    assert len(report["results"]["resnet"]["extra_error"]) == 4
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
