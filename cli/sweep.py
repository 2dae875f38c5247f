"""`itconv-fast sweep` and `itconv-fast report`: sweeps on Ray Tune and their markdown report."""

from __future__ import annotations

import os

import click

from .params import FiniteFloatRange


@click.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Sweep directory: sweep.yaml, trials/<name>/, results.csv. Rerun the same command to finish a killed sweep.",
)
@click.option(
    "--address",
    default=None,
    help="An existing Ray cluster (e.g. auto, or ray://host:10001). Default: start Ray on this machine.",
)
@click.option(
    "--auth-token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --address: the cluster's Ray auth token, for clusters started with token authentication (the default "
    "of `ray start --head`; the head keeps it in ~/.ray/auth_token).",
)
@click.option(
    "--cpus-per-run",
    type=FiniteFloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="CPUs Ray reserves per trial (also its torch threads).",
)
@click.option(
    "--gpus-per-run",
    type=FiniteFloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="GPUs Ray reserves per trial (fractions share a GPU).",
)
@click.option("--quiet", is_flag=True, help="No Ray Tune progress tables.")
@click.option(
    "--retry-diverged",
    is_flag=True,
    help="Run diverged trials again, from their last good epoch (by default a divergence is a result).",
)
@click.option(
    "--remeasure",
    is_flag=True,
    help="Train nothing: measure OUT's finished trials again with this version's measures and the sweep file's "
    "indices block (which may add benefits), then rewrite results.csv.",
)
def sweep(
    sweep_file, out, address, auth_token_file, cpus_per_run, gpus_per_run, quiet, retry_diverged, remeasure
) -> None:
    """Train every configuration of a sweep file on Ray Tune, measure each network's indices, write
    OUT/results.csv (see docs/reproduction.md for the paper's sweeps)."""
    from itconv_fast.experiments import sweep as sweeps

    try:
        spec = sweeps.load_sweep(sweep_file)
    except sweeps.SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="SWEEP_FILE") from None
    if remeasure:
        try:
            rows = sweeps.remeasure(spec, out, on_trial=lambda name: click.echo(f"measuring {name}"))
        except (sweeps.SweepLocked, sweeps.SweepError) as exc:
            raise click.BadParameter(str(exc), param_hint="--out") from None
        click.echo(f"wrote {os.path.join(out, 'results.csv')} ({len(rows)} trials)")
        return
    _check_auth_token(address, auth_token_file)
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "Ray Tune is not installed: pip install 'itconv-fast[sweep]' ('make setup' does)"
        ) from None
    trials = sweeps.expand(spec)
    try:
        sweeps.check_out_dir(spec, out)
    except sweeps.SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    todo = sweeps.pending(spec, out, retry_diverged)
    click.echo(f"{len(trials)} trials, {len(trials) - len(todo)} already finished, running {len(todo)} -> {out}")
    try:
        rows = sweeps.run_sweep(
            spec,
            out,
            address=address,
            cpus_per_run=cpus_per_run,
            gpus_per_run=gpus_per_run,
            verbose=0 if quiet else 1,
            retry_diverged=retry_diverged,
            auth_token_file=auth_token_file,
        )
    except sweeps.SweepLocked as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    except sweeps.SweepError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # a full disk: results.csv is written atomically, the previous one is kept
        raise click.ClickException(
            f"{exc.filename or out}: {exc.strerror or exc}; the previous files are kept"
        ) from None
    click.echo(f"{'trial':<40} {'status':>8} {'test err':>8} {'CI':>6} {'RI':>6} {'DI':>6}")
    for row in rows:
        status = row.get("status", "ok")
        if status != "ok":
            click.echo(f"{row['trial']:<40} {status:>8} {row.get('reason', '')}")
            continue
        values = [row.get(k) for k in ("ci", "ri", "di")]
        cells = " ".join("   nan" if v is None else f"{v:6.3f}" for v in values)
        click.echo(f"{row['trial']:<40} {status:>8} {row['final_test_error']:8.4f} {cells}")
    click.echo(f"wrote {os.path.join(out, 'results.csv')} ({len(rows)} of {len(trials)} trials)")


@click.command()
@click.argument("sweep_dir", type=click.Path(exists=True))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="The markdown file (default SWEEP_DIR/report.md); its PNG figures are written beside it.",
)
@click.option(
    "--with",
    "references",
    type=click.Path(exists=True),
    multiple=True,
    help="Another sweep's results.csv (or directory): its trials at this sweep's scale join the tables and "
    "figures as references (repeatable).",
)
def report(sweep_dir, out, references) -> None:
    """Markdown report with the paper's figures (Fig 2b, 3a-c, 4a) from a sweep's results.csv."""
    from itconv_fast.experiments import report as reports

    try:
        path = reports.write_report(sweep_dir, out, references=references)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise click.BadParameter(str(exc).strip("'\""), param_hint="SWEEP_DIR") from None
    except OSError as exc:  # a full disk: every file is written atomically, the previous ones are kept
        raise click.ClickException(
            f"{exc.filename or out}: {exc.strerror or exc}; the previous files are kept"
        ) from None
    click.echo(f"wrote {path}")


def _check_auth_token(address, auth_token_file) -> None:
    """--auth-token-file: with --address only, and a readable one-word token (usage errors before Ray starts)."""
    if auth_token_file is None:
        return
    if address is None:
        raise click.BadParameter("goes with --address (a local Ray needs no token)", param_hint="--auth-token-file")
    from itconv_fast.experiments.ray_auth import check_auth_token_file

    try:
        check_auth_token_file(auth_token_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--auth-token-file") from None
