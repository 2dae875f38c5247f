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

Trials are named after their grid values (`lam=0.5,seed=1`) and write to DIR/trials/<name>/ what
`itconv-fast train` writes (config.yaml, metrics.json, metrics.csv, tensorboard/, checkpoint.pt), plus
indices.json and result.json (the row of results.csv; its presence marks the trial finished).

Ray schedules the trials: with no address it starts on this machine (all its CPUs); with `--address` the
same sweep runs on an existing Ray cluster (DIR must then be a path every node sees, e.g. a shared file
system, and every node needs itconv-fast installed). Rerunning the same command after any kill finishes
only what is missing: finished trials are skipped, unfinished ones resume from their last epoch
checkpoint (Ray also retries a trial whose worker died, which resumes the same way). A changed sweep file
against an existing DIR is refused.
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

from ..io.checkpoint import atomic_write_json, atomic_write_text
from .config import FIELDS, ConfigError, TrainConfig, build_config, read_yaml

__all__ = ["SweepSpec", "Trial", "SweepError", "load_sweep", "expand", "run_sweep", "run_trial", "collect_results",
           "RESULT_COLUMNS", "pending", "check_out_dir"]

INDEX_OPTIONS = {"extra_iterations": 16, "batch_size": 512, "test_size": None, "method": "cached"}
RESULT_COLUMNS = ("final_test_error", "final_train_error", "final_test_loss", "chance_error", "epochs_run",
                  "ci", "ri", "di")  # then ci_s1, ri_s1, di_s1, ... per stage, then train_seconds, indices_seconds


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
    unknown = sorted(set(values) - {"base", "grid", "indices"})
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
    indices = dict(INDEX_OPTIONS)
    given = values.get("indices") or {}
    if not isinstance(given, dict) or set(given) - set(INDEX_OPTIONS):
        raise SweepError(f"{where}: indices takes only {', '.join(INDEX_OPTIONS)}")
    indices.update(given)
    for key in ("extra_iterations", "batch_size"):
        if isinstance(indices[key], bool) or not isinstance(indices[key], int) or indices[key] < 1:
            raise SweepError(f"{where}: indices: {key} must be an integer >= 1, got {indices[key]!r}")
    if indices["test_size"] is not None and (not isinstance(indices["test_size"], int) or indices["test_size"] < 1):
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


