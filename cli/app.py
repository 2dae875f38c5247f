"""The `itconv-fast` command line (Click): this module only assembles the commands, one module each."""

from __future__ import annotations

import click

from .bench import bench
from .benefits import benefits
from .data import data
from .indices import indices
from .info import info
from .lipschitz import lipschitz
from .sweep import report, sweep
from .toy import toy
from .train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="itconv-fast")
def main() -> None:
    """Measure and manipulate iterative convergent computation in residual networks."""


for command in (info, bench, train, indices, benefits, sweep, report, toy, data, lipschitz):
    main.add_command(command)


if __name__ == "__main__":
    main()
