"""The sweep report: its tables equal the trials' own metrics, its groups' means and spreads are right,
and it draws the paper's figures."""

import dataclasses
import json
import statistics

import pytest
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments import sweep as sweeps
from itconv_fast.experiments.report import write_report

BASE = {"width": 2, "blocks": 2, "train_size": 128, "test_size": 64, "batch_size": 32, "epochs": 1}


@pytest.fixture
def sweep_dir(tmp_path):
    """A finished sweep with synthetic metrics: trials' result.json written as run_trial writes them."""
    spec = sweeps.parse_sweep(
        {
            "base": BASE,
            "grid": [{"lam": [0, 0.5], "seed": [0, 1, 2]}, {"sn_mu": [0.95], "pcr": [False, True], "seed": [0, 1]}],
        },
        "s.yaml",
    )
    out = tmp_path / "sweep"
    sweeps.check_out_dir(spec, str(out))
    for i, trial in enumerate(sweeps.expand(spec)):
        folder = tmp_path / "sweep" / "trials" / trial.name
        folder.mkdir(parents=True)
        row = {
            "final_test_error": 0.1 + 0.01 * i,
            "final_train_error": 0.05,
            "final_test_loss": 1.0,
            "chance_error": 0.99,
            "epochs_run": 1,
            "ci": 0.5 + 0.02 * i,
            "ri": 0.9,
            "di": None if i == 3 else 0.03 * i,
        }
        for s in (1, 2, 3):
            row.update({f"ci_s{s}": 0.4 + 0.01 * s, f"ri_s{s}": 0.9, f"di_s{s}": 0.1 * s + 0.01 * i})
        row.update({"train_seconds": 1.0, "indices_seconds": 0.1, "session_seconds": 1.2})
        (folder / "result.json").write_text(json.dumps({"config": dataclasses.asdict(trial.config), "result": row}))
    sweeps.collect_results(spec, str(out))
    return out


def _table(md, heading):
    section = md.split(f"## {heading}")[1].split("\n## ")[0]
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| trial |") and not line.startswith("| group |")
    ]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_every_trial_row_equals_its_own_metrics(sweep_dir):
    md = open(write_report(str(sweep_dir))).read()
    rows = _table(md, "Every trial")
    assert len(rows) == 10
    for cells in rows:
        own = json.loads((sweep_dir / "trials" / cells[0] / "result.json").read_text())["result"]
        assert cells[2] == f"{own['final_test_error']:.4f}"
        assert cells[3] == f"{own['ci']:.3f}" and cells[4] == f"{own['ri']:.3f}"
        assert cells[5] == ("n/a" if own["di"] is None else f"{own['di']:.3f}")
        assert cells[6:9] == [f"{own['ci_s1']:.3f}", f"{own['ri_s1']:.3f}", f"{own['di_s1']:.3f}"]


def test_group_means_and_spreads_over_seeds(sweep_dir):
    md = open(write_report(str(sweep_dir))).read()
    groups = {cells[0]: cells for cells in _table(md, "Groups")}
    # lam > 0 starts recurrent (init auto): the group says so.
    assert set(groups) == {
        "lam=0, sn_mu=none, pcr=False, init=nonrecurrent",
        "lam=0.5, sn_mu=none, pcr=False, init=recurrent",
        "lam=0, sn_mu=0.95, pcr=False, init=nonrecurrent",
        "lam=0, sn_mu=0.95, pcr=True, init=nonrecurrent",
    }
    cells = groups["lam=0.5, sn_mu=none, pcr=False, init=recurrent"]
    own = [
        json.loads((sweep_dir / "trials" / f"lam=0.5,seed={s}" / "result.json").read_text())["result"] for s in range(3)
    ]
    assert cells[1] == "3"
    errors = [r["final_test_error"] for r in own]
    assert cells[2] == f"{statistics.mean(errors):.4f} ± {statistics.stdev(errors):.4f}"
    # An undefined index (None) is left out of its group's mean, not counted as 0.
    di = [r["di"] for r in own if r["di"] is not None]
    assert cells[5] == f"{statistics.mean(di):.3f} ± {(statistics.stdev(di) if len(di) > 1 else 0):.3f}"


