"""The benchmark harness: interleaved rounds, ratios against the toolkit's case, the CLI's JSON report."""

import json
import time

from click.testing import CliRunner

from itconv_fast import bench
from itconv_fast.cli.app import main


def test_run_comparison_interleaves_cases_and_reports_ratios():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    report, table = bench.run_comparison({4: {"fast": fast, "slow": slow}}, label="toy", reference="fast",
                                         min_run_time=0.05, warmup=1, block_time=0.004)
    rows = {r["case"]: r for r in report["rows"]}
    assert set(rows) == {"fast", "slow"} and all(r["rounds"] >= 3 for r in rows.values())
    assert rows["slow"]["median_s"] > 0.0015 > rows["fast"]["median_s"]
    assert report["ratios"]["width 4"]["slow"] > 10
    # Interleaved: the slow case's calls are spread over the whole run, not in one stretch.
    runs = sum(1 for a, b in zip(calls, calls[1:]) if a != b)
    assert runs >= 2 * 3 - 1
    assert "fast" in table and "slow" in table


def test_bench_coupling_cli_writes_its_report(tmp_path):
    out = tmp_path / "coupling.json"
    result = CliRunner().invoke(main, ["bench", "coupling", "--width", "2", "--no-compile", "--min-run-time", "0.01",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    cases = {r["case"] for r in report["rows"]}
    assert cases == {"fused soft_couple_", "(a) per-slot loop", "(b) _foreach", "(d) copy (memory floor)"}
    assert set(report["ratios"]["width 2"]) == cases - {"fused soft_couple_"}
    assert report["machine"]["threads"] >= 1
