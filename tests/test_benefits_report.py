"""The benefits section of a sweep report: its table equals the trials' own benefit columns, its correlations are
Pearson's r with a bootstrap interval, its figures are drawn, and its variants name weight sharing and the update."""

import dataclasses
import json
import math
import statistics

import numpy as np
import pytest

from itconv_fast.experiments import sweep as sweeps
from itconv_fast.experiments.benefits_report import correlation
from itconv_fast.experiments.report import write_report
from itconv_fast.experiments.variants import family_style, variant_of

BASE = {"width": 2, "blocks": 2, "test_size": 64, "batch_size": 32, "epochs": 1}
ROBUST = ("noise_error_sigma0.5", "pgd_error_eps0.02", "certified_eps0.02")


@pytest.fixture
def sweep_dir(tmp_path):
    spec = sweeps.parse_sweep(
        {
            "base": BASE,
            "grid": [
                {"train_size": [128, 64], "seed": [0, 1, 2]},
                {"sn_mu": [0.95], "train_size": [128, 64], "seed": [0, 1, 2]},
                {
                    "lam": [1.0],
                    "pcr": [False, True],
                    "objectives": [{"extra-iterations": 1.0}],
                    "train_size": [128, 64],
                    "seed": [0, 1, 2],
                },
            ],
            "indices": {"benefits": ["thinking-longer", "adaptive-depth", "robustness"]},
        },
        "s.yaml",
    )
    out = tmp_path / "sweep"
    sweeps.check_out_dir(spec, str(out))
    for i, trial in enumerate(sweeps.expand(spec)):
        folder = out / "trials" / trial.name
        folder.mkdir(parents=True)
        di = 0.9 - 0.02 * i
        row = {"final_test_error": 0.1 + 0.003 * i, "final_train_error": 0.05, "final_test_loss": 1.0}
        row.update(chance_error=0.99, epochs_run=1, ci=0.4, ri=0.5 + 0.01 * (i % 5), di=di)
        for s in (1, 2, 3):
            row.update({f"ci_s{s}": 0.4, f"ri_s{s}": 0.5, f"di_s{s}": di})
        row.update(train_seconds=1.0, indices_seconds=0.1, session_seconds=1.2, benefits_seconds=0.3)
        row.update({"tl_test_set_gain": 0.0, "tl_digitclutter-4_gain": 0.05 - 0.05 * di + 0.001 * (i % 3)})
        row.update({"ad_compute_saved": 0.1 * (i % 4), "noise_error_sigma0.5": 0.2 + 0.1 * di})
        row["pgd_error_eps0.02"] = 0.5
        row["certified_eps0.02"] = 0.3 if trial.config.sn_mu else None
        (folder / "result.json").write_text(json.dumps({"config": dataclasses.asdict(trial.config), "result": row}))
    sweeps.collect_results(spec, str(out))
    return out


def _rows(md, header_start):
    section = md.split(header_start)[1].split("\n\n")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]


def test_the_benefits_table_is_the_trials_mean_and_sd(sweep_dir):
    md = open(write_report(str(sweep_dir))).read()
    table = _rows(md, "| variant | train size |")
    header = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| variant |")).strip("|").split("|")]
    assert "gain DC-4" in header and "compute saved" in header and "PGD err ε 0.02" in header
    assert len(table) == 8  # 4 variants x 2 training-set sizes
    labels = [r[0] for r in table]
    assert "lam 1, extra-iterations:1" in labels and "lam 1, PCR update, extra-iterations:1" in labels
    results = [json.loads(p.read_text())["result"] for p in sorted((sweep_dir / "trials").glob("*/result.json"))]
    configs = [json.loads(p.read_text())["config"] for p in sorted((sweep_dir / "trials").glob("*/result.json"))]
    row = next(r for r in table if r[0] == "ordinary (lam 0, no SN)" and r[1] == "64")
    gains = [
        res["tl_digitclutter-4_gain"]
        for res, c in zip(results, configs)
        if c["train_size"] == 64 and c["lam"] == 0 and c["sn_mu"] is None
    ]
    column = header.index("gain DC-4")
    assert row[2] == "3" and row[column] == f"{statistics.mean(gains):.3f} ± {statistics.stdev(gains):.3f}"
    certified = header.index("certified ε 0.02")
    assert row[certified] == "n/a"  # no certificate without spectral normalization


def test_correlations_and_figures(sweep_dir, tmp_path):
    out = tmp_path / "r" / "report.md"
    md = open(write_report(str(sweep_dir), str(out))).read()
    results = [json.loads(p.read_text())["result"] for p in sorted((sweep_dir / "trials").glob("*/result.json"))]
    configs = [json.loads(p.read_text())["config"] for p in sorted((sweep_dir / "trials").glob("*/result.json"))]
    at = [r for r, c in zip(results, configs) if c["train_size"] == 128]
    r = np.corrcoef([t["di"] for t in at], [t["tl_digitclutter-4_gain"] for t in at])[0, 1]
    line = next(row for row in _rows(md, "| benefit | train size |") if row[0] == "gain DC-4" and row[1] == "128")
    assert line[2] == "12" and line[3].startswith(f"{r:+.2f} [")
    for name in ("gain-di", "saved-di", "robust-di", "error-size"):
        figure = tmp_path / "r" / f"report-benefits-{name}.png"
        assert figure.read_bytes()[:4] == b"\x89PNG" and f"report-benefits-{name}.png" in md


def test_correlation_bounds_and_undefined_cases():
    r, lo, hi, n = correlation([0, 1, 2, 3], [1, 3, 5, 7])
    assert r == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0) and n == 4
    xs = list(range(30))
    ys = [x + 5 * math.sin(3 * x) for x in xs]
    r, lo, hi, n = correlation(xs, ys)
    assert lo <= r <= hi and hi - lo > 0.01 and n == 30
    assert all(math.isnan(v) for v in correlation([1, 2], [3, 4])[:3])  # too few pairs
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3])[0])  # no spread
    assert correlation([1, None, 2, 3, float("nan")], [1, 5, 2, 3, 4])[3] == 3


def test_variants_name_weight_sharing_the_update_and_the_objective():
    base = {"lam": 0.0, "sn_mu": None, "pcr": False, "objectives": "none"}
    assert variant_of(base) == ("ordinary", "ordinary (lam 0, no SN)")
    shared = dict(base, lam=1.0, objectives="extra-iterations:1")
    assert variant_of(shared) == ("weight-shared extra-iterations", "lam 1, extra-iterations:1")
    recall = dict(shared, pcr=True)
    assert variant_of(recall) == ("weight-shared PCR extra-iterations", "lam 1, PCR update, extra-iterations:1")
    assert variant_of(dict(base, objectives="fixed-point:10")) == ("fixed-point", "fixed-point:10")
    assert variant_of(dict(base, sn_mu=0.95, pcr=True)) == ("PCR", "PCR, SN mu 0.95")
    styles = {family_style(variant_of(row)[0]) for row in (base, shared, recall)}
    assert len(styles) == 3 and family_style("unknown") == ("C7", "o")  # each family its own colour and marker
