"""The `itconv-fast` command line (Click)."""

from __future__ import annotations

import json
import platform

import click
import torch


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
        "threads": torch.get_num_threads(),
    }
    if not ops.extension_loaded():
        report["fallback_reason"] = _extension._reason
    click.echo(json.dumps(report, indent=2))


@main.group()
def bench() -> None:
    """Benchmarks against pure PyTorch (torch.utils.benchmark, side by side in one process)."""


def _device_option(f):
    return click.option(
        "--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."
    )(f)


@bench.command("coupling")
@click.option("--width", "widths", type=click.IntRange(min=1), multiple=True, default=(16, 64), show_default=True,
              help="Base width of the ResNet-101 whose gradients are coupled (repeatable).")
@click.option("--min-run-time", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
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
@click.option("--min-run-time", type=click.FloatRange(min=0.01), default=1.0, show_default=True)
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
    if tightness:
        report["gram_tightness_random"] = bench_lib.gram_tightness()
        for key, stats in report["gram_tightness_random"].items():
            click.echo(f"gram bound / exact, random 3x3 kernels, {key}: mean {stats['mean']:.3f} (min {stats['min']:.3f}, max {stats['max']:.3f})")
    if out:
        bench_lib.save_report(report, out)
        click.echo(f"wrote {out}")


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


if __name__ == "__main__":
    main()
