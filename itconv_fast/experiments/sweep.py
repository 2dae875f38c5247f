"""Sweeps over training configurations on Ray Tune: every trial trains, then measures the indices of its
final network; one table of all trials in DIR/results.csv.

    itconv-fast sweep SWEEP.yaml --out DIR [--address ADDR] [--cpus-per-run N] [--gpus-per-run G]

A sweep file is YAML:

    base:                 # a train configuration (the keys of `itconv-fast train --config`)
      preset: quick
      epochs: 8
    grid:                 # the cartesian product of these lists; a list of such mappings is a union of grids
      lam: [0, 0.5, 1]
      seed: [0, 1, 2]
    indices:              # optional: how the indices are measured after training
      extra_iterations: 16
      benefits: [thinking-longer, adaptive-depth, robustness]   # optional: benefits.json and its columns

Trials are named after their grid values (`lam=0.5,seed=1`) and write to DIR/trials/<name>/ what
`itconv-fast train` writes (config.yaml, metrics.json, metrics.csv, tensorboard/, checkpoint.pt), plus
indices.json and result.json (the row of results.csv; its presence marks the trial finished).

Ray schedules the trials: with no address it starts on this machine (all its CPUs); with `--address` the
same sweep runs on an existing Ray cluster (DIR must then be a path every node sees, e.g. a shared file
system, and every node needs itconv-fast installed). Rerunning the same command after any kill finishes
only what is missing: finished trials are skipped, unfinished ones resume from their last epoch
checkpoint (Ray also retries a trial whose worker died, which resumes the same way). A changed sweep file
against an existing DIR is refused.

Expanding a sweep file, running its trials and collecting their results are one cohesive thing (the trial
directories, the result columns and the statuses are shared by all three); past 400 lines only since the
formatter lays calls out one argument a line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..io.checkpoint import atomic_write_json, atomic_write_text, json_safe
from .benefits import BENEFIT_MEASURES
from .compilation import sweep_compile_cache_dir, use_compile_cache
from .config import FIELDS, ConfigError, TrainConfig, build_config, read_yaml
from .ray_auth import check_auth_token_file, ray_auth
from .sweep_lock import LOCK_NAME, SweepLocked, sweep_lock  # noqa: F401 (SweepLocked: what run_sweep raises)
from .trial_measures import MEASURED_PREFIXES, measure_trial

__all__ = [
    "SweepSpec",
    "Trial",
    "SweepError",
    "load_sweep",
    "expand",
    "run_sweep",
    "run_trial",
    "collect_results",
    "remeasure",
    "RESULT_COLUMNS",
    "pending",
    "check_out_dir",
    "trial_status",
    "STATUSES",
    "SweepLocked",
]

MAX_TRIALS = 10_000  # a grid larger than this is a mistake (or an attack), not a sweep
INDEX_OPTIONS = {"extra_iterations": 16, "batch_size": 512, "test_size": None, "method": "cached"}
STATUSES = ("ok", "diverged", "failed")  # of a trial, in results.csv's status column (with its reason)
RESULT_COLUMNS = (
    "status",
    "reason",
    "final_test_error",
    "final_train_error",
    "final_test_loss",
    "chance_error",
    "epochs_run",
    "ci",
    "ri",
    "di",
)  # then ci_s1, ri_s1, di_s1, ... per stage, then train_seconds, indices_seconds


class SweepError(ValueError):
    """A sweep file or directory that cannot be used (names the file or the directory)."""


@dataclass
class Trial:
    name: str
    overrides: dict  # the grid values that define it
    config: TrainConfig


@dataclass
class SweepSpec:
    base: dict
    grid: list  # of {key: [values]}
    indices: dict = field(default_factory=lambda: dict(INDEX_OPTIONS))
    source: Optional[str] = None

    def canonical(self) -> dict:
        """What identifies the sweep: compared against DIR/sweep.yaml on a rerun."""
        return {"base": self.base, "grid": self.grid, "indices": self.indices}


def _yaml():
    import yaml

    return yaml


def parse_sweep(values, where: str) -> SweepSpec:
    if not isinstance(values, dict):
        raise SweepError(f"{where}: a sweep file is a mapping with base, grid and (optionally) indices")
    unknown = sorted(
        k if isinstance(k, str) and k.isidentifier() else repr(k)
        for k in values
        if k not in ("base", "grid", "indices")
    )
    if unknown:
        raise SweepError(f"{where}: unknown top-level key {', '.join(unknown)} (known: base, grid, indices)")
    base = values.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{where}: base must be a mapping of train options")
    grid = values.get("grid")
    if grid is None:
        grid = [{}]
    if isinstance(grid, dict):
        grid = [grid]
    if not isinstance(grid, list) or not grid or not all(isinstance(g, dict) for g in grid):
        raise SweepError(f"{where}: grid must be a mapping of option: [values], or a list of such mappings")
    for g in grid:
        for key, options in g.items():
            if key not in FIELDS:
                raise SweepError(f"{where}: grid: unknown option {key!r} (known: {', '.join(FIELDS)})")
            if key == "preset":
                raise SweepError(f"{where}: grid: preset cannot vary (set it in base)")
            if not isinstance(options, list) or not options:
                raise SweepError(f"{where}: grid: {key} must be a non-empty list of values, got {options!r}")
    count = sum(math.prod(len(options) for options in g.values()) for g in grid)
    if count > MAX_TRIALS:
        raise SweepError(f"{where}: the grid has {count} trials; at most {MAX_TRIALS} (split it into several sweeps)")
    indices = dict(INDEX_OPTIONS)
    given = values.get("indices") or {}
    if not isinstance(given, dict) or set(given) - set(INDEX_OPTIONS) - {"benefits"}:
        raise SweepError(f"{where}: indices takes only {', '.join(INDEX_OPTIONS)}, benefits")
    indices.update(given)
    if "benefits" in indices:  # only when given: a sweep directory made without it keeps its stored spec
        chosen = indices["benefits"]
        if not isinstance(chosen, list) or not chosen or not set(chosen) <= set(BENEFIT_MEASURES):
            raise SweepError(f"{where}: indices: benefits must be a non-empty list of {', '.join(BENEFIT_MEASURES)}")
    for key in ("extra_iterations", "batch_size"):
        if isinstance(indices[key], bool) or not isinstance(indices[key], int) or not 1 <= indices[key] <= 2**31 - 1:
            raise SweepError(f"{where}: indices: {key} must be an integer >= 1, got {indices[key]!r}")
    size = indices["test_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 2**31 - 1):
        raise SweepError(f"{where}: indices: test_size must be an integer >= 1 or null")
    if indices["method"] not in ("cached", "reference"):
        raise SweepError(f"{where}: indices: method must be cached or reference")
    spec = SweepSpec(base=dict(base), grid=[dict(g) for g in grid], indices=indices, source=where)
    expand(spec)  # every trial's configuration is checked now, before anything runs or is written
    return spec


def load_sweep(path: str) -> SweepSpec:
    return parse_sweep(read_yaml(path, SweepError), path)


def _format(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):  # objectives: {name: weight} -> name:weight+name:weight ("none" when empty)
        return "+".join(f"{k}:{_format(v)}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def expand(spec: SweepSpec) -> list:
    """The trials of a sweep, in grid order; duplicates (the same configuration from two grids) once."""
    base = dict(spec.base)
    preset = base.pop("preset", "quick")
    trials, seen = [], {}
    for g in spec.grid:
        keys = list(g)
        for combo in itertools.product(*(g[k] for k in keys)):
            overrides = dict(zip(keys, combo))
            try:
                config = build_config(preset, {**base, **overrides})
            except ConfigError as exc:
                where = spec.source or "sweep"
                raise SweepError(f"{where}: trial {overrides or '(base)'}: {exc}") from None
            key = json.dumps(dataclasses.asdict(config), sort_keys=True)
            if key in seen:
                continue
            name = ",".join(f"{k}={_format(v)}" for k, v in overrides.items()) or "base"
            name = name.replace("/", "_")
            seen[key] = name
            trials.append(Trial(name, overrides, config))
    return trials


def check_out_dir(spec: SweepSpec, out_dir: str, new_indices: bool = False) -> None:
    """A new DIR gets sweep.yaml; an existing one must hold the same sweep (with new_indices, the same base and
    grid: its sweep.yaml then takes the spec's indices block)."""
    yaml = _yaml()
    path = os.path.join(out_dir, "sweep.yaml")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise SweepError(f"{path}: not readable ({exc})") from None
        keys = ("base", "grid") if new_indices else ("base", "grid", "indices")
        changed = [k for k in keys if (stored or {}).get(k) != spec.canonical()[k]]
        if changed or not isinstance(stored, dict) or set(stored) != {"base", "grid", "indices"}:
            raise SweepError(
                f"{out_dir} holds a different sweep (its sweep.yaml differs in {', '.join(changed) or 'form'}); "
                "rerun with the sweep file it was started with, or choose another --out"
            )
        if stored != spec.canonical():  # new_indices: the measures the trials now hold
            atomic_write_text(path, yaml.safe_dump(spec.canonical(), sort_keys=False))
        return
    if os.path.isdir(out_dir) and [name for name in os.listdir(out_dir) if name != LOCK_NAME]:
        raise SweepError(f"{out_dir} is not empty and holds no sweep.yaml: choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(spec.canonical(), sort_keys=False))


def trial_dir(out_dir: str, trial: Trial) -> str:
    return os.path.join(out_dir, "trials", trial.name)


def _stored_result(out_dir: str, trial: Trial):
    """The trial's result.json as {"config", "result"} when it is readable, is this configuration's and has a
    known status (files from before statuses existed are "ok"); else None."""
    path = os.path.join(trial_dir(out_dir, trial), "result.json")
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("config") != dataclasses.asdict(trial.config):
        return None
    result = stored.get("result")
    if not isinstance(result, dict) or result.get("status", "ok") not in STATUSES:
        return None
    return stored


def trial_status(out_dir: str, trial: Trial):
    """The status in the trial's result.json ("ok", "diverged" or "failed"), or None when it has no readable
    result for this configuration."""
    stored = _stored_result(out_dir, trial)
    return None if stored is None else stored["result"].get("status", "ok")


def _finished(out_dir: str, trial: Trial, retry_diverged: bool = False) -> bool:
    status = trial_status(out_dir, trial)
    return status == "ok" or (status == "diverged" and not retry_diverged)


def pending(spec: SweepSpec, out_dir: str, retry_diverged: bool = False) -> list:
    """The trials of `spec` without a finished result in out_dir: never run, failed, or (with retry_diverged)
    diverged. A diverged trial is a result (the configuration diverges) and is not retried unless asked."""
    return [t for t in expand(spec) if not _finished(os.path.abspath(out_dir), t, retry_diverged)]


def _write_result(out: str, config: TrainConfig, row: dict) -> None:
    atomic_write_json(
        os.path.join(out, "result.json"), {"config": dataclasses.asdict(config), "result": json_safe(row)}
    )


def run_trial(config: TrainConfig, out: str, indices: dict, report=None, retry_diverged: bool = False) -> dict:
    """Trains one configuration in `out` (resuming from its checkpoint if there is one), measures its
    indices, writes indices.json and result.json; returns the result row. `report(dict)` gets every epoch's
    metrics (Ray Tune's tune.report in a sweep). A run that diverges is a result with status "diverged" and
    the reason (no indices); retry_diverged restarts a diverged run from its last good epoch."""
    from . import training
    from .divergence import TrainingDiverged

    started = time.perf_counter()
    resume = os.path.exists(os.path.join(out, "checkpoint.pt")) or training.previous_divergence(out) is not None
    try:
        metrics = training.train(
            config, out, resume=resume, progress=False, on_epoch=report, restart_diverged=retry_diverged
        )
    except TrainingDiverged as exc:
        row = {
            "status": "diverged",
            "reason": exc.describe(),
            "epochs_run": exc.record.get("epoch", 1) - 1,
            "session_seconds": time.perf_counter() - started,
        }
        _write_result(out, config, row)
        return row
    last = metrics["epochs"][-1]
    row = {
        "status": "ok",
        "reason": "",
        "final_test_error": last["test_error"],
        "final_train_error": last["train_error"],
        "final_test_loss": last["test_loss"],
        "chance_error": metrics["chance_error"],
        "epochs_run": len(metrics["epochs"]),
    }
    for key, value in measure_trial(out, indices, device=config.device).items():
        if key == "indices_seconds":  # the columns' order: indices, train_seconds, indices_seconds, benefits
            row["train_seconds"] = sum(e["seconds"] for e in metrics["epochs"])
        row[key] = value
    row["session_seconds"] = time.perf_counter() - started
    _write_result(out, config, row)
    return row


def _tune_trainable(space: dict) -> None:
    """Ray Tune's function trainable: one trial (runs in a Ray worker process); `space["trial"]` is the
    grid point Tune sampled."""
    import torch
    from ray import tune

    params = space["trial"]
    torch.set_num_threads(max(1, int(params["threads"])))
    if params.get("compile_cache"):  # every trial compiles into the sweep's cache: the first compiles, the rest load
        use_compile_cache(params["compile_cache"])
    config = TrainConfig(**params["config"])
    try:
        row = run_trial(
            config,
            params["dir"],
            params["indices"],
            report=lambda record: tune.report(dict(record)),
            retry_diverged=params.get("retry_diverged", False),
        )
    except Exception as exc:  # a crashed trial: recorded as failed (Ray retries it; a success overwrites this)
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        os.makedirs(params["dir"], exist_ok=True)
        _write_result(params["dir"], config, {"status": "failed", "reason": reason})
        raise
    tune.report({**json_safe(row), "done": True})


def run_sweep(
    spec: SweepSpec,
    out_dir: str,
    *,
    address: Optional[str] = None,
    cpus_per_run: float = 1,
    gpus_per_run: float = 0,
    verbose: int = 1,
    retry_diverged: bool = False,
    auth_token_file: Optional[str] = None,
) -> list:
    """Runs the trials of `spec` that are not finished in out_dir on Ray Tune, then writes results.csv.
    Returns the result rows (one per trial with a result, in grid order). A diverged trial is a result and is
    not run again unless retry_diverged; a failed one is run again. auth_token_file: the token of a cluster
    started with Ray's token authentication (`ray start --head` enables it by default; the head's token is in
    its ~/.ray/auth_token, `ray get-auth-token` prints it), for `address`."""
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise SweepError("cpus per run must be > 0 and gpus per run >= 0")
    out_dir = os.path.abspath(out_dir)
    check_out_dir(spec, out_dir)
    if auth_token_file is not None:
        try:
            check_auth_token_file(auth_token_file)
        except ValueError as exc:
            raise SweepError(str(exc)) from None
    with sweep_lock(out_dir), ray_auth(auth_token_file):  # one driver per directory (SweepLocked names the live one)
        return _run_locked(spec, out_dir, address, cpus_per_run, gpus_per_run, verbose, retry_diverged)


def _run_locked(spec, out_dir, address, cpus_per_run, gpus_per_run, verbose, retry_diverged) -> list:
    todo = pending(spec, out_dir, retry_diverged)
    if todo:
        import ray
        from ray import tune

        started_here = not ray.is_initialized()
        if started_here:
            kwargs = dict(include_dashboard=False, log_to_driver=verbose > 1, configure_logging=verbose > 1)
            if address is None:
                ray.init(num_cpus=os.cpu_count(), **kwargs)
            else:
                try:
                    ray.init(address=address, **kwargs)
                except (ray.exceptions.AuthenticationError, ConnectionError) as exc:
                    # A cluster with token authentication refuses a driver without its token; Ray then says only
                    # that it could not connect (its log says "Unauthenticated").
                    raise SweepError(
                        f"could not connect to the Ray cluster at {address} ({getattr(exc, 'message', exc)}). If it "
                        "runs Ray's token authentication (the default of `ray start --head`), pass its token with "
                        "--auth-token-file (the head's ~/.ray/auth_token, or what `ray get-auth-token` prints)"
                    ) from None
        try:
            space = [
                {
                    "name": t.name,
                    "dir": trial_dir(out_dir, t),
                    "config": dataclasses.asdict(t.config),
                    "indices": spec.indices,
                    "threads": max(1, int(cpus_per_run)),
                    "retry_diverged": retry_diverged,
                    "compile_cache": sweep_compile_cache_dir(out_dir),
                }
                for t in todo
            ]
            tuner = tune.Tuner(
                tune.with_resources(_tune_trainable, {"cpu": cpus_per_run, "gpu": gpus_per_run}),
                param_space={"trial": tune.grid_search(space)},
                tune_config=tune.TuneConfig(
                    trial_name_creator=lambda t: t.config["trial"]["name"],
                    trial_dirname_creator=lambda t: t.config["trial"]["name"],
                ),
                run_config=tune.RunConfig(
                    name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=os.path.join(out_dir, "ray"),
                    verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=2),
                ),
            )
            results = tuner.fit()
            errors = [r.error for r in results if r.error is not None]
        finally:
            if started_here:
                ray.shutdown()
        if errors:
            collect_results(spec, out_dir)
            raise SweepError(
                f"{len(errors)} trial(s) failed (first: {str(errors[0]).strip().splitlines()[-1]}); "
                f"rerun the same command to retry them"
            )
    return collect_results(spec, out_dir)


def collect_results(spec: SweepSpec, out_dir: str) -> list:
    """DIR/results.csv from the trials' result.json (grid order; every status: ok, diverged, failed, with the
    reason); returns the rows."""
    rows = []
    for t in expand(spec):
        stored = _stored_result(out_dir, t)
        if stored is None:
            continue
        config = {k: (_format(v) if isinstance(v, dict) else v) for k, v in stored["config"].items()}
        rows.append({"trial": t.name, **config, "status": "ok", "reason": "", **stored["result"]})
    columns = ["trial", *FIELDS]
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(os.path.join(out_dir, "results.csv"), text.getvalue())
    return rows


def remeasure(spec: SweepSpec, out_dir: str, on_trial=None) -> list:
    """Measures every finished (status ok) trial of out_dir again with this version's measures and the spec's
    indices block (which may differ from the one the sweep ran with; base and grid may not), without training:
    rewrites their indices.json, benefits.json and result rows, then results.csv. For a sweep whose measures
    changed, or that should gain its benefits. on_trial(name) is called before each."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.exists(os.path.join(out_dir, "sweep.yaml")):
        raise SweepError(f"{out_dir} holds no sweep to measure again (no sweep.yaml)")
    with sweep_lock(out_dir):
        check_out_dir(spec, out_dir, new_indices=True)
        for t in expand(spec):
            stored = _stored_result(out_dir, t)
            if stored is None or stored["result"].get("status", "ok") != "ok":
                continue
            if on_trial is not None:
                on_trial(t.name)
            row = {k: v for k, v in stored["result"].items() if not k.startswith(MEASURED_PREFIXES)}
            row.update(measure_trial(trial_dir(out_dir, t), spec.indices, device=t.config.device))
            _write_result(trial_dir(out_dir, t), t.config, row)
        return collect_results(spec, out_dir)
