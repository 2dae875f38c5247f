"""The example scripts run and report what they say."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from itconv_fast.cli.app import main

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_di_diagnostics_on_a_spectrally_normalised_pcr_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        "--pcr",
        "--sn-mu",
        "0.5",
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
    assert CliRunner().invoke(main, args).exit_code == 0
    report = tmp_path / "diag.json"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "di_diagnostics.py"),
            str(out),
            "--examples",
            "16",
            "--extra",
            "4",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PCR, mu 0.5" in result.stdout
    (diag,) = json.loads(report.read_text())
    for stage in diag["stages"]:
        assert len(stage["corrections"]) == 2 and min(stage["corrections"]) >= 1.0
        # A PCR with L(f~) <= ~0.5 contracts: successive steps shrink.
        assert max(stage["successive_step_ratio_median"]) < 0.75
        assert len(stage["relative_step_median"]) == 4


def _run_example(name, args, timeout=600):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_vit_example_trains_couples_and_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "vit"
    _run_example(
        "vit_digitclutter.py",
        [
            "--out",
            str(out),
            "--epochs",
            "1",
            "--train-size",
            "256",
            "--test-size",
            "64",
            "--layers",
            "3",
            "--width",
            "16",
            "--extra",
            "3",
            "--speed-examples",
            "16",
            "--threads",
            "1",
        ],
    )
    results = json.loads((out / "results.json").read_text())
    runs = {run["lam"]: run for run in results["runs"]}
    assert set(runs) == {0.0, 0.5, 1.0}
    # lam = 1 coupling keeps the (identically initialised) layers identical; lam = 0 layers differ.
    assert runs[1.0]["layer_spread"] == 0.0 and runs[0.0]["layer_spread"] > 0.01
    for run in runs.values():
        stage = run["analysis"]["stages"][0]
        assert len(stage["anytime_error"]) == 3 + 3  # k = 1 .. T + K
        assert run["evaluator_speed"]["cached_s"] > 0 and run["evaluator_speed"]["reference_s"] > 0
        assert 0.0 <= run["test_error"] <= 1.0
    assert (out / "vit.png").stat().st_size > 0


def test_looped_parity_example_learns_and_runs_past_its_iterations(tmp_path):
    out = tmp_path / "parity"
    _run_example(
        "looped_parity.py",
        [
            "--out",
            str(out),
            "--lams",
            "1",
            "--steps",
            "300",
            "--log-every",
            "100",
            "--width",
            "32",
            "--iterations",
            "8",
            "--train-length",
            "8",
            "--test-lengths",
            "16",
            "--extra",
            "8",
            "--test-size",
            "200",
            "--threads",
            "1",
        ],
    )
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["block_spread"] == 0.0  # weight-shared through lam = 1 coupling
    trained = run["lengths"]["8"]
    assert trained["error_at_T"] < 0.05  # running parity of 8 bits, learned in 300 steps
    assert len(trained["anytime_error"]) == 8 + 8
    assert set(run["lengths"]) == {"8", "16"}
    assert (out / "parity.png").stat().st_size > 0


def test_looped_parity_example_trains_with_an_objective(tmp_path):
    out = tmp_path / "parity"
    _run_example(
        "looped_parity.py",
        [
            "--out",
            str(out),
            "--lams",
            "1",
            "--steps",
            "40",
            "--log-every",
            "20",
            "--width",
            "16",
            "--iterations",
            "4",
            "--train-length",
            "8",
            "--test-lengths",
            "16",
            "--extra",
            "4",
            "--test-size",
            "50",
            "--threads",
            "1",
            "--objective",
            "extra-iterations:1",
            "--objective-k",
            "3",
        ],
    )
    results = json.loads((out / "results.json").read_text())
    assert results["objectives"] == {"extra-iterations": 1.0} and results["objective_k"] == 3
    assert results["runs"][0]["block_spread"] == 0.0


def test_lipschitz_dropin_example_bounds_every_layer(tmp_path):
    """examples/lipschitz_dropin.py: torch's reshaped-kernel sigma under-reports a 3x3 conv's norm, and
    BatchedSpectralNorm(mu=1, operator) brings every layer's measured norm to <= 1 (power-iteration limit:
    the exact FFT norm of the circular layer within 1%)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lipschitz_dropin", os.path.join(ROOT, "examples", "lipschitz_dropin.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before, after = module.main(out_dir=str(tmp_path))
    first = before.layers[0]
    assert first.operator / first.matrix > 2
    for row in after.layers:
        assert row.operator <= 1 + 1e-3, row.name
        if row.exact is not None:
            assert row.exact <= 1.01
    assert after.product_operator <= 1 + 1e-3 < before.product_operator
    assert (tmp_path / "report.md").read_text().count("| product |") == 2


def test_finetune_to_converge_example_runs_the_three_runs_of_each_model(tmp_path):
    """examples/finetune_to_converge.py at a tiny size: per model an ordinary run and two fine-tunes from its
    checkpoint, each with the indices before (those of the network it started from) and after."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "finetune_to_converge", os.path.join(ROOT, "examples", "finetune_to_converge.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(
        ["--out", str(tmp_path), "--train-size", "128", "--val-size", "20", "--epochs", "1", "--tune-epochs", "1"]
    )
    assert [r["run"] for r in rows] == list(module.RUNS) * 2
    for model in module.MODELS:
        ordinary, *tuned = [r for r in rows if r["model"] == model]
        assert all(r["before"] == ordinary["after"] for r in tuned)  # both start from the ordinary run's weights
    assert (tmp_path / "results.md").read_text().count("| timm:vit_tiny_patch16_224 |") == 3
