"""`itconv-fast benefits`: what converging buys a trained run (thinking longer on harder inputs, adaptive depth,
robustness)."""

from __future__ import annotations

import json
import os

import click

from .params import CommaList, FiniteFloatRange

MEASURE_CHOICES = ("thinking-longer", "adaptive-depth", "robustness")


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option(
    "--measures",
    default="all",
    show_default=True,
    help=f"Comma-separated subset of {','.join(MEASURE_CHOICES)}, or all.",
)
@click.option(
    "--extra-iterations",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="K: thinking longer runs every stage's last block k = 0..K more times.",
)
@click.option(
    "--harder-digits",
    type=CommaList(click.IntRange(1, 10)),
    default=None,
    help="Digitclutter runs: digit counts of the harder test sets [default: n+1,n+2].",
)
@click.option(
    "--noise-sigma",
    type=FiniteFloatRange(min=0.0),
    default=0.5,
    show_default=True,
    help="Thinking longer also on the test set with Gaussian noise of this std (input units; 0: not).",
)
@click.option(
    "--taus",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default="0.003,0.01,0.03,0.1,0.3",
    show_default=True,
    help="Adaptive depth: a stage stops for an example once its relative update is under tau.",
)
@click.option(
    "--sigmas",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default="0.1,0.2,0.5,1",
    show_default=True,
    help="Robustness: Gaussian noise stds (input units).",
)
@click.option(
    "--epsilons",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default="0.01,0.02,0.05,0.1",
    show_default=True,
    help="Robustness: L-infinity sizes of the PGD attack and of the certificates (input units).",
)
@click.option("--pgd-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--test-size", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test examples only."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
def benefits(
    run,
    measures,
    extra_iterations,
    harder_digits,
    noise_sigma,
    taus,
    sigmas,
    epsilons,
    pgd_steps,
    batch_size,
    test_size,
    device,
    as_json,
) -> None:
    """What converging buys a trained run (directory or checkpoint.pt): the error after k extra iterations on
    its test set and on harder ones (more Digitclutter digits, noise), with the overthinking rate; the error and
    blocks run when each example leaves a stage once it has converged (adaptive depth); and the error under
    Gaussian noise and a PGD attack, with the share certified by the network's Lipschitz bound.

    Writes benefits.json beside the checkpoint.
    """
    chosen = MEASURE_CHOICES if measures.strip() == "all" else [m.strip() for m in measures.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MEASURE_CHOICES]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown measure {unknown[0] if unknown else measures!r}; choose from {', '.join(MEASURE_CHOICES)} or all",
            param_hint="--measures",
        )
    from itconv_fast.data import vision
    from itconv_fast.experiments import training
    from itconv_fast.experiments.benefits import benefits_of_run
    from itconv_fast.io.checkpoint import CheckpointError, atomic_write_json
    from itconv_fast.measures.evaluator import NonFiniteOutputsError

    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise click.BadParameter(f"no checkpoint.pt in {run}", param_hint="RUN")
    try:
        training.resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    try:
        result = benefits_of_run(
            path,
            measures=tuple(chosen),
            extra_iterations=extra_iterations,
            harder_digits=harder_digits,
            noise_sigma=noise_sigma,
            taus=taus,
            sigmas=sigmas,
            epsilons=epsilons,
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            test_size=test_size,
            device=device,
        )
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="RUN") from None
    except vision.DatasetFilesError as exc:
        raise click.ClickException(str(exc)) from exc
    except NonFiniteOutputsError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    out = os.path.join(os.path.dirname(os.path.abspath(path)), "benefits.json")
    atomic_write_json(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    print_benefits(result)
    click.echo(f"wrote {out}")


def print_benefits(result: dict) -> None:
    """Per test set the thinking-longer summary; adaptive depth per tau; the robustness curves."""
    if "thinking_longer" in result:
        click.echo(
            f"{'test set':>16} {'e(k=0)':>8} {'best k':>7} {'e(best)':>8} {'gain':>7} {'e(k=K)':>8} {'overthink':>9}"
        )
        for name, r in result["thinking_longer"].items():
            click.echo(
                f"{name:>16} {r['error']:8.4f} {r['best_k']:7d} {r['best_error']:8.4f} {r['gain']:7.4f} "
                f"{r['error_at_K']:8.4f} {r['overthinking_rate']:9.4f}"
            )
    if "adaptive_depth" in result:
        r = result["adaptive_depth"]
        click.echo(
            f"adaptive depth: full network error {r['full_error']:.4f}, {r['full_blocks']} blocks, "
            f"{r['full_seconds']:.3f} s"
        )
        for tau, e, b, t in zip(r["taus"], r["errors"], r["mean_blocks"], r["seconds"]):
            click.echo(f"  tau {tau:g}: error {e:.4f}, mean blocks {b:.2f}, {t:.3f} s")
        click.echo(
            f"  compute saved at no more than {100 * r['error_margin']:g} points of error: {r['compute_saved']:.1%}"
        )
    if "robustness" in result:
        r = result["robustness"]
        click.echo(f"clean error {r['clean_error']:.4f}")
        for sigma, e in zip(r["sigmas"], r["noise_errors"]):
            click.echo(f"  noise sigma {sigma:g}: error {e:.4f}")
        certified = r["certified_shares"] or [None] * len(r["epsilons"])
        for eps, e, c in zip(r["epsilons"], r["pgd_errors"], certified):
            share = f", certified {c:.4f}" if c is not None else ""
            click.echo(f"  PGD eps {eps:g} ({r['pgd_steps']} steps): error {e:.4f}{share}")
        if r["lipschitz_bound"] is not None:
            click.echo(f"  Lipschitz bound of the network: {r['lipschitz_bound']:.4g}")
