"""Everything at once (`itconv-fast bench`): every comparison in one report, and its markdown table."""

from __future__ import annotations

from .adaptive_depth import run_adaptive_depth_benchmark
from .batch_norm import run_batch_norm_relu_benchmark
from .coupling import run_coupling_benchmark
from .indices import run_indices_benchmark
from .launches import run_launch_count
from .lipschitz import LIPSCHITZ_CASES, run_lipschitz_benchmark
from .runner import machine_description
from .spectral import run_spectral_benchmark
from .train_step import run_train_step_benchmark

# Everything at once: `itconv-fast bench`

# Case names of the comparisons -> (op, variant, baseline) of the combined report. The copy is a memory
# floor, not a rival implementation.
_COUPLING = {
    "(a) per-slot loop": "per_slot_loop",
    "(b) _foreach": "foreach",
    "(c) torch.compile(reference)": "torch_compile",
    "(d) copy (memory floor)": "copy",
}
_TRAIN_STEP = {
    "coupling": "coupling",
    "spectral norm": "spectral_norm",
    "coupling + spectral norm": "coupling+spectral_norm",
}


# The combined report compares like with like: the matrix-mode drop-ins against torch's (same quantity).
# Operator mode computes the true norm, which torch does not offer; its overhead against torch's is in
# `itconv-fast bench lipschitz` (the goal there: at most 2x).
_LIPSCHITZ = {LIPSCHITZ_CASES[2]: "per_layer_matrix", LIPSCHITZ_CASES[3]: "batched_matrix"}


def _entry(op, variant, baseline, setting, median_s, baseline_median_s):
    return {
        "op": op,
        "variant": variant,
        "baseline": baseline,
        "setting": setting,
        "median_s": median_s,
        "baseline_median_s": baseline_median_s,
        "speedup": baseline_median_s / median_s,
    }


