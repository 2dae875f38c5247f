"""Reading a trained run for the measuring commands (`indices`, `benefits`): its checkpoint, device and test set,
with every way that can fail turned into one clear error."""

from __future__ import annotations

import contextlib
import os

import click

__all__ = ["checkpoint_path", "measuring_errors"]


def checkpoint_path(run: str, device: str) -> str:
    """RUN's checkpoint.pt (RUN a run directory or the file), the device checked; usage errors otherwise."""
    from itconv_fast.experiments import training

    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise click.BadParameter(f"no checkpoint.pt in {run}", param_hint="RUN")
    try:
        training.resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    return path


@contextlib.contextmanager
def measuring_errors(path: str):
    """A bad checkpoint is a usage error naming RUN; missing data files and a network whose outputs are not finite
    are one-line errors naming the file."""
    from itconv_fast.data import vision
    from itconv_fast.io.checkpoint import CheckpointError
    from itconv_fast.measures.evaluator import NonFiniteOutputsError

    try:
        yield
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="RUN") from None
    except vision.DatasetFilesError as exc:
        raise click.ClickException(str(exc)) from exc
    except NonFiniteOutputsError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
