"""The `itconv-fast` command line (Click)."""

from __future__ import annotations

import json
import math
import os
import platform

import click
import torch


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (every comparison with nan is false, so a plain
    FloatRange lets `--lam nan` through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="itconv-fast")
def main() -> None:
    """Measure and manipulate iterative convergent computation in residual networks."""


@main.command()
def info() -> None:
    """Versions, devices and the kernel backend in use."""
    from itconv_fast import _extension, ops

    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": ops.extension_loaded(),
        "extension_cuda_kernels": _extension.cuda_compiled(),
        "cuda_arch_list": _extension.build_info().get("cuda_arch_list"),
        "threads": torch.get_num_threads(),
    }
    if ops.extension_loaded():
        # What the CPU kernels tuned to on this machine: L1 geometry, vector clone, register-path limit.
        report["cpu_kernels"] = _extension.cpu_info()
    else:
        report["fallback_reason"] = _extension._reason
    click.echo(json.dumps(report, indent=2))


@main.group(invoke_without_command=True)
@click.option("--quick", is_flag=True, help="Smaller settings: under 3 minutes on 2 cores.")
@click.option("--device", "all_device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True), default=None,
              help='Write {"machine": {...}, "results": [...]} here.')
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the table as markdown here.")
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
    return click.option(
        "--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."
    )(f)


@bench.command("coupling")
@click.option("--width", "widths", type=click.IntRange(min=1), multiple=True, default=(16, 64), show_default=True,
              help="Base width of the ResNet-101 whose gradients are coupled (repeatable).")
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True,
              help="Seconds of timing per case.")
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile baseline (c).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the report as JSON here.")
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
@click.option("--width", "widths", type=click.IntRange(min=1), multiple=True, default=(16, 64), show_default=True,
              help="Base width of the ResNet-101 whose 96 block convolutions are normalised (repeatable).")
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=1.0, show_default=True)
@click.option("--tightness/--no-tightness", default=True, show_default=True,
              help="Also report the Gram bound's tightness (bound / exact) on random kernels.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report as JSON here.")
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
            click.echo(f"gram bound / exact, random 3x3 kernels, {key}: mean {stats['mean']:.3f} (min {stats['min']:.3f}, max {stats['max']:.3f})")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("lipschitz")
@click.option("--arch", "archs", type=click.Choice(["resnet18", "resnet50"]), multiple=True,
              default=("resnet18", "resnet50"), show_default=True, help="torchvision-like ResNet (repeatable).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=128, show_default=True, help="Input side in pixels.")
@click.option("--min-run-time", type=FiniteFloatRange(min=0.01), default=5.0, show_default=True,
              help="Seconds of timing per case.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report as JSON here.")
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


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file of train options (keys as below, with _ for -); flags given here override it. "
                   "Every run writes its resolved config.yaml, which this reads back.")
@click.option("--preset", type=click.Choice(["quick", "paper"]), default=None,
              help="quick (default): small net and data, minutes on a CPU. paper: 3 x 16 blocks, width 16, full data, 60 epochs.")
