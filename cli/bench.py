"""`itconv-fast bench` and its subcommands: the benchmarks against pure PyTorch."""

from __future__ import annotations

import click
import torch

from .params import FiniteFloatRange


@click.group(invoke_without_command=True)
@click.option("--quick", is_flag=True, help="Smaller settings: under 3 minutes on 2 cores.")
@click.option("--device", "all_device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help='Write {"machine": {...}, "results": [...]} here.',
)
@click.option(
    "--markdown",
    "markdown_out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the table as markdown here.",
)
@click.pass_context
def bench(ctx, quick, all_device, json_out, markdown_out) -> None:
    """Benchmarks against pure PyTorch (torch.utils.benchmark, side by side in one process).

    With no subcommand: every comparison of the subcommands, and one table with the machine."""
    if ctx.invoked_subcommand is not None:
        return
    from itconv_fast import bench as bench_lib

    if all_device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    report = bench_lib.run_all(quick=quick, device=all_device, log=lambda m: click.echo(m, err=True))
    for table in report["tables"]:
        click.echo(table)
    markdown = bench_lib.results_markdown(report)
    click.echo(markdown)
    if json_out:
        bench_lib.save_report({k: v for k, v in report.items() if k != "tables"}, json_out)
        click.echo(f"wrote {json_out}")
    if markdown_out:
        with open(markdown_out, "w", encoding="utf-8") as f:
            f.write(markdown)
        click.echo(f"wrote {markdown_out}")


def _device_option(f):
    return click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")(f)


@bench.command("coupling")
@click.option(
    "--width",
    "widths",
    type=click.IntRange(min=1),
    multiple=True,
    default=(16, 64),
    show_default=True,
    help="Base width of the ResNet-101 whose gradients are coupled (repeatable).",
)
@click.option(
    "--min-run-time",
    type=FiniteFloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds of timing per case.",
)
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile baseline (c).")
@click.option(
    "--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report as JSON here."
)
@_device_option
def bench_coupling(widths, min_run_time, no_compile, out, device) -> None:
    """One soft-coupling step on ResNet-101 gradients: fused op vs loop, _foreach, compile, copy."""
    from itconv_fast import bench as bench_lib

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    report, table = bench_lib.run_coupling_benchmark(
        widths=widths, device=device, min_run_time=min_run_time, compile_reference=not no_compile
    )
    click.echo(table)
    for width, ratios in report["ratios"].items():
        parts = ", ".join(f"{name}: {ratio:.2f}x" for name, ratio in ratios.items())
        click.echo(f"{width}: time relative to the fused op -> {parts}")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("spectral")
