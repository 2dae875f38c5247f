"""The options that name a model and a user's data (`--model timm:resnet18 --data imagefolder:DIR`), shared by
`train` and the measuring commands, and the loading of both with every failure turned into one clear error."""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import click

__all__ = ["model_options", "model_flags", "named_loading_errors", "measured_named_model", "measuring_target"]


def _parse_kwargs(ctx, param, values):
    """--model-kwargs KEY=VALUE (repeatable) -> {key: value}, each value read as YAML (32, 0.1, true, [3, 4])."""
    import yaml

    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{text!r}: expected KEY=VALUE, e.g. img_size=32", ctx, param)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out or None


_DATA_OPTION = click.option(
    "--data",
    "data_spec",
    default=None,
    metavar="SPEC",
    help="imagefolder:DIR (torchvision's ImageFolder layout: train/ and val/, or class folders alone) or "
    "text:FILE (next-token error, the model's tokenizer), read with the model's own preprocessing.",
)

_OPTIONS = [
    click.option(
        "--model",
        "model_name",
        default=None,
        metavar="SPEC",
        help="A model by name instead of the paper's ResNet: torchvision:NAME, timm:NAME, hf:NAME_OR_PATH or "
        "path/to/file.py:FUNCTION (random weights unless --pretrained or --weights); train, indices and benefits "
        "take it with --data.",
    ),
    click.option(
        "--model-kwargs",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_kwargs,
        help="A keyword argument of the model's constructor (repeatable), e.g. img_size=32; for hf: models, a "
        "config override.",
    ),
    click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        default=None,
        help="A state dict (.pt, read with weights_only=True, or .safetensors) for --model; a run's checkpoint.pt too.",
    ),
    click.option(
        "--pretrained",
        is_flag=True,
        default=None,
        help="The library's own weights for --model, from its local cache (never downloaded).",
    ),
    _DATA_OPTION,
    click.option(
        "--image-size",
        type=click.IntRange(min=1),
        default=None,
        help="Image data: the crop side, overriding the model's preprocessing (the resize keeps its ratio).",
    ),
    click.option(
        "--seq-len", type=click.IntRange(min=1), default=None, help="Text data: tokens per example (default 64)."
    ),
]


def model_options(command=None, *, data: bool = True):
    """Adds the model and data options to a command (parameters model_name, model_kwargs, weights, pretrained,
    data_spec, image_size, seq_len); `@model_options(data=False)` leaves out --data (data_spec) for a command that
    reads no data."""
    if command is None:
        return lambda command: model_options(command, data=data)
    for option in reversed(_OPTIONS if data else [o for o in _OPTIONS if o is not _DATA_OPTION]):
        command = option(command)
    return command


def model_flags(model_name, model_kwargs, weights, pretrained, data_spec, image_size, seq_len) -> dict:
    """The options given, as TrainConfig keys."""
    flags = dict(
        model=model_name,
        model_kwargs=model_kwargs,
        weights=weights,
        pretrained=pretrained or None,
        data=data_spec,
        image_size=image_size,
        seq_len=seq_len,
    )
    return {k: v for k, v in flags.items() if v is not None}


@contextlib.contextmanager
def named_loading_errors():
    """A model that cannot be built or wrapped, weights that do not fit and unreadable data: usage errors naming the
    option."""
    from itconv_fast.data import vision
    from itconv_fast.io.checkpoint import CheckpointError
    from itconv_fast.models.named import ModelNameError

    try:
        yield
    except ModelNameError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    except (CheckpointError, FileNotFoundError) as exc:
        raise click.BadParameter(str(exc), param_hint="--weights") from None
    except vision.DatasetFilesError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # weights of another shape, token ids beyond the vocabulary
        raise click.BadParameter(str(exc), param_hint="--weights" if "weights" in str(exc) else "--data") from None


def measured_named_model(flags: dict, *, batch_size: int, test_size, device: str):
    """The RunEvaluation of `--model ... --data ...` for a measuring command: the model on the whole of the data's
    held-out split (its val/ folder, or everything when it has one split)."""
    from itconv_fast.experiments import config as configs
    from itconv_fast.experiments import training
    from itconv_fast.experiments.evaluation import named_evaluation
    from itconv_fast.experiments.named_runs import named_model_and_task

    if "model" not in flags or "data" not in flags:
        raise click.UsageError("give a RUN, or --model SPEC with --data SPEC")
    try:
        config = configs.build_config("quick", flags)
    except configs.ConfigError as exc:
        hint = "--" + (exc.key or "model").replace("_", "-")
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint=hint) from None
    try:
        dev = training.resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    with named_loading_errors():
        model, task = named_model_and_task(config, hold_out=False)
    return named_evaluation(model.to(dev).eval(), task, config, batch_size, test_size, dev)


class MeasuringTarget(NamedTuple):
    found: Optional[object]  # a named model's RunEvaluation; None: the command reads the run's checkpoint
    path: str  # the run's checkpoint.pt, or the model's name (what errors name)
    folder: Optional[str]  # where the results go; None: not written


def measuring_target(run, flags: dict, out, *, batch_size: int, test_size, device: str) -> MeasuringTarget:
    """What a measuring command measures: RUN (its checkpoint checked; results beside it unless --out), or
    --model with --data (measured_named_model; results in --out only). Both, or neither, is a usage error."""
    from .run_access import checkpoint_path

    if run is not None and flags:
        raise click.UsageError("give a RUN or --model with --data, not both")
    if run is None:
        found = measured_named_model(flags, batch_size=batch_size, test_size=test_size, device=device)
        return MeasuringTarget(found, flags["model"], out)
    path = checkpoint_path(run, device)
    return MeasuringTarget(None, path, out or os.path.dirname(os.path.abspath(path)))
