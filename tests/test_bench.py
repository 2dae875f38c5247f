"""The benchmark harness: interleaved rounds, ratios against the toolkit's case, the CLI's JSON report."""

import json
import os
import time

import pytest
from click.testing import CliRunner

from itconv_fast import bench, ops
from itconv_fast.cli.app import main


def test_run_comparison_interleaves_cases_and_reports_ratios():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    report, table = bench.run_comparison(
        {4: {"fast": fast, "slow": slow}}, label="toy", reference="fast", min_run_time=0.05, warmup=1, block_time=0.004
    )
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
    result = CliRunner().invoke(
        main, ["bench", "coupling", "--width", "2", "--no-compile", "--min-run-time", "0.01", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    cases = {r["case"] for r in report["rows"]}
    assert cases == {"fused soft_couple_", "(a) per-slot loop", "(b) _foreach", "(d) copy (memory floor)"}
    assert set(report["ratios"]["width 2"]) == cases - {"fused soft_couple_"}
    assert report["machine"]["threads"] >= 1


def test_bench_without_subcommand_writes_one_combined_report(tmp_path, monkeypatch):
    """The combined report's schema, on tiny stand-ins for the four comparisons (the real ones take minutes)."""

    def fake(name, cases, reference):
        def run(*args, **kwargs):
            rows = [{"width": w, "case": c, "median_s": t} for w, by in cases.items() for c, t in by.items()]
            ratios = {
                f"width {w}" if isinstance(w, int) else str(w): {
                    c: t / by[reference] for c, t in by.items() if c != reference
                }
                for w, by in cases.items()
            }
            return {"rows": rows, "ratios": ratios}, f"table {name}"

        return run

    monkeypatch.setattr(
        bench.suite,
        "run_coupling_benchmark",
        fake(
            "coupling",
            {
                16: {
                    "fused soft_couple_": 1.0,
                    "(a) per-slot loop": 10.0,
                    "(b) _foreach": 5.0,
                    "(c) torch.compile(reference)": 4.0,
                    "(d) copy (memory floor)": 0.5,
                }
            },
            "fused soft_couple_",
        ),
    )
    monkeypatch.setattr(
        bench.suite,
        "run_spectral_benchmark",
        fake(
            "spectral",
            {
                16: {
                    "batched operator": 2.0,
                    "per-layer operator loop": 6.0,
                    "batched matrix": 0.1,
                    "per-layer torch spectral_norm (matrix)": 2.0,
                }
            },
            "batched operator",
        ),
    )
    monkeypatch.setattr(
        bench.suite,
        "run_batch_norm_relu_benchmark",
        fake(
            "bn",
            {"16x32x32 nhwc": {"fused batch_norm_relu": 1.0, "relu(F.batch_norm) (ATen)": 1.6}},
            "fused batch_norm_relu",
        ),
    )
    monkeypatch.setattr(
        bench.suite,
        "run_indices_benchmark",
        fake("indices", {"8x4@32px,n=64": {"cached": 1.0, "reference": 3.0}}, "cached"),
    )
    monkeypatch.setattr(
        bench.suite,
        "run_train_step_benchmark",
        fake(
            "train",
            {
                8: {
                    "plain": 1.0,
                    "coupling (lam 0.5)": 1.01,
                    "spectral norm (operator, 1 power step)": 1.02,
                    "coupling + spectral norm": 1.05,
                    "objective: fixed-point (weight 1)": 1.3,
                }
            },
            "plain",
        ),
    )

    def fake_lipschitz(*args, **kwargs):
        overheads = dict(zip(bench.LIPSCHITZ_CASES, (0.0, 0.2, 0.1, 0.08, 0.3, 0.25)))
        rows = [
            {"setting": "resnet18, batch 4, 64x64", "case": c, "overhead_s": o, "median_s": 1 + o}
            for c, o in overheads.items()
        ]
        return {"rows": rows, "overhead_vs_torch": {"resnet18, batch 4, 64x64": {}}}, "table lipschitz"

    monkeypatch.setattr(bench.suite, "run_lipschitz_benchmark", fake_lipschitz)
    halting = fake("adaptive", {"8x4@32px,n=128,mu=0.5": {"halting (update rule)": 1.0, "full network": 2.5}},
                   "halting (update rule)")  # fmt: skip

    def fake_adaptive(*args, **kwargs):
        report, table = halting()
        report["equal_error"] = {"tau": 0.1, "flops_share": 0.4}
        return report, table

    monkeypatch.setattr(bench.suite, "run_adaptive_depth_benchmark", fake_adaptive)
    launch_rows = [
        {"case": "plain loop", "launches": 243, "syncs": 2},
        {"case": "train lam 0", "launches": 246, "syncs": 1},
    ]
    monkeypatch.setattr(bench.suite, "run_launch_count", lambda: ({"rows": launch_rows}, "launch table"))
    out, md = tmp_path / "all.json", tmp_path / "all.md"
    result = CliRunner().invoke(main, ["bench", "--quick", "--json", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "torch", "backend", "date", "cuda_kernels_compiled"} <= set(report["machine"])
    by = {(r["op"], r["variant"], r["baseline"]): r for r in report["results"]}
    assert by[("soft_couple", "fused", "per_slot_loop")]["speedup"] == 10.0
    assert by[("soft_couple", "fused", "copy")]["speedup"] == 0.5
    assert by[("spectral_norm", "batched_matrix", "torch_spectral_norm")]["speedup"] == pytest.approx(20.0)
    assert by[("indices", "cached", "reference")]["baseline_median_s"] == 3.0
    assert by[("batch_norm_relu", "fused", "aten_bn_relu")]["speedup"] == pytest.approx(1.6)
    adaptive = by[("adaptive_depth", "halting", "full_network")]
    assert adaptive["speedup"] == pytest.approx(2.5) and "40% of the FLOPs" in adaptive["setting"]
    assert by[("train_step", "coupling+spectral_norm", "plain_step")]["speedup"] == pytest.approx(1 / 1.05)
    assert by[("train_step", "coupling", "plain_step")]["median_s"] == 1.01
    assert by[("train_step", "objective:fixed-point", "plain_step")]["speedup"] == pytest.approx(1 / 1.3)
    drop_in = by[("spectral_norm_drop_in", "batched_matrix", "torch_spectral_norm")]
    assert (drop_in["median_s"], drop_in["baseline_median_s"]) == (0.08, 0.2)  # overheads over the plain step
    # operator mode is a different quantity from torch's: not a row of the combined report
    assert not any(r["variant"].endswith("operator") for r in report["results"] if r["op"] == "spectral_norm_drop_in")
    for r in report["results"]:
        assert r["speedup"] == pytest.approx(r["baseline_median_s"] / r["median_s"])
    text = md.read_text()
    assert "| soft_couple |" in text and "copy (floor)" in text and report["machine"]["cpu"] in text
    assert report["launches"]["train lam 0"] == {"launches": 246, "syncs": 1} and "| train lam 0 | 246 | 1 |" in text


def test_bench_lipschitz_cli_reports_overheads_against_torch(tmp_path, monkeypatch):
    """The real cases on a tiny stand-in for the ResNets (the schema and the overhead arithmetic)."""
    from itconv_fast.models import zoo

    monkeypatch.setattr(zoo, "resnet18", lambda: zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], num_classes=1000, width=4))
    out = tmp_path / "lip.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "lipschitz",
            "--arch",
            "resnet18",
            "--batch",
            "2",
            "--size",
            "32",
            "--min-run-time",
            "0.01",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert set(rows) == set(bench.LIPSCHITZ_CASES)
    assert rows["plain"]["overhead_s"] == 0.0
    torch_over = rows[bench.LIPSCHITZ_CASES[1]]["overhead_s"]
    batched = rows["(c) BatchedSpectralNorm (matrix)"]
    assert batched["overhead_vs_torch"] == pytest.approx(batched["overhead_s"] / torch_over)
    assert "overhead" in result.output


def test_a_fallback_run_is_labelled_as_the_reference_in_every_table(monkeypatch):
    from itconv_fast.ops import _extension

    assert bench.label_backend("t") == ("t" if ops.extension_loaded() else bench.label_backend("t"))
    monkeypatch.setattr(_extension, "_loaded", False)
    labelled = bench.label_backend("| fused | 1 ms |")
    assert labelled.startswith("[BACKEND: pure-PyTorch reference") and labelled.endswith("| fused | 1 ms |")
    report, table = bench.run_comparison(
        {1: {"a": lambda: None, "b": lambda: None}},
        label="toy",
        reference="a",
        min_run_time=0.01,
        block_time=0.0,
        min_rounds=1,
        warmup=0,
    )
    assert table.startswith("[BACKEND: pure-PyTorch reference")
    assert report["machine"]["backend"].startswith("pure-PyTorch reference")
    assert "cpu_isa" in report["machine"] and "cuda_arch_list" in report["machine"]


def test_train_step_cases_time_every_objective_through_the_training_step():
    from itconv_fast.bench.train_step import OBJECTIVE_CASE, train_step_cases
    from itconv_fast.objectives import OBJECTIVES

    cases = train_step_cases(width=2, blocks=2, batch=4, objectives=True)
    assert {OBJECTIVE_CASE.format(name) for name in OBJECTIVES} <= set(cases)
    for fn in cases.values():
        fn()


def test_bench_batch_norm_relu_times_both_implementations():
    report, table = bench.run_batch_norm_relu_benchmark(((4, 6, "nhwc"), (3, 5, "nchw")), batch=4, min_run_time=0.01)
    assert set(report["ratios"]) == {"4x6x6 nhwc", "3x5x5 nchw"}
    for ratios in report["ratios"].values():
        assert set(ratios) == {"relu(F.batch_norm) (ATen)"} and ratios["relu(F.batch_norm) (ATen)"] > 0
    assert "fused batch_norm_relu" in table


def test_bench_adaptive_depth_halts_a_converging_network_at_equal_error(tmp_path):
    out = tmp_path / "adaptive.json"
    args = ["bench", "adaptive-depth", "--width", "4", "--blocks", "6", "--examples", "48", "--min-run-time", "0.05"]
    result = CliRunner().invoke(main, args + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    equal = report["equal_error"]
    assert equal["error"] <= equal["full_error"] + 0.005 and equal["full_blocks"] == 18
    assert equal["mean_blocks"] < 18 and equal["flops_share"] < 1  # a contracting network stops early
    assert {r["case"] for r in report["rows"]} == {"halting (update rule)", "full network"}
    assert "the full network takes" in result.output


def test_bench_tables_keep_their_digits_and_no_cuda_warning_on_a_cpu_machine(tmp_path):
    """On a machine with a CUDA toolkit and no GPU, `bench` prints no "No CUDA runtime is found" line (torch's
    benchmark timer imports cpp_extension, which logs it), and the timing tables keep more than one significant
    figure (torch's trimming left 8000 / 100000 us with a few noisy rounds)."""
    import re
    import subprocess
    import sys

    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    code = (
        "from itconv_fast.bench.coupling import run_coupling_benchmark\n"
        "report, table = run_coupling_benchmark(widths=(2,), min_run_time=0.01, compile_reference=False)\n"
        "print(table)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No CUDA runtime" not in out.stderr + out.stdout
    times = [float(v) for v in re.findall(r"\|\s+([0-9]+\.[0-9]+)", out.stdout)]
    assert times and all("." in v for v in re.findall(r"\|\s+([0-9.]+)", out.stdout))
