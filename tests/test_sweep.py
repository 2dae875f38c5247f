"""Sweeps: file validation, trial expansion, refusal of a changed sweep, and a real local Ray Tune run that
is killed and resumed (only the missing trial runs again, from its last epoch checkpoint)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments import sweep as sweeps

BASE = {"width": 2, "blocks": 2, "train_size": 128, "test_size": 64, "batch_size": 32, "epochs": 2}


def _write(path, values):
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def test_grid_expands_in_order_with_names_and_without_duplicates(tmp_path):
    spec = sweeps.parse_sweep(
        {"base": BASE, "grid": [{"lam": [0, 0.5], "sn_mu": [None, 0.95]}, {"lam": [0], "pcr": [False, True]}]}, "s.yaml"
    )
    trials = sweeps.expand(spec)
    names = [t.name for t in trials]
    # lam=0,pcr=false is the configuration of lam=0,sn_mu=none: listed once.
    assert names == [
        "lam=0,sn_mu=none",
        "lam=0,sn_mu=0.95",
        "lam=0.5,sn_mu=none",
        "lam=0.5,sn_mu=0.95",
        "lam=0,pcr=true",
    ]
    assert trials[1].config.sn_mu == 0.95 and trials[1].config.width == 2 and trials[4].config.pcr is True
    assert spec.indices["extra_iterations"] == 16


@pytest.mark.parametrize(
    "values,match",
    [
        ([1, 2], "mapping"),
        ({"base": BASE, "grid": {"lam": [0]}, "extra": 1}, "unknown top-level key extra"),
        ({"base": BASE, "grid": {"lamb": [0]}}, "unknown option 'lamb'"),
        ({"base": BASE, "grid": {"lam": 0.5}}, "non-empty list"),
        ({"base": BASE, "grid": {"lam": [0, 2]}}, r"trial \{'lam': 2\}: lam"),
        ({"base": {**BASE, "blocks": 0}, "grid": {"lam": [0]}}, "blocks"),
        ({"base": BASE, "grid": {"preset": ["quick"]}}, "preset cannot vary"),
        ({"base": BASE, "grid": {"lam": [0]}, "indices": {"extra_iterations": 0}}, "extra_iterations"),
        ({"base": BASE, "grid": {"lam": [0]}, "indices": {"benefits": ["speed"]}}, "benefits must be"),
        ({"base": BASE, "grid": {"lam": [0]}, "indices": {"benefits": []}}, "benefits must be"),
    ],
)
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, values, match):
    path = _write(tmp_path / "s.yaml", values)
    with pytest.raises(sweeps.SweepError, match=match):
        sweeps.load_sweep(path)
    result = CliRunner().invoke(main, ["sweep", path, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()


def test_a_changed_sweep_file_against_an_existing_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    first = sweeps.parse_sweep({"base": BASE, "grid": {"lam": [0, 1]}}, "a.yaml")
    sweeps.check_out_dir(first, str(out))
    sweeps.check_out_dir(first, str(out))  # the same sweep: fine
    changed = sweeps.parse_sweep({"base": BASE, "grid": {"lam": [0, 0.5]}}, "b.yaml")
    with pytest.raises(sweeps.SweepError, match="different sweep.*grid"):
        sweeps.check_out_dir(changed, str(out))
    path = _write(tmp_path / "b.yaml", {"base": BASE, "grid": {"lam": [0, 0.5]}})
    result = CliRunner().invoke(main, ["sweep", path, "--out", str(out)])
    assert result.exit_code == 2 and "different sweep" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(sweeps.SweepError, match="not empty"):
        sweeps.check_out_dir(first, str(tmp_path / "busy"))


@pytest.mark.slow
def test_a_trial_with_benefits_writes_them_and_their_columns(tmp_path, monkeypatch):
    """indices: benefits: the trial measures them after its indices (benefits.json) and its row gains their
    columns; a sweep file without it keeps its stored form (no benefits key)."""
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    plain = sweeps.parse_sweep({"base": BASE, "grid": {"lam": [0]}}, "s.yaml")
    assert "benefits" not in plain.canonical()["indices"]
    spec = sweeps.parse_sweep(
        {
            "base": {**BASE, "epochs": 1},
            "grid": {"sn_mu": [0.95]},
            "indices": {"extra_iterations": 2, "benefits": ["thinking-longer", "adaptive-depth", "robustness"]},
        },
        "s.yaml",
    )
    (trial,) = sweeps.expand(spec)
    row = sweeps.run_trial(trial.config, str(tmp_path / "t"), spec.indices)
    found = json.loads((tmp_path / "t" / "benefits.json").read_text())
    assert row["status"] == "ok" and row["benefits_seconds"] > 0
    assert row["tl_digitclutter-5_gain"] == found["thinking_longer"]["digitclutter-5"]["gain"]
    assert row["ad_compute_saved"] == found["adaptive_depth"]["compute_saved"]
    assert row["pgd_error_eps0.1"] == found["robustness"]["pgd_errors"][2]
    assert row["certified_eps0.01"] == found["robustness"]["certified_shares"][0]


def test_remeasure_adds_benefits_to_a_finished_sweep_without_training(tmp_path, monkeypatch):
    """A sweep that ran without benefits gains them with --remeasure: every row its benefit columns, the same
    indices, nothing trained again; a changed grid is refused."""
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    grid = {"lam": [0, 1]}
    plain = {"base": {**BASE, "epochs": 1}, "grid": grid, "indices": {"extra_iterations": 2}}
    spec = sweeps.parse_sweep(plain, "s.yaml")
    out = tmp_path / "sweep"
    sweeps.check_out_dir(spec, str(out))
    for trial in sweeps.expand(spec):
        sweeps.run_trial(trial.config, sweeps.trial_dir(str(out), trial), spec.indices)
    before = {r["trial"]: r for r in sweeps.collect_results(spec, str(out))}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/checkpoint.pt")}
    assert not any(k.startswith("tl_") for k in next(iter(before.values())))
    with_benefits = {**plain, "indices": {"extra_iterations": 2, "benefits": ["thinking-longer", "adaptive-depth"]}}
    result = CliRunner().invoke(main, ["sweep", _write(tmp_path / "b.yaml", with_benefits), "--out", str(out),
                                       "--remeasure"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "measuring lam=0" in result.output and "(2 trials)" in result.output
    with open(out / "results.csv", newline="") as f:
        after = {r["trial"]: r for r in csv.DictReader(f)}
    for name, row in after.items():
        for key in ("ci", "ri", "di", "train_seconds"):  # measured again the same; not trained again
            assert row[key] == ("" if before[name][key] is None else str(before[name][key]))
        assert row["tl_digitclutter-4_gain"] != "" and row["ad_compute_saved"] != ""
        assert "pgd_error_eps0.05" not in row  # robustness was not asked for
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/checkpoint.pt")} == stamps
    assert "benefits" in yaml.safe_load((out / "sweep.yaml").read_text())["indices"]
    changed = {**with_benefits, "grid": {"lam": [0, 0.5]}}
    result = CliRunner().invoke(main, ["sweep", _write(tmp_path / "c.yaml", changed), "--out", str(out), "--remeasure"])
    assert result.exit_code == 2 and "differs in grid" in result.output
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "none"),
                                       "--remeasure"])  # fmt: skip
    assert result.exit_code == 2 and "no sweep.yaml" in result.output


def test_killed_sweep_resumes_only_the_missing_trial(tmp_path):
    """Two trials, one at a time on a real local Ray instance (2 CPUs, 2 per trial). The driver's whole
    process group is SIGKILLed once the first trial has finished and the second has a checkpoint; the rerun
    skips the first (its files untouched) and resumes the second from its last epoch."""
    pytest.importorskip("ray.tune")
    spec = {"base": BASE, "grid": {"epochs": [2, 40]}, "indices": {"extra_iterations": 2}}
    path = _write(tmp_path / "sweep.yaml", spec)
    out = tmp_path / "out"
    env = dict(os.environ, ITCONV_FAST_CACHE=str(tmp_path / "cache"), RAY_DEDUP_LOGS="0")
    cmd = [
        sys.executable,
        "-m",
        "itconv_fast.cli.app",
        "sweep",
        path,
        "--out",
        str(out),
        "--cpus-per-run",
        "2",
        "--quiet",
    ]
    first, second = out / "trials" / "epochs=2", out / "trials" / "epochs=40"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (first / "result.json").exists() and (second / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "result.json").exists() and not (second / "result.json").exists()
    finished_before = json.loads((second / "metrics.json").read_text())["epochs"]
    assert 1 <= len(finished_before) < 40
    stamp = {name: (first / name).stat().st_mtime_ns for name in ("result.json", "checkpoint.pt", "metrics.json")}

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 trials, 1 already finished, running 1" in result.stdout
    assert {name: (first / name).stat().st_mtime_ns for name in stamp} == stamp  # not run again
    metrics = json.loads((second / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 41))
    assert metrics["resumed_at_epochs"] and metrics["resumed_at_epochs"][0] >= len(finished_before)
    assert metrics["epochs"][: len(finished_before)] == finished_before  # finished epochs kept, not retrained
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["epochs=2", "epochs=40"]
    for row, trial in zip(rows, (first, second)):
        own = json.loads((trial / "result.json").read_text())["result"]
        assert float(row["final_test_error"]) == own["final_test_error"]
        assert int(row["epochs_run"]) == int(row["epochs"])
        indices = json.loads((trial / "indices.json").read_text())
        assert row["di_s1"] == ("" if indices["stages"][0]["di"] is None else str(indices["stages"][0]["di"]))
    # The report's per-trial table is these trials' own numbers.
    from itconv_fast.experiments.report import write_report

    every_trial = open(write_report(str(out))).read().split("## Every trial")[1]
    for trial in (first, second):
        own = json.loads((trial / "result.json").read_text())["result"]
        line = next(line for line in every_trial.splitlines() if line.startswith(f"| {trial.name} |"))
        assert line.split(" | ")[2] == f"{own['final_test_error']:.4f}"


def test_auth_token_file_is_checked_and_set_for_the_driver_only(tmp_path, monkeypatch):
    from itconv_fast.experiments.ray_auth import check_auth_token_file, ray_auth

    token = tmp_path / "auth_token"
    token.write_text("0123abcd\n")
    check_auth_token_file(str(token))
    for content, match in (("", "not a Ray auth token"), ("two words", "not a Ray auth token")):
        bad = tmp_path / "bad"
        bad.write_text(content)
        with pytest.raises(ValueError, match=match):
            check_auth_token_file(str(bad))
    with pytest.raises(ValueError, match="cannot be read"):
        check_auth_token_file(str(tmp_path / "missing"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with ray_auth(str(token)):
        assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
        assert "RAY_AUTH_TOKEN" not in os.environ
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ
    assert os.environ["RAY_AUTH_TOKEN"] == "from-the-environment"


def test_auth_token_file_usage_errors_write_nothing(tmp_path):
    path = _write(tmp_path / "sweep.yaml", {"base": BASE, "grid": {"seed": [0]}})
    out = tmp_path / "out"
    token = tmp_path / "auth_token"
    token.write_text("")
    alone = CliRunner().invoke(main, ["sweep", path, "--out", str(out), "--auth-token-file", str(token)])
    assert alone.exit_code == 2 and "goes with --address" in alone.output
    empty = CliRunner().invoke(
        main, ["sweep", path, "--out", str(out), "--address", "127.0.0.1:1", "--auth-token-file", str(token)]
    )
    assert empty.exit_code == 2 and "not a Ray auth token" in empty.output and str(token) in empty.output
    assert not out.exists()


@pytest.mark.slow
def test_a_sweep_runs_on_a_cluster_with_token_authentication(tmp_path):
    """`ray start --head` with token authentication (Ray's default there): the sweep connects with
    --auth-token-file and runs; without it, one line says what to pass."""
    pytest.importorskip("ray.tune")
    import secrets
    import shutil
    import socket

    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray_cli, "the ray command is installed with ray[tune]"
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(
        os.environ,
        ITCONV_FAST_CACHE=str(tmp_path / "cache"),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_TMPDIR=ray_tmp,
    )
    env.pop("RAY_AUTH_TOKEN", None)
    # --block: the head's processes live in this process's session, so that killing it stops this cluster alone
    # (`ray stop` would stop every Ray on the machine, another test's included).
    start = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--block"]
    head = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(0.5)
    try:
        path = _write(tmp_path / "sweep.yaml", {"base": dict(BASE, epochs=1), "grid": {"seed": [0]}})
        driver_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        driver_env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token to fall back on
        cmd = [sys.executable, "-m", "itconv_fast.cli.app", "sweep", path, "--address", f"127.0.0.1:{port}"]
        refused = subprocess.run(
            cmd + ["--out", str(tmp_path / "refused"), "--quiet"],
            env=driver_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode != 0 and "--auth-token-file" in refused.stdout + refused.stderr
        ran = subprocess.run(
            cmd + ["--out", str(tmp_path / "out"), "--quiet", "--auth-token-file", str(token)],
            env=driver_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert (tmp_path / "out" / "results.csv").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
