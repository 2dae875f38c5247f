"""A sweep trial's measurements after training: its indices and (when the sweep asks) its benefits, written
beside its checkpoint and returned as the columns of its result row.

    columns = measure_trial("runs/sweep/trials/lam=1,seed=0", spec.indices, device="auto")
"""

from __future__ import annotations

import os
import time

from ..io.checkpoint import atomic_write_json
from .benefits import benefit_columns, benefits_of_run
from .evaluation import indices_of_run

__all__ = ["measure_trial", "MEASURED_PREFIXES"]

# The result columns measure_trial may write (indices and benefits), as prefixes: what a new measurement replaces.
MEASURED_PREFIXES = ("ci", "ri", "di", "indices_seconds", "tl_", "ad_", "noise_error_", "pgd_error_", "certified_")
MEASURED_PREFIXES += ("benefits_seconds",)


def measure_trial(out: str, indices: dict, device: str = "auto") -> dict:
    """Measures the trained run in `out` as the sweep's `indices` block says: writes indices.json (and
    benefits.json), returns {ci, ri, di, per-stage indices, indices_seconds, benefit columns, benefits_seconds}."""
    t0 = time.perf_counter()
    index_report = indices_of_run(
        out,
        extra_iterations=indices["extra_iterations"],
        method=indices["method"],
        batch_size=indices["batch_size"],
        test_size=indices["test_size"],
        device=device,
    )
    atomic_write_json(os.path.join(out, "indices.json"), index_report.to_dict())
    row = {"ci": index_report.ci, "ri": index_report.ri, "di": index_report.di}
    for s, st in enumerate(index_report.stages, start=1):
        row.update({f"ci_s{s}": st.ci, f"ri_s{s}": st.ri, f"di_s{s}": st.di})
    row["indices_seconds"] = time.perf_counter() - t0
    if indices.get("benefits"):
        t0 = time.perf_counter()
        found = benefits_of_run(
            out,
            measures=tuple(indices["benefits"]),
            extra_iterations=indices["extra_iterations"],
            batch_size=indices["batch_size"],
            test_size=indices["test_size"],
            device=device,
        )
        atomic_write_json(os.path.join(out, "benefits.json"), found)
        row.update(benefit_columns(found))
        row["benefits_seconds"] = time.perf_counter() - t0
    return row
