"""`itconv-fast toy`: the toy inverse problem of the paper's Fig 1."""

from __future__ import annotations

import os

import click


@click.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for toy.json and toy.png.")
@click.option("--blocks", type=click.IntRange(min=1), default=4, show_default=True, help="T: blocks (iteration steps).")
@click.option("--extra-iterations", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Adam steps per network.")
@click.option("--seed", type=int, default=0, show_default=True)
def toy(out, blocks, extra_iterations, steps, seed) -> None:
    """The paper's Fig 1: invert x = (1.5 z1, 0.75 z2) by the error-corrective iteration, a trained ResNet and
    a trained recurrent ResNet; early read-out, block drop-out and extra iterations of the last block."""
    from itconv_fast.experiments.toy import ToyConfig, run_toy

    result = run_toy(out, ToyConfig(blocks=blocks, extra_iterations=extra_iterations, steps=steps, seed=seed))
    click.echo(f"{'solver':<26} {'error after T':>14} {'after T+' + str(extra_iterations):>14}")
    for name, facts in result["facts"].items():
        click.echo(f"{name:<26} {facts['final_error']:14.3g} {facts['error_after_K_extra']:14.3g}")
    click.echo(f"wrote {os.path.join(out, 'toy.json')}, {os.path.join(out, 'toy.png')}")