def check_out_dir(spec: SweepSpec, out_dir: str) -> None:
    """A new DIR gets sweep.yaml; an existing one must hold the same sweep."""
    yaml = _yaml()
    path = os.path.join(out_dir, "sweep.yaml")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise SweepError(f"{path}: not readable ({exc})") from None
        if stored != spec.canonical():
            changed = [k for k in ("base", "grid", "indices") if (stored or {}).get(k) != spec.canonical()[k]]
            raise SweepError(f"{out_dir} holds a different sweep (its sweep.yaml differs in {', '.join(changed) or 'form'}); "
                             "rerun with the sweep file it was started with, or choose another --out")
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SweepError(f"{out_dir} is not empty and holds no sweep.yaml: choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(spec.canonical(), sort_keys=False))


def trial_dir(out_dir: str, trial: Trial) -> str:
    return os.path.join(out_dir, "trials", trial.name)


def _finished(out_dir: str, trial: Trial) -> bool:
    path = os.path.join(trial_dir(out_dir, trial), "result.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("config") == dataclasses.asdict(trial.config)
    except (OSError, ValueError):
        return False


def pending(spec: SweepSpec, out_dir: str) -> list:
    """The trials of `spec` that have no finished result in out_dir."""
    return [t for t in expand(spec) if not _finished(os.path.abspath(out_dir), t)]


def run_trial(config: TrainConfig, out: str, indices: dict, report=None) -> dict:
    """Trains one configuration in `out` (resuming from its checkpoint if there is one), measures its
    indices, writes indices.json and result.json; returns the result row. `report(dict)` gets every epoch's
    metrics (Ray Tune's tune.report in a sweep)."""
    from . import training
    from .evaluation import indices_of_run

    started = time.perf_counter()
    resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
    metrics = training.train(config, out, resume=resume, progress=False, on_epoch=report)
    train_seconds = sum(e["seconds"] for e in metrics["epochs"])
    t0 = time.perf_counter()
    index_report = indices_of_run(out, extra_iterations=indices["extra_iterations"], method=indices["method"],
                                  batch_size=indices["batch_size"], test_size=indices["test_size"], device=config.device)
    atomic_write_json(os.path.join(out, "indices.json"), index_report.to_dict())
    last = metrics["epochs"][-1]
    row = {
        "final_test_error": last["test_error"], "final_train_error": last["train_error"],
        "final_test_loss": last["test_loss"], "chance_error": metrics["chance_error"],
        "epochs_run": len(metrics["epochs"]), "ci": index_report.ci, "ri": index_report.ri, "di": index_report.di,
    }
    for s, st in enumerate(index_report.stages, start=1):
        row.update({f"ci_s{s}": st.ci, f"ri_s{s}": st.ri, f"di_s{s}": st.di})
    row["train_seconds"] = train_seconds
    row["indices_seconds"] = time.perf_counter() - t0
    row["session_seconds"] = time.perf_counter() - started
    atomic_write_json(os.path.join(out, "result.json"), {"config": dataclasses.asdict(config), "result": _json_safe(row)})
    return row


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _tune_trainable(space: dict) -> None:
    """Ray Tune's function trainable: one trial (runs in a Ray worker process); `space["trial"]` is the
    grid point Tune sampled."""
    import torch
    from ray import tune

    params = space["trial"]
    torch.set_num_threads(max(1, int(params["threads"])))
    config = TrainConfig(**params["config"])
    row = run_trial(config, params["dir"], params["indices"], report=lambda record: tune.report(dict(record)))
    tune.report({**_json_safe(row), "done": True})


def run_sweep(spec: SweepSpec, out_dir: str, *, address: Optional[str] = None, cpus_per_run: float = 1,
              gpus_per_run: float = 0, verbose: int = 1) -> list:
    """Runs the trials of `spec` that are not finished in out_dir on Ray Tune, then writes results.csv.
    Returns the result rows (one per trial, in grid order)."""
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise SweepError("cpus per run must be > 0 and gpus per run >= 0")
    out_dir = os.path.abspath(out_dir)
    check_out_dir(spec, out_dir)
    todo = pending(spec, out_dir)
    if todo:
        import ray
        from ray import tune

        started_here = not ray.is_initialized()
        if started_here:
            kwargs = dict(include_dashboard=False, log_to_driver=verbose > 1, configure_logging=verbose > 1)
            if address is None:
                ray.init(num_cpus=os.cpu_count(), **kwargs)
            else:
                ray.init(address=address, **kwargs)
        try:
            space = [{"name": t.name, "dir": trial_dir(out_dir, t), "config": dataclasses.asdict(t.config),
                      "indices": spec.indices, "threads": max(1, int(cpus_per_run))} for t in todo]
            tuner = tune.Tuner(
                tune.with_resources(_tune_trainable, {"cpu": cpus_per_run, "gpu": gpus_per_run}),
                param_space={"trial": tune.grid_search(space)},
                tune_config=tune.TuneConfig(trial_name_creator=lambda t: t.config["trial"]["name"],
                                            trial_dirname_creator=lambda t: t.config["trial"]["name"]),
                run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=os.path.join(out_dir, "ray"), verbose=verbose,
                                          failure_config=tune.FailureConfig(max_failures=2)),
            )
            results = tuner.fit()
            errors = [r.error for r in results if r.error is not None]
        finally:
            if started_here:
                ray.shutdown()
        if errors:
            collect_results(spec, out_dir)
            raise SweepError(f"{len(errors)} trial(s) failed (first: {str(errors[0]).strip().splitlines()[-1]}); "
                             f"rerun the same command to retry them")
    return collect_results(spec, out_dir)


def collect_results(spec: SweepSpec, out_dir: str) -> list:
    """DIR/results.csv from the finished trials' result.json (grid order); returns the rows."""
    rows = []
    for t in expand(spec):
        path = os.path.join(trial_dir(out_dir, t), "result.json")
        if not _finished(out_dir, t):
            continue
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        config = {k: (_format(v) if isinstance(v, dict) else v) for k, v in stored["config"].items()}
        rows.append({"trial": t.name, **config, **stored["result"]})
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
