"""`itconv-fast benefits`: what converging buys a trained run (thinking longer on harder inputs, adaptive depth,
robustness)."""

from __future__ import annotations

import contextlib
import json
import os

import click

from itconv_fast.experiments.benefits import BENEFIT_MEASURES
from itconv_fast.measures.adaptive_depth import DEFAULT_AGREEMENTS, DEFAULT_CONFIDENCES, DEFAULT_TAUS
from itconv_fast.measures.robustness import DEFAULT_EPSILONS, DEFAULT_SIGMAS

from .model_options import measuring_target, model_flags, model_options
from .params import CommaList, FiniteFloatRange
from .run_access import measuring_errors

MEASURE_CHOICES = BENEFIT_MEASURES  # the library's list: one place names the measures


def _joined(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@click.command()
@click.argument("run", type=click.Path(exists=True), required=False)
@model_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="The directory for benefits.json: by default beside a run's checkpoint; with --model, not written without it.",
)
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
    "--ks",
    default="log",
    show_default=True,
    help="Thinking longer: the k evaluated: log (0, the powers of two below K, and K), all (0..K, three times the "
    "cost at K = 16), or a comma-separated list.",
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
    default=_joined(DEFAULT_TAUS),
    show_default=True,
    help="Adaptive depth: a stage stops for an example once its relative update is under tau ('' leaves the rule out).",
)
@click.option(
    "--confidences",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default=_joined(DEFAULT_CONFIDENCES),
    show_default=True,
    help="Adaptive depth: the last stage stops for an example once its read-out's confidence reaches this.",
)
@click.option(
    "--agreements",
    type=CommaList(click.IntRange(min=1)),
    default=_joined(DEFAULT_AGREEMENTS),
    show_default=True,
    help="Adaptive depth: the last stage stops for an example once its read-out's decision has held this many "
    "blocks in a row.",
)
@click.option(
    "--sigmas",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default=_joined(DEFAULT_SIGMAS),
    show_default=True,
    help="Robustness: Gaussian noise stds (input units).",
)
@click.option(
    "--epsilons",
    type=CommaList(FiniteFloatRange(min=0.0)),
    default=_joined(DEFAULT_EPSILONS),
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
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Draw one figure per measure: PATH.png gives PATH-thinking-longer.png, PATH-adaptive-depth.png, "
    "PATH-robustness.png.",
)
def benefits(
    run,
    model_name,
    model_kwargs,
    weights,
    pretrained,
    data_spec,
    image_size,
    seq_len,
    out,
    measures,
    extra_iterations,
    ks,
    harder_digits,
    noise_sigma,
    taus,
    confidences,
    agreements,
    sigmas,
    epsilons,
    pgd_steps,
    batch_size,
    test_size,
    device,
    as_json,
    plot,
) -> None:
    """What converging buys a trained run (directory or checkpoint.pt), or a model by name on your data (--model
    ... --data ...): the error after k extra iterations on
    its test set and on harder ones (more Digitclutter digits, noise), with the overthinking rate; the error and
    FLOPs when each example leaves a stage once it has converged or its read-out has settled (adaptive depth); and
    the error under Gaussian noise and a PGD attack, with the share certified by the network's Lipschitz bound.

    Writes benefits.json beside the checkpoint.
    """
    chosen = MEASURE_CHOICES if measures.strip() == "all" else [m.strip() for m in measures.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MEASURE_CHOICES]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown measure {unknown[0] if unknown else measures!r}; choose from {', '.join(MEASURE_CHOICES)} or all",
            param_hint="--measures",
        )
    grid = ks.strip()
    if grid not in ("log", "all"):
        try:
            grid = [int(k) for k in grid.split(",") if k.strip()]
        except ValueError:
            raise click.BadParameter(f"{ks!r} is not log, all or a list of ints", param_hint="--ks") from None
        if not grid or not all(0 <= k <= extra_iterations for k in grid):
            raise click.BadParameter(
                f"every k must be in 0..{extra_iterations} (the --extra-iterations)", param_hint="--ks"
            )
    if plot is not None and not plot.endswith(".png"):
        raise click.BadParameter(f"{plot!r} does not end in .png", param_hint="--plot")
    if not (taus or confidences or agreements):
        raise click.BadParameter("no halting levels: give at least one", param_hint="--taus")
    from itconv_fast.experiments.benefits import benefits_of_run
    from itconv_fast.io.checkpoint import atomic_write_json

    flags = model_flags(model_name, model_kwargs, weights, pretrained, data_spec, image_size, seq_len)
    found, path, folder = measuring_target(run, flags, out, batch_size=batch_size, test_size=test_size, device=device)
    with measuring_errors(path), _refused_measures():
        result = benefits_of_run(
            path,
            measures=tuple(chosen),
            extra_iterations=extra_iterations,
            ks=grid,
            harder_digits=harder_digits,
            noise_sigma=noise_sigma,
            taus=taus,
            confidences=confidences,
            agreements=agreements,
            sigmas=sigmas,
            epsilons=epsilons,
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            test_size=test_size,
            device=device,
            evaluation=found,
        )
    written = []
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        written.append(os.path.join(folder, "benefits.json"))
        atomic_write_json(written[-1], result)
    if plot is not None:
        from itconv_fast.experiments.benefits_plot import plot_benefits

        written += plot_benefits(result, plot)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    print_benefits(result)
    for figure in written:
        click.echo(f"wrote {figure}")


@contextlib.contextmanager
def _refused_measures():
    """A measure that does not apply to the model (robustness of a text model) is a usage error."""
    try:
        yield
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("benefits: "), param_hint="--measures") from None


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
            f"{r['full_flops'] / 1e6:.2f} MFLOPs an example, {r['full_seconds']:.3f} s"
        )
        for curve in r["curves"]:
            for level, e, b, f, t in zip(
                curve["levels"], curve["errors"], curve["mean_blocks"], curve["mean_flops"], curve["seconds"]
            ):
                click.echo(
                    f"  {curve['rule']} {level:g}: error {e:.4f}, mean blocks {b:.2f}, "
                    f"FLOPs {f / r['full_flops']:.1%} of full, {t:.3f} s"
                )
        saved = ", ".join(f"{rule} {v:.1%}" for rule, v in r["compute_saved_by_rule"].items())
        click.echo(f"  compute saved at no more than {100 * r['error_margin']:g} points of error: {saved}")
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