@click.option("--dataset", type=click.Choice(["digitclutter", "mnist", "cifar10", "cifar100"]), default="digitclutter",
              show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where MNIST / CIFAR files are (torchvision layout).")
@click.option("--download", is_flag=True, help="Fetch MNIST / CIFAR archives over HTTPS (md5 verified).")
@click.option("--n-digits", type=click.IntRange(1, 10), default=3, show_default=True, help="Digitclutter digits per image.")
@click.option("--train-size", type=click.IntRange(min=1), default=None, help="Training examples (seeded, stratified subset).")
@click.option("--test-size", type=click.IntRange(min=1), default=None, help="Test examples.")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Base width w (stage s: w * 2^s).")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="Blocks per stage T.")
@click.option("--stages", type=click.IntRange(min=1), default=None, help="Stages S.")
@click.option("--lam", type=FiniteFloatRange(0.0, 1.0), default=None, help="Soft gradient coupling factor in [0, 1].")
@click.option("--coupling-kernel", type=click.Choice(["uniform", "triangular"]), default=None)
@click.option("--skip-first", type=click.IntRange(min=0), default=None, help="Leave the first k blocks of each stage uncoupled.")
@click.option("--sn-mu", type=FiniteFloatRange(min=0.0, min_open=True), default=None,
              help="Lipschitz bound mu on every residual function (spectral normalization; off if not given).")
@click.option("--sn-mode", type=click.Choice(["operator", "matrix", "gram"]), default=None)
@click.option("--pcr/--icr", default=None,
              help="Properly convergent updates z_t = x_s + f~_t(z_{t-1}) (--pcr), or z_{t-1} + f~_t(z_{t-1}) (--icr, the default).")
@click.option("--init", type=click.Choice(["auto", "nonrecurrent", "recurrent"]), default=None,
              help="auto: recurrent when --lam > 0 (the paper).")
@click.option("--bn-gamma-init", type=FiniteFloatRange(), default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--accumulate", type=click.IntRange(min=1), default=None,
              help="Gradient accumulation: micro-batches per optimizer step (the batch size stays the global one).")
@click.option("--lr", type=FiniteFloatRange(min=0.0, min_open=True), default=None, help="Learning rate at batch size 128.")
@click.option("--weight-decay", type=FiniteFloatRange(min=0.0), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", type=str, default=None, help="auto (default), cpu, cuda, cuda:N.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<dataset>-lam<lam>-mu<mu>-seed<seed>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(config_file, preset, dataset, data_dir, download, n_digits, train_size, test_size, width, blocks, stages, lam,
          coupling_kernel, skip_first, sn_mu, sn_mode, pcr, init, bn_gamma_init, epochs, batch_size, accumulate, lr, weight_decay,
          seed, device, out, resume, compile_, no_progress) -> None:
    """Train the paper's ResNet with soft gradient coupling and a Lipschitz constraint.

    Examples: itconv-fast train --lam 0.5 --sn-mu 0.95; itconv-fast train --config run.yaml --seed 1
    """

    from itconv_fast import train as training
    from itconv_fast.checkpoint import CheckpointError
    from itconv_fast.data import datasets, vision

    flags = dict(dataset=dataset, data_dir=data_dir, download=download or None, n_digits=n_digits,
                 train_size=train_size, test_size=test_size, width=width, blocks=blocks, stages=stages, lam=lam,
                 coupling_kernel=coupling_kernel, skip_first=skip_first, sn_mu=sn_mu, sn_mode=sn_mode, pcr=pcr, init=init,
                 bn_gamma_init=bn_gamma_init, epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr,
                 weight_decay=weight_decay, seed=seed, device=device, compile=compile_)
    flags = {k: v for k, v in flags.items() if v is not None}
    config = resolve_train_config(config_file, preset, flags)
    try:
        training.resolve_device(config.device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    if config.dataset != "digitclutter" and config.data_dir is None:
        raise click.BadParameter(f"{config.dataset} needs --data-dir (add --download to fetch it)", param_hint="--data-dir")
    # Load the data before anything is written: missing or corrupt files are a usage error.
    try:
        task = datasets.load(config.dataset, data_dir=config.data_dir, download=config.download, n_digits=config.n_digits,
                             train_size=config.train_size, test_size=config.test_size, seed=config.seed,
                             cache_dir=config.cache_dir or datasets.default_cache_dir())
    except vision.DatasetFilesError as exc:
        raise click.BadParameter(str(exc), param_hint="--data-dir") from exc
    if out is None:
        mu = "none" if config.sn_mu is None else f"{config.sn_mu:g}"
        out = os.path.join("runs", f"{config.dataset}-lam{config.lam:g}-mu{mu}-seed{config.seed}")
    if os.path.exists(os.path.join(out, "checkpoint.pt")) and not resume:
        raise click.BadParameter(f"{out} already holds a run; pass --resume to continue it or choose another --out",
                                 param_hint="--out")
    click.echo(f"training {config.dataset} (preset {config.preset}): width {config.width}, {config.stages} x {config.blocks} blocks, "
               f"lam {config.lam}, sn_mu {config.sn_mu} ({config.sn_mode}), init {config.resolved_init()} -> {out}")
    try:
        metrics = training.train(config, out, resume=resume, progress=not no_progress, task=task)
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="--resume") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    last = metrics["epochs"][-1]
    total = sum(e["seconds"] for e in metrics["epochs"])
    click.echo(f"done: {len(metrics['epochs'])} epochs in {total:.0f} s; test error {last['test_error']:.4f} "
               f"(chance {metrics['chance_error']:.4f}), train loss {last['train_loss']:.4f}; wrote {out}/metrics.json, {out}/checkpoint.pt")


def resolve_train_config(config_file, preset, flags: dict):
    """preset < config file < command-line flags; any bad key or value is a usage error (exit 2) naming the
    flag, or the file for values that came from it."""
    from itconv_fast import config as configs

    values = {}
    if config_file is not None:
        try:
            values = configs.load_config_file(config_file)
        except configs.ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from None
    preset = preset or values.pop("preset", None) or "quick"
    values.pop("preset", None)
    values.update(flags)
    try:
        return configs.build_config(preset, values)
    except configs.ConfigError as exc:
        if exc.key in flags:
            hint = "--" + exc.key.replace("_", "-")
            message = str(exc).split(": ", 1)[-1]
        else:
            hint = "--config" if config_file else "--" + (exc.key or "preset").replace("_", "-")
            message = f"{config_file}: {exc}" if config_file else str(exc)
        raise click.BadParameter(message, param_hint=hint) from None


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--extra-iterations", type=click.IntRange(min=1), default=16, show_default=True,
              help="K: extra applications of each stage's last block (Divergence Index).")
@click.option("--method", type=click.Choice(["cached", "reference"]), default="cached", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--test-size", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test examples only.")
@click.option("--device", default="auto", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Draw the paper's Fig 2a (error against perturbed block) to this PNG; with --measures beyond "
                   "indices, one row per measure and one column per stage.")
@click.option("--measures", default="indices", show_default=True,
              help="Comma-separated subset of indices,refinement,anytime,traces, or all (see README).")
@click.option("--threshold", type=FiniteFloatRange(min=0.0, min_open=True), default=0.05, show_default=True,
              help="Trace summaries: the share of examples whose fixed-point residual is under this.")
def indices(run, extra_iterations, method, batch_size, test_size, device, plot, measures, threshold) -> None:
    """Convergence, Recurrence and Divergence indices of a trained run (directory or checkpoint.pt), and
    with --measures the refinement measures, anytime curves and convergence traces.

    Evaluates on the run's test set, writes indices.json (and analysis.json with --measures) beside the
    checkpoint, prints a per-stage table.
    """
    from itconv_fast.analysis import MEASURES

    chosen = MEASURES if measures.strip() == "all" else tuple(m.strip() for m in measures.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown measure {unknown[0] if unknown else measures!r}; choose from "
                                 f"{', '.join(MEASURES)} or all", param_hint="--measures")
    if method == "reference" and chosen != ("indices",):
        raise click.BadParameter("the measures beyond the indices use the cached evaluator", param_hint="--method")

    from itconv_fast import indices as idx
    from itconv_fast import train as training
    from itconv_fast.checkpoint import CheckpointError
    from itconv_fast.data import vision

    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise click.BadParameter(f"no checkpoint.pt in {run}", param_hint="RUN")
    try:
        training.resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    try:
        model, data, chance, error_fn, loss_fn = idx.run_evaluation(path, batch_size=batch_size, test_size=test_size,
                                                                    device=device)
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="RUN") from None
    except vision.DatasetFilesError as exc:
        raise click.ClickException(str(exc)) from exc
    folder = os.path.dirname(os.path.abspath(path))
    analysis = None
    if chosen == ("indices",):
        report = idx.compute_indices(model, data, extra_iterations=extra_iterations, method=method, chance_error=chance,
                                     batch_size=batch_size, error_fn=error_fn)
    else:
        from itconv_fast.analysis import analyze

        analysis = analyze(model, data, measures=chosen, extra_iterations=extra_iterations, threshold=threshold,
                           chance_error=chance, error_fn=error_fn, loss_fn=loss_fn, batch_size=batch_size)
        report = analysis.indices
        training.atomic_write_json(os.path.join(folder, "analysis.json"), analysis.to_dict())
    out = os.path.join(folder, "indices.json")
    training.atomic_write_json(out, report.to_dict())
    click.echo(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: n = {report.n}, error e* = {report.error:.4f}, chance = {report.chance_error:.4f}")
    click.echo(f"{'stage':>5} {'CI':>7} {'RI':>7} {'DI':>7} {'fixed-pt res.':>14}")
    for s, st in enumerate(report.stages, start=1):
        click.echo(f"{s:>5} {st.ci:7.3f} {st.ri:7.3f} {st.di:7.3f} {st.fixed_point_residual:14.4f}")
    click.echo(f"{'all':>5} {report.ci:7.3f} {report.ri:7.3f} {report.di:7.3f}")
    for note in report.notes:
        click.echo(f"note: {note}")
    if analysis is not None:
        print_analysis(analysis)
        click.echo(f"wrote {os.path.join(folder, 'analysis.json')}")
    click.echo(f"wrote {out}")
    if plot:
        if analysis is not None:
            from itconv_fast.analysis import plot_analysis

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
            parts.append(f"anytime error k=1: {st.anytime_error[0]:.3f}, k=T: {st.anytime_error[T - 1]:.3f}, "
                         f"k=T+K: {st.anytime_error[-1]:.3f}")
        if st.trace:
            res = st.trace["fixed_point_residual"]
            parts.append(f"residual median {res['median'][0]:.3f} -> {res['median'][-1]:.3f}, "
                         f"under {report.threshold:g}: {res['share_below'][-1]:.0%}")
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


@bench.command("indices")
@click.option("--config", "configs", type=(int, int, int, int), multiple=True,
              default=[(8, 4, 32, 256), (16, 16, 32, 16)], show_default=True,
              help="WIDTH BLOCKS SIDE N: a ResNet of 3 stages and N random examples (repeatable).")
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
        click.echo(f"{key}: reference / cached time {ratios['reference']:.2f}x; block evaluations per example "
                   f"{blocks['reference_blocks']} vs {blocks['cached_blocks']} ({blocks['ratio']:.2f}x)")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@bench.command("analysis")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--examples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interleaved rounds (each runs both cases once).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_analysis(width, blocks, examples, rounds, out, device) -> None:
    """All analysis measures (refinement, anytime, traces) against the three indices alone."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_analysis_benchmark(width=width, blocks=blocks, n=examples, device=device,
                                                     min_rounds=rounds)
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
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None)
@_device_option
def bench_train_step(width, blocks, batch, sn_mode, min_run_time, out, device) -> None:
    """Overhead of coupling and spectral normalization on one training step of the paper's ResNet-101."""
    from itconv_fast import bench as bench_lib

    report, table = bench_lib.run_train_step_benchmark(width, blocks, batch, device, min_run_time, sn_mode)
    click.echo(table)
    for case, ratio in report["ratios"][f"width {width}"].items():
        click.echo(f"{case}: {100 * (ratio - 1):+.1f}% vs plain")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


@main.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Sweep directory: sweep.yaml, trials/<name>/, results.csv. Rerun the same command to finish a killed sweep.")
@click.option("--address", default=None,
              help="An existing Ray cluster (e.g. auto, or ray://host:10001). Default: start Ray on this machine.")
@click.option("--cpus-per-run", type=FiniteFloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="CPUs Ray reserves per trial (also its torch threads).")
@click.option("--gpus-per-run", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True,
              help="GPUs Ray reserves per trial (fractions share a GPU).")
@click.option("--quiet", is_flag=True, help="No Ray Tune progress tables.")
def sweep(sweep_file, out, address, cpus_per_run, gpus_per_run, quiet) -> None:
    """Train every configuration of a sweep file on Ray Tune, measure each network's indices, write
    OUT/results.csv (see docs/reproduction.md for the paper's sweeps)."""
    from itconv_fast import sweep as sweeps

    try:
        spec = sweeps.load_sweep(sweep_file)
    except sweeps.SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="SWEEP_FILE") from None
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        raise click.ClickException("Ray Tune is not installed: pip install 'itconv-fast[sweep]' ('make setup' does)") from None
    trials = sweeps.expand(spec)
    try:
        sweeps.check_out_dir(spec, out)
    except sweeps.SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    todo = sweeps.pending(spec, out)
    click.echo(f"{len(trials)} trials, {len(trials) - len(todo)} already finished, running {len(todo)} -> {out}")
    try:
        rows = sweeps.run_sweep(spec, out, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                                verbose=0 if quiet else 1)
    except sweeps.SweepError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{'trial':<40} {'test err':>8} {'CI':>6} {'RI':>6} {'DI':>6}")
    for row in rows:
        values = [row.get(k) for k in ("ci", "ri", "di")]
        cells = " ".join("   nan" if v is None else f"{v:6.3f}" for v in values)
        click.echo(f"{row['trial']:<40} {row['final_test_error']:8.4f} {cells}")
    click.echo(f"wrote {os.path.join(out, 'results.csv')} ({len(rows)} of {len(trials)} trials)")