def test_figures_are_drawn_and_linked(sweep_dir, tmp_path):
    out = tmp_path / "elsewhere" / "paper.md"
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    for fig in ("fig2b", "fig3a", "fig3b", "fig3c", "fig4a"):
        name = f"paper-{fig}.png"
        assert f"]({name})" in md
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_directory_without_results_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "results.csv" in result.output


def test_objectives_get_the_error_against_di_figure_and_stay_out_of_the_papers_figures(tmp_path):
    spec = sweeps.parse_sweep(
        {
            "base": BASE,
            "grid": [
                {"objectives": [{"fixed-point": 1.0}, {"extra-iterations": 0.5}], "seed": [0, 1]},
                {"seed": [0, 1]},
                {"sn_mu": [0.95], "pcr": [False, True], "seed": [0]},
            ],
        },
        "s.yaml",
    )
    out = tmp_path / "sweep"
    sweeps.check_out_dir(spec, str(out))
    trials = sweeps.expand(spec)
    assert [t.name for t in trials][:2] == ["objectives=fixed-point:1,seed=0", "objectives=fixed-point:1,seed=1"]
    for i, trial in enumerate(trials):
        folder = out / "trials" / trial.name
        folder.mkdir(parents=True)
        row = {
            "final_test_error": 0.1 + 0.01 * i,
            "final_train_error": 0.05,
            "final_test_loss": 1.0,
            "chance_error": 0.99,
            "epochs_run": 1,
            "ci": 0.5,
            "ri": 0.9,
            "di": 0.05 * i,
            "ci_s1": 0.5,
            "ri_s1": 0.9,
            "di_s1": 0.05 * i,
            "train_seconds": 1.0,
        }
        (folder / "result.json").write_text(json.dumps({"config": dataclasses.asdict(trial.config), "result": row}))
    rows = sweeps.collect_results(spec, str(out))
    assert rows[0]["objectives"] == "fixed-point:1" and rows[4]["objectives"] == "none"
    md = open(write_report(str(out))).read()
    assert (out / "report-error-di.png").stat().st_size > 10_000
    assert "objectives=fixed-point:1" in md and "objectives=extra-iterations:0.5" in md
    # Fig 2b (ordinary networks) draws only the two trials without objectives or SN.
    from itconv_fast.experiments.report import _is_plain, read_results

    assert sum(_is_plain(r) for r in read_results(str(out))) == 2


def test_reference_trials_at_the_same_scale_join_the_report(tmp_path, sweep_dir):
    """`report --with OTHER/results.csv`: the other sweep's trials at this sweep's scale join the tables and the
    figures, marked by their source; trials at another scale stay out."""
    spec = sweeps.parse_sweep({"base": BASE, "grid": {"objectives": [{"fixed-point": 1.0}], "seed": [0, 1]}}, "o.yaml")
    out = tmp_path / "objectives"
    sweeps.check_out_dir(spec, str(out))
    for i, trial in enumerate(sweeps.expand(spec)):
        folder = out / "trials" / trial.name
        folder.mkdir(parents=True)
        row = {
            "final_test_error": 0.2,
            "final_train_error": 0.1,
            "final_test_loss": 1.0,
            "chance_error": 0.99,
            "epochs_run": 1,
            "ci": 0.5,
            "ri": 0.9,
            "di": 0.1 * i,
            "ci_s1": 0.5,
            "ri_s1": 0.9,
            "di_s1": 0.1,
            "ci_s2": 0.5,
            "ri_s2": 0.9,
            "di_s2": 0.1,
            "ci_s3": 0.5,
            "ri_s3": 0.9,
            "di_s3": 0.1,
            "train_seconds": 1.0,
        }
        (folder / "result.json").write_text(json.dumps({"config": dataclasses.asdict(trial.config), "result": row}))
    sweeps.collect_results(spec, str(out))
    other = tmp_path / "other.csv"  # the fixture's sweep at another width: not joined
    other.write_text((sweep_dir / "results.csv").read_text().replace(",2,2,3,", ",16,2,3,"))
    result = CliRunner().invoke(
        main, ["report", str(out), "--with", str(sweep_dir / "results.csv"), "--with", str(other)]
    )
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    every = _table(md, "Every trial")
    assert len(every) == 2 + 10 and sum("(sweep)" in cells[0] for cells in every) == 10
    assert "10 trials at the same scale" in md and "0 trials at the same scale" in md
    assert (out / "report-error-di.png").exists() and (out / "report-fig4a.png").exists()
