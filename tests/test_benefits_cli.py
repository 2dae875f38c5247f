"""`itconv-fast benefits` on a trained run: the JSON it writes, harder Digitclutter sets, bad options."""

import json

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.data import datasets, digitclutter
from itconv_fast.experiments.benefits import benefits_of_run, default_harder_digits
from itconv_fast.measures import thinking_longer_report
from itconv_fast.models import load_checkpoint

TINY = ["--train-size", "96", "--test-size", "40", "--width", "4", "--blocks", "2", "--batch-size", "32"]
FAST = ["--extra-iterations", "3", "--pgd-steps", "2", "--sigmas", "0.5", "--epsilons", "0,0.05", "--taus", "0,0.1"]
FAST += ["--confidences", "0", "--agreements", "1", "--ks", "all"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("benefits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITCONV_FAST_CACHE", str(root / "cache"))
        out = root / "run"
        result = CliRunner().invoke(
            main, ["train", "--sn-mu", "0.95", "--epochs", "1", "--no-progress", "--out", str(out)] + TINY
        )
        assert result.exit_code == 0, result.output
        yield out


@pytest.fixture(autouse=True)
def cache(run, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(run.parent / "cache"))


def test_benefits_writes_every_measure(run):
    result = CliRunner().invoke(main, ["benefits", str(run), "--batch-size", "16"] + FAST)
    assert result.exit_code == 0, result.output
    written = json.loads((run / "benefits.json").read_text())
    assert written["n"] == 40
    sets = written["thinking_longer"]
    assert list(sets) == ["test set", "digitclutter-4", "digitclutter-5", "noise 0.5"]
    for r in sets.values():
        assert r["ks"] == [0, 1, 2, 3] and len(r["errors"]) == 4 and 0 <= r["best_k"] <= 3 and r["gain"] >= 0
    adaptive = written["adaptive_depth"]
    update, confidence, agreement = adaptive["curves"]
    assert [c["rule"] for c in adaptive["curves"]] == ["update", "confidence", "agreement"]
    assert update["levels"] == [0.0, 0.1] and update["errors"][0] == adaptive["full_error"]
    assert update["mean_blocks"][0] == adaptive["full_blocks"] == 6 and 0 <= adaptive["compute_saved"] < 1
    assert update["mean_flops"][0] == pytest.approx(adaptive["full_flops"])
    # A confidence of 0 halts every example after the last stage's first block; agreement needs two read-outs.
    assert confidence["levels"] == [0.0] and confidence["mean_blocks"] == [5.0]
    assert agreement["levels"] == [1] and agreement["mean_blocks"] == [6.0]
    assert set(adaptive["compute_saved_by_rule"]) == {"update", "confidence", "agreement"}
    robust = written["robustness"]
    assert robust["epsilons"] == [0.0, 0.05] and robust["pgd_errors"][0] == robust["clean_error"]
    assert robust["lipschitz_bound"] > 0 and len(robust["certified_shares"]) == 2
    assert "digitclutter-5" in result.output and "PGD eps 0.05" in result.output
    # The table's test set is the run's own: the same error as its indices see.
    assert sets["test set"]["error"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["epochs"][-1]["test_error"]
    )


def test_a_harder_set_is_the_run_test_split_with_more_digits(run, tmp_path):
    """digitclutter-5 is drawn from the run's test seed with 5 digits an image, scored on the 5 highest outputs."""
    result = benefits_of_run(str(run), measures=("thinking-longer",), extra_iterations=2, harder_digits=[5])
    task = datasets.load("digitclutter", n_digits=5, train_size=1, test_size=40, seed=0)
    model = load_checkpoint(str(run / "checkpoint.pt"))
    x = (task.test.images.float() / 255 - 0.5) / 0.27
    direct = thinking_longer_report(
        model, (x, task.test.targets), extra_iterations=2, error_fn=lambda o, y: ~digitclutter.exact_set_correct(o, y)
    )
    assert task.test.targets.sum(1).eq(5).all()
    assert result["thinking_longer"]["digitclutter-5"]["errors"] == pytest.approx(direct.errors)
    assert default_harder_digits(3) == (4, 5) and default_harder_digits(9) == (10,)


def test_plot_draws_one_figure_per_measure(run, tmp_path):
    base = tmp_path / "figs" / "b.png"
    base.parent.mkdir()
    result = CliRunner().invoke(main, ["benefits", str(run), "--plot", str(base)] + FAST)
    assert result.exit_code == 0, result.output
    for measure in ("thinking-longer", "adaptive-depth", "robustness"):
        figure = tmp_path / "figs" / f"b-{measure}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {figure}" in result.output
    assert not base.exists()


def test_json_output_and_one_measure(run):
    result = CliRunner().invoke(main, ["benefits", str(run), "--measures", "robustness", "--json"] + FAST)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert "robustness" in printed and "thinking_longer" not in printed


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sigmas", "-0.1"], "--sigmas"),
        (["--epsilons", "0.1,nan"], "--epsilons"),
        (["--measures", "speed"], "--measures"),
        (["--harder-digits", "11"], "--harder-digits"),
        (["--extra-iterations", "0"], "--extra-iterations"),
        (["--noise-sigma", "-1"], "--noise-sigma"),
        (["--taus", "0.1,-2"], "--taus"),
        (["--confidences", "-0.5"], "--confidences"),
        (["--agreements", "0"], "--agreements"),
        (["--taus", "", "--confidences", "", "--agreements", ""], "--taus"),
        (["--plot", "figure.pdf"], "--plot"),
        (["--ks", "1,x"], "--ks"),
        (["--ks", "5", "--extra-iterations", "4"], "--ks"),
    ],
)
def test_bad_options_are_usage_errors_that_write_nothing(run, args, match):
    (run / "benefits.json").unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["benefits", str(run)] + args)
    assert result.exit_code == 2 and match in result.output, result.output
    assert not (run / "benefits.json").exists()


def test_a_directory_without_a_checkpoint_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["benefits", str(tmp_path)])
    assert result.exit_code == 2 and "no checkpoint.pt" in result.output


def test_the_library_refuses_bad_arguments_before_measuring(run):
    for kw, match in (
        ({"measures": ("speed",)}, "unknown measure"),
        ({"harder_digits": [0]}, "1..10"),
        ({"taus": [-1.0]}, "tau"),
        ({"agreements": [1.5]}, "agreement"),
        ({"epsilons": [float("nan")]}, "epsilon"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"extra_iterations": 0}, "extra_iterations"),
    ):
        with pytest.raises(ValueError, match=match):
            benefits_of_run(str(run), **kw)
    assert torch.is_grad_enabled()
