"""`itconv-fast train`: a run from a preset, a config file and flags (in that order of precedence)."""

from __future__ import annotations

import os
import re
import sys

import click

from .model_options import model_flags, model_options, named_loading_errors
from .params import FiniteFloatRange


def parse_objectives(ctx, param, values):
    """--objective NAME:WEIGHT (repeatable) -> {name: weight}, or None when not given."""
    if not values:
        return None
    import math

    from itconv_fast.experiments.config import OBJECTIVE_NAMES

    objectives = {}
    for text in values:
        name, sep, weight_text = text.partition(":")
        if not sep or not name:
            raise click.BadParameter(f"{text!r}: expected NAME:WEIGHT, e.g. fixed-point:0.1", ctx, param)
        if name not in OBJECTIVE_NAMES:
            raise click.BadParameter(
                f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVE_NAMES)}", ctx, param
            )
        try:
            weight = float(weight_text)
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise click.BadParameter(f"{text!r}: the weight must be a finite number >= 0", ctx, param)
        if name in objectives:
            raise click.BadParameter(f"{name} is given twice", ctx, param)
        objectives[name] = weight
    return objectives


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file of train options (keys as below, with _ for -); flags given here override it. "
    "Every run writes its resolved config.yaml, which this reads back.",
)
@click.option(
    "--preset",
    type=click.Choice(["quick", "paper"]),
    default=None,
    help="quick (default): small net and data, minutes on a CPU. paper: 3 x 16 blocks, width 16, full data, 60 epochs.",
)
@click.option(
    "--dataset",
    type=click.Choice(["digitclutter", "digits", "mnist", "cifar10", "cifar100"]),
    default="digitclutter",
    show_default=True,
    help="digits: scikit-learn's 1,797 real 8 x 8 handwritten digits (no download; pip install scikit-learn).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where MNIST / CIFAR files are (torchvision layout).",
)
@click.option("--download", is_flag=True, help="Fetch MNIST / CIFAR archives over HTTPS (md5 verified).")
@click.option(
    "--n-digits", type=click.IntRange(1, 10), default=3, show_default=True, help="Digitclutter digits per image."
)
@click.option(
    "--train-size", type=click.IntRange(min=1), default=None, help="Training examples (seeded, stratified subset)."
)
@click.option("--test-size", type=click.IntRange(min=1), default=None, help="Test examples.")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Base width w (stage s: w * 2^s).")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="Blocks per stage T.")
@click.option("--stages", type=click.IntRange(min=1), default=None, help="Stages S.")
@click.option("--lam", type=FiniteFloatRange(0.0, 1.0), default=None, help="Soft gradient coupling factor in [0, 1].")
@click.option("--coupling-kernel", type=click.Choice(["uniform", "triangular"]), default=None)
@click.option(
    "--skip-first", type=click.IntRange(min=0), default=None, help="Leave the first k blocks of each stage uncoupled."
)
@click.option(
    "--sn-mu",
    type=FiniteFloatRange(min=0.0, min_open=True),
    default=None,
    help="Lipschitz bound mu on every residual function (spectral normalization; off if not given).",
)
@click.option("--sn-mode", type=click.Choice(["operator", "matrix", "gram"]), default=None)
@click.option(
    "--pcr/--icr",
    default=None,
    help="Properly convergent updates z_t = x_s + f~_t(z_{t-1}) (--pcr), or z_{t-1} + f~_t(z_{t-1}) (--icr, the "
    "default).",
)
@click.option(
    "--init",
    type=click.Choice(["auto", "nonrecurrent", "recurrent"]),
    default=None,
    help="auto: recurrent when --lam > 0 (the paper).",
)
@click.option("--bn-gamma-init", type=FiniteFloatRange(), default=None)
@click.option(
    "--objective",
    "objectives",
    multiple=True,
    metavar="NAME:WEIGHT",
    callback=parse_objectives,
    help="An extra loss term and its weight (repeatable): extra-iterations, fixed-point, jacobian-frobenius, "
    "jacobian-spectral; e.g. --objective fixed-point:0.1.",
)
@click.option(
    "--objective-k",
    type=click.IntRange(min=1),
    default=None,
    help="K_train of extra-iterations: each step applies a stage's last block k <= K_train more times (default 16).",
)
@click.option(
    "--objective-rho",
    type=FiniteFloatRange(min=0.0),
    default=None,
    help="The target sigma of jacobian-spectral: max(0, sigma - rho)^2 is penalised (default 0.9).",
)
@click.option(
    "--freeze-bn",
    is_flag=True,
    default=None,
    help="BatchNorm layers normalise with their running statistics throughout training (fine-tuning's frozen BN).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option(
    "--accumulate",
    type=click.IntRange(min=1),
    default=None,
    help="Gradient accumulation: micro-batches per optimizer step (the batch size stays the global one).",
)
@click.option(
    "--lr", type=FiniteFloatRange(min=0.0, min_open=True), default=None, help="Learning rate at batch size 128."
)
@click.option("--weight-decay", type=FiniteFloatRange(min=0.0), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", type=str, default=None, help="auto (default), cpu, cuda, cuda:N.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (default runs/<dataset>-lam<lam>-mu<mu>-seed<seed>).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--restart-diverged",
    is_flag=True,
    help="With --resume, on a run whose training diverged: continue from its last good epoch (--lr and "
    "--weight-decay may differ from the run's).",
)
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", "on", "off"]),
    is_flag=False,
    flag_value="on",
    default=None,
    help="torch.compile the model: auto (default) turns it on when the run has enough steps to "
    "repay the compilation on its device (docs/training.md); --compile alone is on.",
)
@click.option("--no-compile", is_flag=True, help="Same as --compile off.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@model_options
def train(
    config_file,
    preset,
    dataset,
    data_dir,
    download,
    n_digits,
    train_size,
    test_size,
    width,
    blocks,
    stages,
    lam,
    coupling_kernel,
    skip_first,
    sn_mu,
    sn_mode,
    pcr,
    init,
    bn_gamma_init,
    objectives,
    objective_k,
    objective_rho,
    freeze_bn,
    epochs,
    batch_size,
    accumulate,
    lr,
    weight_decay,
    seed,
    device,
    out,
    resume,
    restart_diverged,
    compile_,
    no_compile,
    no_progress,
    model_name,
    model_kwargs,
    weights,
    pretrained,
    data_spec,
    image_size,
    seq_len,
) -> None:
    """Train the paper's ResNet with soft gradient coupling and a Lipschitz constraint, or fine-tune a model by
    name on your data with the same objectives (its indices written before and after).

    Examples: itconv-fast train --lam 0.5 --sn-mu 0.95; itconv-fast train --objective fixed-point:0.1;
    itconv-fast train --config run.yaml --seed 1; itconv-fast train --model timm:resnet18 --weights w.pt
    --data imagefolder:DIR --objective extra-iterations:1
    """

    from itconv_fast.experiments import training
    from itconv_fast.experiments.divergence import EXIT_DIVERGED, TrainingDiverged
    from itconv_fast.experiments.named_runs import named_model_and_task
    from itconv_fast.io.checkpoint import CheckpointError

    flags = dict(
        dataset=dataset,
        data_dir=data_dir,
        download=download or None,
        n_digits=n_digits,
        train_size=train_size,
        test_size=test_size,
        width=width,
        blocks=blocks,
        stages=stages,
        lam=lam,
        coupling_kernel=coupling_kernel,
        skip_first=skip_first,
        sn_mu=sn_mu,
        sn_mode=sn_mode,
        pcr=pcr,
        init=init,
        bn_gamma_init=bn_gamma_init,
        objectives=objectives,
        objective_k=objective_k,
        objective_rho=objective_rho,
        freeze_bn=freeze_bn or None,
        epochs=epochs,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        compile="off" if no_compile else compile_,
    )
    flags = {k: v for k, v in flags.items() if v is not None}
    flags.update(model_flags(model_name, model_kwargs, weights, pretrained, data_spec, image_size, seq_len))
    config = resolve_train_config(config_file, preset, flags)
    try:
        training.resolve_device(config.device)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    if config.dataset not in ("digitclutter", "digits") and config.data_dir is None:
        raise click.BadParameter(
            f"{config.dataset} needs --data-dir (add --download to fetch it)", param_hint="--data-dir"
        )
    # Load the data (and a named model) before anything is written: missing or corrupt files are a usage error.
    model = None
    if config.model is not None:
        with named_loading_errors():
            model, task = named_model_and_task(config, hold_out=True)
    else:
        task = load_builtin_task(config)
    if out is None:
        mu = "none" if config.sn_mu is None else f"{config.sn_mu:g}"
        extra = "".join(f"-{name}{weight:g}" for name, weight in config.objectives.items())
        what = config.dataset if config.model is None else re.sub(r"[^A-Za-z0-9_.-]+", "_", config.model)
        out = os.path.join("runs", f"{what}-lam{config.lam:g}-mu{mu}{extra}-seed{config.seed}")
    if os.path.exists(os.path.join(out, "checkpoint.pt")) and not resume:
        raise click.BadParameter(
            f"{out} already holds a run; pass --resume to continue it or choose another --out", param_hint="--out"
        )
    # Under torchrun every rank runs this command; only rank 0 reports (as only rank 0 writes).
    echo = click.echo if int(os.environ.get("RANK", "0")) == 0 else (lambda *args, **kwargs: None)
    echo(describe_run(config, task) + f" -> {out}")
    if restart_diverged and not resume:
        raise click.BadParameter("--restart-diverged goes with --resume", param_hint="--restart-diverged")
    try:
        metrics = training.train(
            config,
            out,
            resume=resume,
            progress=not no_progress,
            task=task,
            restart_diverged=restart_diverged,
            model=model,
        )
    except TrainingDiverged as exc:
        good = exc.record.get("epoch", 1) - 1
        echo(
            f"{exc.describe()}; {exc.outcome()}; {out}/metrics.json says status: diverged; "
            + (f"{out}/checkpoint.pt is still epoch {good}'s" if good else "no epoch had finished")
            + f" (exit {EXIT_DIVERGED})",
            err=True,
        )
        sys.exit(EXIT_DIVERGED)
    except training.RunDivergedError as exc:
        raise click.BadParameter(str(exc), param_hint="--resume") from None
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="--resume") from None
    except OSError as exc:  # a full disk, a write error: the previous files are intact (atomic writes)
        raise click.ClickException(
            f"{exc.filename or out}: {exc.strerror or exc}; the previous files are kept"
        ) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    last = metrics["epochs"][-1]
    total = sum(e["seconds"] for e in metrics["epochs"])
    echo(
        f"done: {len(metrics['epochs'])} epochs in {total:.0f} s; test error {last['test_error']:.4f} "
        f"(chance {metrics['chance_error']:.4f}), train loss {last['train_loss']:.4f}; wrote {out}/metrics.json, "
        f"{out}/checkpoint.pt"
    )
    for when, summary in metrics.get("indices", {}).items():  # a named model's, before and after fine-tuning
        values = ", ".join(f"{k.upper()} {_number(summary[k], '.3f')}" for k in ("ci", "ri", "di"))
        echo(f"indices {when}: error {_number(summary['error'], '.4f')}, {values} (undefined: -)")


