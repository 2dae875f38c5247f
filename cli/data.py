"""`itconv-fast data`: generate Digitclutter sets, download MNIST / CIFAR."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Data sets: pre-generate Digitclutter, write an image folder, fetch MNIST / CIFAR."""


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


@data.command("imagefolder")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="The folder to write (train/ and val/).")
@click.option("--train-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--val-size", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data_imagefolder(out, train_size, val_size, seed) -> None:
    """Write Digitclutter images of one digit each as a 10-class image folder (out/train/<digit>/*.png and
    out/val/<digit>/*.png, 32 x 32 grey PNGs): data to try `--data imagefolder:DIR` on."""
    import os

    from itconv_fast.data import digitclutter
    from itconv_fast.data.image_folder import write_image_folder

    classes = [str(d) for d in range(10)]
    for split, size, offset in (("train", train_size, 0), ("val", val_size, 1)):
        images, labels = digitclutter.generate(size, 1, seed * 2 + offset)
        write_image_folder(os.path.join(out, split), images, labels.argmax(1), classes)
    click.echo(f"wrote {out}: {train_size} training and {val_size} validation images of 10 classes")


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
