"""`itconv-fast lipschitz`: per-layer Lipschitz constants of a model script, a checkpoint or a model by name."""

from __future__ import annotations

import click

from .model_options import model_options, named_loading_errors


@click.command()
@click.argument("source", type=click.Path(exists=True), required=False)
@model_options(data=False)
@click.option(
    "--power-iterations",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Operator-norm power steps per layer (from a random start).",
)
@click.option(
    "--gram-iterations",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Gram steps of the certified bound (each costs C^3 k^d per layer).",
)
@click.option("--no-gram", is_flag=True, help="Skip the certified Gram bound (for very wide layers).")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the report as JSON here.",
)
@click.option("--markdown", is_flag=True, help="Print a Markdown table instead of the text table.")
def lipschitz(
    source,
    power_iterations,
    gram_iterations,
    no_gram,
    json_out,
    markdown,
    model_name,
    model_kwargs,
    weights,
    pretrained,
    image_size,
    seq_len,
) -> None:
    """Per-layer Lipschitz constants of a model: SOURCE is a training checkpoint (run directory or
    checkpoint.pt, also of a model fine-tuned by name) or a Python script; or, without SOURCE, --model SPEC
    (with --weights, --pretrained, --model-kwargs; zeros of --image-size / --seq-len as the example input).

    A script must define `model` (an nn.Module) or `build_model()`, and `example_input` (a tensor) or
    `example_input()`; it runs as Python, so only pass scripts you trust (checkpoints are read with
    weights_only=True). Prints matrix, operator, Gram-bound and (circular padding) exact sigma per layer.
    """
    from itconv_fast.experiments.model_source import ModelScriptError, load_model_source, load_named_source
    from itconv_fast.measures.lipschitz import lipschitz_report

    named = dict(
        model_kwargs=model_kwargs, weights=weights, pretrained=pretrained, image_size=image_size, seq_len=seq_len
    )  # a script or a run names its own weights and input
    if (source is None) == (model_name is None):
        raise click.UsageError("give a SOURCE (a script or a run) or --model SPEC, not both")
    if source is not None and any(named.values()):
        given = next(k for k, v in named.items() if v)
        raise click.UsageError(f"--{given.replace('_', '-')} goes with --model")
    if model_name is not None:
        with named_loading_errors():
            model, example = load_named_source(
                model_name,
                kwargs=model_kwargs,
                weights=weights,
                pretrained=bool(pretrained),
                image_size=image_size,
                seq_len=seq_len,
            )
    else:
        try:
            model, example = load_model_source(source)
        except ModelScriptError as exc:  # the user's script failed
            raise click.ClickException(str(exc)) from None
        except ValueError as exc:  # not a usable script or checkpoint (CheckpointError included)
            raise click.BadParameter(str(exc), param_hint="SOURCE") from None
    report = lipschitz_report(
        model, example, power_iterations=power_iterations, gram_iterations=gram_iterations, gram=not no_gram
    )
    click.echo(report.to_markdown() if markdown else report.table())
    if json_out:
        from itconv_fast.io.checkpoint import atomic_write_json

        atomic_write_json(json_out, report.to_dict())