@main.command()
@click.argument("sweep_dir", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The markdown file (default SWEEP_DIR/report.md); its PNG figures are written beside it.")
def report(sweep_dir, out) -> None:
    """Markdown report with the paper's figures (Fig 2b, 3a-c, 4a) from a sweep's results.csv."""
    from itconv_fast import report as reports

    try:
        path = reports.write_report(sweep_dir, out)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise click.BadParameter(str(exc).strip("'\""), param_hint="SWEEP_DIR") from None
    click.echo(f"wrote {path}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for toy.json and toy.png.")
@click.option("--blocks", type=click.IntRange(min=1), default=4, show_default=True, help="T: blocks (iteration steps).")
@click.option("--extra-iterations", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Adam steps per network.")
@click.option("--seed", type=int, default=0, show_default=True)
def toy(out, blocks, extra_iterations, steps, seed) -> None:
    """The paper's Fig 1: invert x = (1.5 z1, 0.75 z2) by the error-corrective iteration, a trained ResNet and
    a trained recurrent ResNet; early read-out, block drop-out and extra iterations of the last block."""
    from itconv_fast.toy import ToyConfig, run_toy

    result = run_toy(out, ToyConfig(blocks=blocks, extra_iterations=extra_iterations, steps=steps, seed=seed))
    click.echo(f"{'solver':<26} {'error after T':>14} {'after T+' + str(extra_iterations):>14}")
    for name, facts in result["facts"].items():
        click.echo(f"{name:<26} {facts['final_error']:14.3g} {facts['error_after_K_extra']:14.3g}")
    click.echo(f"wrote {os.path.join(out, 'toy.json')}, {os.path.join(out, 'toy.png')}")


@main.group()
def data() -> None:
    """Data sets: pre-generate Digitclutter, fetch MNIST / CIFAR."""


@data.command("digitclutter")
@click.option("--n-digits", type=click.IntRange(1, 10), default=3, show_default=True, help="Digits per image.")
@click.option("--size", type=click.IntRange(min=1), default=100_000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--debris", is_flag=True, help="Digit debris: one digit among fragments of others.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), required=True, help="The .npz file to write.")
def data_digitclutter(n_digits, size, seed, debris, out) -> None:
    """Generate a Digitclutter set and save it (images uint8 [N,1,32,32], labels multi-hot [N,10])."""
    import time

    from itconv_fast.data import datasets, digitclutter

    start = time.perf_counter()
    images, labels = digitclutter.generate(size, n_digits, seed, debris=debris)
    seconds = time.perf_counter() - start
    datasets.save_digitclutter(out, images, labels, dict(n_images=size, n_digits=n_digits, seed=seed, debris=debris))
    click.echo(f"wrote {out}: {size} images in {seconds:.1f} s ({size / seconds:,.0f} images/s)")


@data.command("download")
@click.argument("name", type=click.Choice(["mnist", "cifar10", "cifar100"]))
@click.option("--data-dir", type=click.Path(file_okay=False), required=True)
def data_download(name, data_dir) -> None:
    """Fetch a data set's official archives over HTTPS and verify their md5 checksums."""
    from itconv_fast.data import vision

    try:
        paths = vision.download(name, data_dir)
    except vision.DatasetFilesError as exc:
        raise click.ClickException(str(exc)) from exc
    for path in paths:
        click.echo(f"ok {path}")


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--power-iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="Operator-norm power steps per layer (from a random start).")
@click.option("--gram-iterations", type=click.IntRange(min=1), default=4, show_default=True,
              help="Gram steps of the certified bound (each costs C^3 k^d per layer).")
