"""`itconv-fast indices`: the indices of a run, and the analyses beyond them, printed and plotted."""

from __future__ import annotations

import os

import click

from .model_options import measuring_target, model_flags, model_options
from .params import FiniteFloatRange
from .run_access import measuring_errors


@click.command()
@click.argument("run", type=click.Path(exists=True), required=False)
@model_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="The directory for indices.json (and analysis.json): by default beside a run's checkpoint; with --model, "
    "not written without it.",
)
@click.option(
    "--extra-iterations",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="K: extra applications of each stage's last block (Divergence Index).",
)
@click.option("--method", type=click.Choice(["cached", "reference"]), default="cached", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--test-size", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test examples only."
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Draw the paper's Fig 2a (error against perturbed block) to this PNG; with --measures beyond "
    "indices, one row per measure and one column per stage.",
)
@click.option(
    "--measures",
    default="indices",
    show_default=True,
    help="Comma-separated subset of indices,refinement,anytime,traces, or all (see README).",
)
@click.option(
    "--threshold",
    type=FiniteFloatRange(min=0.0, min_open=True),
    default=0.05,
    show_default=True,
    help="Trace summaries: the share of examples whose fixed-point residual is under this.",
)
def indices(run, model_name, model_kwargs, weights, pretrained, data_spec, image_size, seq_len, out,
            extra_iterations, method, batch_size, test_size, device, plot, measures, threshold) -> None:  # fmt: skip
    """Convergence, Recurrence and Divergence indices of a trained run (directory or checkpoint.pt), or of a model
    by name on your data (--model timm:resnet18 --data imagefolder:DIR), and with --measures the refinement
    measures, anytime curves and convergence traces.

    Evaluates on the run's test set (on the data's val/ split, or all of it), writes indices.json (and
    analysis.json with --measures) beside the checkpoint (in --out), prints a per-stage table.
    """
    from itconv_fast.measures.analysis import MEASURES

    chosen = MEASURES if measures.strip() == "all" else tuple(m.strip() for m in measures.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown measure {unknown[0] if unknown else measures!r}; choose from {', '.join(MEASURES)} or all",
            param_hint="--measures",
        )
    if method == "reference" and chosen != ("indices",):
        raise click.BadParameter("the measures beyond the indices use the cached evaluator", param_hint="--method")

    from itconv_fast.experiments import evaluation
    from itconv_fast.io.checkpoint import atomic_write_json
    from itconv_fast.measures.indices import compute_indices

    flags = model_flags(model_name, model_kwargs, weights, pretrained, data_spec, image_size, seq_len)
    found, path, folder = measuring_target(run, flags, out, batch_size=batch_size, test_size=test_size, device=device)
    name = model_name if run is None else os.path.basename(os.path.dirname(os.path.abspath(path)))
    analysis = None
    with measuring_errors(path):
        if run is not None:
            found = evaluation.run_evaluation(path, batch_size=batch_size, test_size=test_size, device=device)
        if chosen == ("indices",):
            report = compute_indices(
                found.model,
                found.data,
                extra_iterations=extra_iterations,
                method=method,
                chance_error=found.chance_error,
                batch_size=batch_size,
                error_fn=found.error_fn,
            )
        else:
            from itconv_fast.measures.analysis import analyze

            analysis = analyze(
                found.model,
                found.data,
                measures=chosen,
                extra_iterations=extra_iterations,
                threshold=threshold,
                chance_error=found.chance_error,
                error_fn=found.error_fn,
                loss_fn=found.loss_fn,
                batch_size=batch_size,
            )
            report = analysis.indices
    written = []
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        if analysis is not None:
            written.append(os.path.join(folder, "analysis.json"))
            atomic_write_json(written[-1], analysis.to_dict())
        written.append(os.path.join(folder, "indices.json"))
        atomic_write_json(written[-1], report.to_dict())
    click.echo(f"{name}: n = {report.n}, error e* = {report.error:.4f}, chance = {report.chance_error:.4f}")
    click.echo(f"{'stage':>5} {'CI':>7} {'RI':>7} {'DI':>7} {'fixed-pt res.':>14}")
    for s, st in enumerate(report.stages, start=1):
        click.echo(f"{s:>5} {st.ci:7.3f} {st.ri:7.3f} {st.di:7.3f} {st.fixed_point_residual:14.4f}")
    click.echo(f"{'all':>5} {report.ci:7.3f} {report.ri:7.3f} {report.di:7.3f}")
    for note in report.notes:
        click.echo(f"note: {note}")
    if analysis is not None:
        print_analysis(analysis)
    for written_path in written:
        click.echo(f"wrote {written_path}")
    if plot:
        if analysis is not None:
            from itconv_fast.measures import plot_analysis

            plot_analysis(analysis, plot)
        else:
            plot_indices(report, plot)
        click.echo(f"wrote {plot}")


def print_analysis(report) -> None:
    """A short per-stage summary of the measures beyond the indices."""
    for s, st in enumerate(report.stages, start=1):
        parts = []
        if st.refinement:
            cos = ", ".join(f"{b.cosine_mean:+.2f}" for b in st.refinement)
            parts.append(f"cos(update, -grad) per block [{cos}]")
        if st.anytime_error:
            T = len(report.indices.stages[s - 1].e_drop)
            parts.append(
                f"anytime error k=1: {st.anytime_error[0]:.3f}, k=T: {st.anytime_error[T - 1]:.3f}, "
                f"k=T+K: {st.anytime_error[-1]:.3f}"
            )
        if st.trace:
            res = st.trace["fixed_point_residual"]
            parts.append(
                f"residual median {res['median'][0]:.3f} -> {res['median'][-1]:.3f}, "
                f"under {report.threshold:g}: {res['share_below'][-1]:.0%}"
            )
            if "contraction" in st.trace:
                parts.append(f"contraction median {st.trace['contraction']['median'][0]:.3f}")
        click.echo(f"stage {s}: " + "; ".join(parts))


def plot_indices(report, path: str) -> None:
    """The paper's Fig 2a: error against the perturbed block, one row per stage, three perturbations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    S = len(report.stages)
    fig, axes = plt.subplots(S, 3, figsize=(11, 2.6 * S), squeeze=False, sharey=True)
    titles = ["early read-out (CI)", "block drop-out (RI)", "extra iterations (DI)"]
    for s, st in enumerate(report.stages):
        curves = [
            (range(1, len(st.e_conv) + 1), st.e_conv, "read out after block t"),
            (range(1, len(st.e_drop) + 1), st.e_drop, "dropped block t"),
            (range(1, len(st.e_div) + 1), st.e_div, "extra iterations k"),
        ]
        values = [st.ci, st.ri, st.di]
        for j, (xs, ys, xlabel) in enumerate(curves):
            ax = axes[s, j]
            ax.plot(list(xs), ys, marker="o", ms=3, color="C0")
            ax.axhline(report.chance_error, color="C3", ls="--", lw=1, label="chance")
            ax.axhline(report.error, color="C2", ls=":", lw=1.5, label="final error e*")
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(xlabel)
            ax.set_title(f"stage {s + 1}: {titles[j]} = {values[j]:.2f}", fontsize=9)
            if j == 0:
                ax.set_ylabel("error")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
