"""The shared runner of the benchmarks: the machine record, interleaved side-by-side timing (`run_comparison`,
`interleaved_step_times`), backend labels and JSON reports."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import torch

from .. import ops

__all__ = [
    "cpu_model",
    "machine_description",
    "label_backend",
    "run_comparison",
    "save_report",
    "interleaved_step_times",
]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str) -> dict:
    from ..ops import _extension

    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "extension": ops.extension_loaded(),
        "backend": "compiled extension" if ops.extension_loaded() else "pure-PyTorch reference (extension not loaded)",
        "cuda_kernels_compiled": bool(ops.extension_loaded() and _extension.cuda_compiled()),
        "cuda_arch_list": _extension.build_info().get("cuda_arch_list"),
        "cpu_isa": _extension.cpu_info().get("isa", "n/a (reference)"),
        "l1d": ({k: v for k, v in _extension.cpu_info().items() if k.startswith("l1d")} or None),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = "cpu"
    return info


def label_backend(table: str) -> str:
    """A table as printed: headed by a warning when the ops ran their pure-PyTorch references (no extension),
    so that a fallback run is never read as the compiled kernels' times."""
    if ops.extension_loaded():
        return table
    return (
        "[BACKEND: pure-PyTorch reference (the compiled extension is not loaded); the 'fused' / 'batched' "
        "rows time the references, not the kernels]\n" + table
    )


def _torch_benchmark():
    """torch.utils.benchmark, imported without the warning that its C++ timer's import of torch.utils.cpp_extension
    logs on a machine with a CUDA toolkit but no GPU ("No CUDA runtime is found, using CUDA_HOME=..."), which
    says nothing about the benchmarks."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def run_comparison(
    cases_by_width: dict,
    *,
    label: str,
    reference: str,
    device="cpu",
    min_run_time=1.0,
    name="",
    warmup: int = 2,
    block_time: float = 0.02,
    min_rounds: int = 3,
) -> tuple[dict, str]:
    """Times every case side by side and returns (JSON-ready report, table).

    The cases of one width are measured interleaved: round after round, every case runs one block of
    calls (torch.utils.benchmark `Timer.timeit`, sized to about `block_time`), so that the drift of a
    shared machine (memory bandwidth, clocks) hits all cases alike; a case's time is the median over
    its blocks (`Measurement.merge`). Rounds go on until every case had about `min_run_time` seconds.

    cases_by_width: {width: {case name: zero-argument callable}}; `reference` names the toolkit's case,
    against which the report's ratios (other case's time / reference time) are given.
    """
    benchmark = _torch_benchmark()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results, rows = [], []
    for width, cases in cases_by_width.items():
        timers = {}
        for case, fn in cases.items():
            for _ in range(warmup):  # warm-up (and compilation)
                fn()
            sync()
            timer = benchmark.Timer(
                stmt="fn()",
                globals={"fn": fn},
                label=label,
                sub_label=case,
                description=f"width {width}" if isinstance(width, int) else str(width),
                num_threads=torch.get_num_threads(),
            )
            if block_time <= 0:  # one call per block: no sizing call (a call may take minutes)
                timers[case] = (timer, 1)
                continue
            per_call = timer.timeit(1).median
            timers[case] = (timer, max(1, int(block_time / max(per_call, 1e-9))))
        blocks = {case: [] for case in cases}
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or time.perf_counter() - start < min_run_time * len(cases):
            for case, (timer, number) in timers.items():
                blocks[case].append(timer.timeit(number))
            rounds += 1
        for case in cases:
            m = benchmark.Measurement.merge(blocks[case])[0]
            results.append(m)
            rows.append({"width": width, "case": case, "median_s": m.median, "iqr_s": m.iqr, "rounds": rounds})
    # Not trimmed to the "significant" figures: with a few noisy rounds Compare keeps one (8000 / 100000 us).
    compare = benchmark.Compare(results)
    report = {
        "benchmark": name or label,
        "machine": machine_description(device),
        "rows": rows,
        "ratios": {},
        "method": "cases interleaved round by round; medians over rounds",
    }
    for width in cases_by_width:
        by_case = {r["case"]: r["median_s"] for r in rows if r["width"] == width}
        key = f"width {width}" if isinstance(width, int) else str(width)
        report["ratios"][key] = {c: t / by_case[reference] for c, t in by_case.items() if c != reference}
    return report, label_backend(str(compare))


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def interleaved_step_times(cases: dict, device: str, min_run_time: float) -> tuple[dict, int]:
    """Every case once for warm-up, then round after round one call of each case in turn (so that drift of a
    shared machine hits all alike) until each had about min_run_time seconds, at least 3 rounds:
    ({case: [seconds per round]}, rounds)."""

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < min_run_time * len(cases):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times, rounds
