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
    args = ["train", "--out", str(out), "--pcr", "--sn-mu", "0.5", "--train-size", "64", "--test-size", "32", "--width", "2",
            "--blocks", "2", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    assert CliRunner().invoke(main, args).exit_code == 0
    report = tmp_path / "diag.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "di_diagnostics.py"), str(out), "--examples", "16",
                             "--extra", "4", "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PCR, mu 0.5" in result.stdout
    (diag,) = json.loads(report.read_text())
    for stage in diag["stages"]:
        assert len(stage["corrections"]) == 2 and min(stage["corrections"]) >= 1.0
        # A PCR with L(f~) <= ~0.5 contracts: successive steps shrink.
        assert max(stage["successive_step_ratio_median"]) < 0.75
        assert len(stage["relative_step_median"]) == 4