def _number(value, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # None (from JSON) or NaN: undefined


def describe_run(config, task) -> str:
    """The line that opens a run: what trains, on what, with which coupling, bound and objectives."""
    what = (
        f"{config.dataset} (preset {config.preset}): width {config.width}, {config.stages} x {config.blocks} blocks, "
        if config.model is None
        else f"{config.model} on {config.data} ({len(task.train)} training, {len(task.test)} test examples): "
    )
    init = f", init {config.resolved_init()}" if config.model is None else ""
    return f"training {what}lam {config.lam}, sn_mu {config.sn_mu} ({config.sn_mode}){init}" + "".join(
        f", {name} x {weight:g}" for name, weight in config.objectives.items()
    )


def load_builtin_task(config):
    """One of the library's data sets; missing or corrupt files and a missing scikit-learn are usage errors."""
    from itconv_fast.data import datasets, vision

    try:
        return datasets.load(
            config.dataset,
            data_dir=config.data_dir,
            download=config.download,
            n_digits=config.n_digits,
            train_size=config.train_size,
            test_size=config.test_size,
            seed=config.seed,
            cache_dir=config.cache_dir or datasets.default_cache_dir(),
        )
    except vision.DatasetFilesError as exc:
        raise click.BadParameter(str(exc), param_hint="--data-dir") from exc
    except ImportError as exc:  # digits without scikit-learn
        raise click.BadParameter(str(exc), param_hint="--dataset") from exc


def resolve_train_config(config_file, preset, flags: dict):
    """preset < config file < command-line flags; any bad key or value is a usage error (exit 2) naming the
    flag, or the file for values that came from it."""
    from itconv_fast.experiments import config as configs

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