@click.option("--no-gram", is_flag=True, help="Skip the certified Gram bound (for very wide layers).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the report as JSON here.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table instead of the text table.")
def lipschitz(source, power_iterations, gram_iterations, no_gram, json_out, markdown) -> None:
    """Per-layer Lipschitz constants of a model: SOURCE is a training checkpoint (run directory or
    checkpoint.pt) or a Python script.

    A script must define `model` (an nn.Module) or `build_model()`, and `example_input` (a tensor) or
    `example_input()`; it runs as Python, so only pass scripts you trust (checkpoints are read with
    weights_only=True). Prints matrix, operator, Gram-bound and (circular padding) exact sigma per layer.
    """
    from itconv_fast.lipschitz import ModelScriptError, lipschitz_report, load_model_source

    try:
        model, example = load_model_source(source)
    except ModelScriptError as exc:  # the user's script failed
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # not a usable script or checkpoint (CheckpointError included)
        raise click.BadParameter(str(exc), param_hint="SOURCE") from None
    report = lipschitz_report(model, example, power_iterations=power_iterations, gram_iterations=gram_iterations,
                              gram=not no_gram)
    click.echo(report.to_markdown() if markdown else report.table())
    if json_out:
        from itconv_fast.checkpoint import atomic_write_json

        atomic_write_json(json_out, report.to_dict())


if __name__ == "__main__":
    main()