def run_all(quick: bool = False, device: str = "cpu", log=print) -> dict:
    """Every comparison of the bench subcommands, one after another, as {"machine", "results", "tables"}.
    quick: smaller settings (width 16 only, short timing, a small indices network), under 3 minutes on 2 cores."""
    widths = (16,) if quick else (16, 64)
    run_time = 0.3 if quick else 1.0
    results, tables = [], []

    log("soft_couple ...")
    report, table = run_coupling_benchmark(widths=widths, device=device, min_run_time=run_time)
    tables.append(table)
    for width in widths:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        for case, baseline in _COUPLING.items():
            if case in rows:
                results.append(
                    _entry(
                        "soft_couple",
                        "fused",
                        baseline,
                        f"ResNet-101-{width} gradients",
                        rows["fused soft_couple_"],
                        rows[case],
                    )
                )

    log("spectral_norm ...")
    report, table = run_spectral_benchmark(widths=widths, device=device, min_run_time=run_time)
    tables.append(table)
    for width in widths:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        setting = f"ResNet-101-{width}, 96 convs, 1 power step"
        results.append(
            _entry(
                "spectral_norm",
                "batched_operator",
                "per_layer_operator",
                setting,
                rows["batched operator"],
                rows["per-layer operator loop"],
            )
        )
        results.append(
            _entry(
                "spectral_norm",
                "batched_matrix",
                "torch_spectral_norm",
                setting,
                rows["batched matrix"],
                rows["per-layer torch spectral_norm (matrix)"],
            )
        )

    log("batch_norm_relu ...")
    shapes = ((16, 32, "nhwc"),) if quick else ((16, 32, "nhwc"), (64, 8, "nhwc"), (8, 32, "nchw"))
    report, table = run_batch_norm_relu_benchmark(shapes, device=device, min_run_time=run_time)
    tables.append(table)
    for key in report["ratios"]:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if str(r["width"]) == key}
        results.append(
            _entry(
                "batch_norm_relu",
                "fused",
                "aten_bn_relu",
                f"{key}, batch 128, fwd + bwd",
                rows["fused batch_norm_relu"],
                rows["relu(F.batch_norm) (ATen)"],
            )
        )

    log("indices ...")
    configs = [(8, 4, 32, 64)] if quick else [(8, 4, 32, 256), (16, 16, 32, 16)]
    report, table = run_indices_benchmark(configs, device=device, min_run_time=run_time)
    tables.append(table)
    for key in report["ratios"]:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if str(r["width"]) == key}
        results.append(_entry("indices", "cached", "reference", key, rows["cached"], rows["reference"]))

    log("adaptive_depth ...")
    width, blocks, n = (8, 4, 128) if quick else (16, 8, 512)
    report, table = run_adaptive_depth_benchmark(width, blocks, n=n, device=device, min_run_time=run_time)
    tables.append(table)
    equal = report["equal_error"]
    for key in report["ratios"]:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if str(r["width"]) == key}
        setting = f"{key}, tau {equal['tau']:g}: {equal['flops_share']:.0%} of the FLOPs at equal error"
        results.append(
            _entry(
                "adaptive_depth",
                "halting",
                "full_network",
                setting,
                rows["halting (update rule)"],
                rows["full network"],
            )
        )

    log("train_step ...")
    width, blocks, batch = (8, 4, 64) if quick else (16, 16, 128)
    report, table = run_train_step_benchmark(width, blocks, batch, device, min_run_time=1.0 if quick else 10.0)
    tables.append(table)
    rows = {r["case"]: r["median_s"] for r in report["rows"]}
    for case, median in rows.items():
        if case == "plain":
            continue
        if case.startswith("objective: "):
            variant = "objective:" + case.split()[1]
        else:
            variant = next(
                v for prefix, v in sorted(_TRAIN_STEP.items(), key=lambda kv: -len(kv[0])) if case.startswith(prefix)
            )
        results.append(
            _entry(
                "train_step",
                variant,
                "plain_step",
                f"ResNet-{6 * blocks + 5}-{width}, batch {batch}",
                median,
                rows["plain"],
            )
        )
    log("lipschitz ...")
    archs, batch, size = (("resnet18",), 4, 64) if quick else (("resnet18", "resnet50"), 8, 128)
    report, table = run_lipschitz_benchmark(archs, batch, size, device, min_run_time=1.0 if quick else 5.0)
    tables.append(table)
    for setting in report["overhead_vs_torch"]:
        over = {r["case"]: r["overhead_s"] for r in report["rows"] if r["setting"] == setting}
        torch_case = LIPSCHITZ_CASES[1]
        for case, variant in _LIPSCHITZ.items():
            if case in over and torch_case in over:
                results.append(
                    _entry(
                        "spectral_norm_drop_in",
                        variant,
                        "torch_spectral_norm",
                        f"{setting}, training-step overhead",
                        over[case],
                        over[torch_case],
                    )
                )
    log("launches ...")  # counted, not timed: the CUDA path's step on the CPU, whatever `device` is
    launch_report, table = run_launch_count()
    tables.append(table)
    launches = {row["case"]: {"launches": row["launches"], "syncs": row["syncs"]} for row in launch_report["rows"]}
    return {
        "machine": machine_description(device),
        "quick": quick,
        "results": results,
        "launches": launches,
        "tables": tables,
    }


def results_markdown(report: dict) -> str:
    """The combined report as markdown: the machine, then one row per comparison."""
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads), CPU clone {m.get('cpu_isa', '?')}"
        + (f", GPU {m['device']}" if m.get("device", "cpu") != "cpu" else "")
        + f"; torch {m['torch']}; {m['backend']}; {m['date']}"
        + ("; --quick" if report.get("quick") else ""),
        "",
        "| op | setting | variant | baseline | time | baseline time | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]

    def t(sec):
        return f"{sec * 1e3:.3g} ms" if sec < 1 else f"{sec:.3g} s"

    for r in report["results"]:
        note = " (floor)" if r["baseline"] == "copy" else (" (overhead)" if r["baseline"] == "plain_step" else "")
        if r["op"] == "spectral_norm_drop_in":
            note = " (overheads)"
        lines.append(
            f"| {r['op']} | {r['setting']} | {r['variant']} | {r['baseline']}{note} | {t(r['median_s'])} | "
            f"{t(r['baseline_median_s'])} | {r['speedup']:.2f}x |"
        )
    if report.get("launches"):
        counts = report["launches"]
        lines += ["", "Kernel launches of one training step on the CUDA path (counted on the CPU; host reads):", ""]
        lines += ["| case | launches | host reads |", "|---|---|---|"]
        lines += [f"| {case} | {c['launches']} | {c['syncs']} |" for case, c in counts.items()]
    return "\n".join(lines) + "\n"