@click.option(
    "--width",
    "widths",
    type=click.IntRange(min=1),
    multiple=True,
    default=(16, 64),
    show_default=True,
    help="Base width of the ResNet-101 whose 96 block convolutions are normalised (repeatable).",
)
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True)
@click.option(
    "--tightness/--no-tightness",
    default=True,
    show_default=True,
    help="Also report the Gram bound's tightness (bound / exact) on random kernels.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report as JSON here."
)
@_device_option
def bench_spectral(widths, min_run_time, tightness, out, device) -> None:
    """One power step for all block convs of ResNet-101: batched vs per-layer (torch spectral_norm, conv loop)."""
    from itconv_fast import bench as bench_lib

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    report, table = bench_lib.run_spectral_benchmark(widths=widths, device=device, min_run_time=min_run_time)
    click.echo(table)
    for width, ratios in report["ratios"].items():
        click.echo(f"{width}: " + ", ".join(f"{name}: {ratio:.2f}x" for name, ratio in ratios.items()))
    for key, seconds in report["gram_seconds"].items():
        click.echo(f"gram bound for all 96 convs, {key}: {seconds:.2f} s")
    if tightness:
        report["gram_tightness_random"] = bench_lib.gram_tightness()
        for key, stats in report["gram_tightness_random"].items():
            click.echo(
                f"gram bound / exact, random 3x3 kernels, {key}: mean {stats['mean']:.3f} (min {stats['min']:.3f}, "
                f"max {stats['max']:.3f})"
            )
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("lipschitz")
@click.option(
    "--arch",
    "archs",
    type=click.Choice(["resnet18", "resnet50"]),
    multiple=True,
    default=("resnet18", "resnet50"),
    show_default=True,
    help="torchvision-like ResNet (repeatable).",
)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=128, show_default=True, help="Input side in pixels.")
@click.option(
    "--min-run-time",
    type=FiniteFloatRange(min=0.01),
    default=5.0,
    show_default=True,
    help="Seconds of timing per case.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report as JSON here."
)
@_device_option
def bench_lipschitz(archs, batch, size, min_run_time, out, device) -> None:
    """One training step of ResNet-18 / -50 with spectral norms on every layer: torch's per-layer
    spectral_norm vs itconv_fast.nn per layer vs BatchedSpectralNorm; the overhead of each over the plain step."""
    from itconv_fast import bench as bench_lib

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    report, table = bench_lib.run_lipschitz_benchmark(archs, batch, size, device, min_run_time=min_run_time)
    click.echo(table)
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("batch-norm-relu")
@click.option("--batch", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_batch_norm_relu(batch, min_run_time, out, device) -> None:
    """The fused BatchNorm + ReLU against ATen's two ops (training forward + backward) at ResNet activation shapes."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_batch_norm_relu_benchmark(batch=batch, device=device, min_run_time=min_run_time)
    click.echo(table)
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("launches")
@click.option(
    "--case",
    "cases",
    multiple=True,
    help="A case to count (repeatable; default: all): 'plain loop', 'train lam 0', ... (see the table).",
)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
def bench_launches(cases, out) -> None:
    """Kernel launches of one training step on the CUDA path, counted on the CPU (no GPU needed): the plain loop
    against `train` at lam 0, lam 0.5, spectral normalization and each objective, with the launch goals."""
    from itconv_fast import bench as bench_lib

    try:
        report, table = bench_lib.run_launch_count(list(cases) or None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--case") from exc
    click.echo(table)
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("indices")
@click.option(
    "--config",
    "configs",
    type=(int, int, int, int),
    multiple=True,
    default=[(8, 4, 32, 256), (16, 16, 32, 16)],
    show_default=True,
    help="WIDTH BLOCKS SIDE N: a ResNet of 3 stages and N random examples (repeatable).",
)
@click.option("--extra-iterations", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_indices(configs, extra_iterations, min_run_time, out, device) -> None:
    """compute_indices: the cached evaluator against one plain forward per perturbation."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_indices_benchmark(configs, extra_iterations, device, min_run_time)
    click.echo(table)
    for key, ratios in report["ratios"].items():
        blocks = report["block_evaluations"][key]
        click.echo(
            f"{key}: reference / cached time {ratios['reference']:.2f}x; block evaluations per example "
            f"{blocks['reference_blocks']} vs {blocks['cached_blocks']} ({blocks['ratio']:.2f}x)"
        )
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("adaptive-depth")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--examples", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--mu", type=FiniteFloatRange(min=0.0, max=1.0, min_open=True, max_open=True), default=0.5, show_default=True
)
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_adaptive_depth(width, blocks, examples, mu, min_run_time, out, device) -> None:
    """Adaptive depth: the halting network (update rule) against the full one at equal error, on a converging
    network (weight-shared PCR blocks, spectral normalization mu, random weights)."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_adaptive_depth_benchmark(
        width, blocks, n=examples, mu=mu, device=device, min_run_time=min_run_time
    )
    click.echo(table)
    equal = report["equal_error"]
    for key, ratios in report["ratios"].items():
        click.echo(
            f"{key}: tau {equal['tau']:g} runs {equal['mean_blocks']:.1f} of {equal['full_blocks']} blocks "
            f"({equal['flops_share']:.0%} of the FLOPs) at error {equal['error']:.4f} "
            f"(full {equal['full_error']:.4f}); "
            f"the full network takes {ratios['full network']:.2f}x its time"
        )
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("analysis")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--examples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Interleaved rounds (each runs both cases once).",
)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_analysis(width, blocks, examples, rounds, out, device) -> None:
    """All analysis measures (refinement, anytime, traces) against the three indices alone."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_analysis_benchmark(
        width=width, blocks=blocks, n=examples, device=device, min_rounds=rounds
    )
    click.echo(table)
    for key, ratios in report["ratios"].items():
        click.echo(f"{key}: all measures take {ratios['all measures']:.2f}x the time of the indices alone")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("train-step")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--sn-mode", type=click.Choice(["operator", "matrix", "gram"]), default="operator", show_default=True)
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=10.0, show_default=True)
@click.option(
    "--objectives/--no-objectives",
    default=True,
    show_default=True,
    help="Also one row per objective (itconv_fast.objectives, weight 1) on the plain network.",
)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_train_step(width, blocks, batch, sn_mode, min_run_time, objectives, out, device) -> None:
    """Overhead of coupling, spectral normalization and the objectives on one training step of the paper's ResNet."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_train_step_benchmark(
        width, blocks, batch, device, min_run_time, sn_mode, objectives=objectives
    )
    click.echo(table)
    for case, ratio in report["ratios"][f"width {width}"].items():
        click.echo(f"{case}: {100 * (ratio - 1):+.1f}% vs plain")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("train")
@click.option(
    "--size",
    "sizes",
    type=click.Choice(["quick", "paper"]),
    multiple=True,
    default=("quick", "paper"),
    show_default=True,
    help="quick: the quick preset (Digitclutter, ResNet-29-8); paper: ResNet-101-16 on "
    "32 x 32 x 3 random CIFAR-shaped images. Repeatable.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Epochs per run; the first is reported apart (compilation, warm-up).",
)
@click.option(
    "--paper-steps",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Steps in an epoch of the paper size.",
)
@click.option(
    "--quick-train-size",
    type=click.IntRange(min=128),
    default=None,
    help="Training examples of the quick size (default: the preset's 12,000).",
)
@click.option("--no-compile", is_flag=True, help="Leave out the compiled runs (minutes of compilation on a CPU).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_train(sizes, epochs, paper_steps, quick_train_size, no_compile, out, device) -> None:
    """Epoch time of itconv-fast train (eager and compiled, with and without coupling + spectral normalization)
    against a plain PyTorch training loop, runs interleaved epoch by epoch."""
    from itconv_fast import bench as bench_lib

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    report, table = bench_lib.run_train_benchmark(
        sizes,
        device=device,
        epochs=epochs,
        paper_steps=paper_steps,
        quick_train_size=quick_train_size,
        compiled=not no_compile,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(table)
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")
