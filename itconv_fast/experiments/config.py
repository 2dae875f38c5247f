"""Run configurations: `TrainConfig`, its presets, validation, and YAML files.

    config = config_from("quick", lam=0.5, sn_mu=0.95)          # a preset plus overrides
    values = load_config_file("run.yaml")                       # {key: value}, checked against TrainConfig
    config = build_config(values.pop("preset", "quick"), values)
    write_config_file("runs/x/config.yaml", config)             # the resolved configuration of a run

Every TrainConfig is validated when it is made: a wrong type, a value out of range or a combination that
cannot train (skip_first >= blocks, a batch not divisible by the accumulation steps) raises ConfigError, a
ValueError that names the key. A configuration file is a YAML mapping whose keys are TrainConfig's fields
(`preset` among them); an unknown key, a file that is not a mapping, or invalid YAML is a ConfigError
naming the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from ..ops.coupling import COUPLING_KERNELS
from ..ops.spectral import SPECTRAL_MODES

__all__ = [
    "TrainConfig",
    "PRESETS",
    "ConfigError",
    "config_from",
    "build_config",
    "load_config_file",
    "write_config_file",
    "config_to_yaml",
    "FIELDS",
]

DATASETS = ("digitclutter", "digits", "mnist", "cifar10", "cifar100")
SN_MODES = SPECTRAL_MODES  # (the modes and kernels are defined once, by the ops)
INIT_CHOICES = ("auto", "nonrecurrent", "recurrent")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; `key` names the offending field (or None)."""

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class TrainConfig:
    dataset: str = "digitclutter"
    data_dir: Optional[str] = None
    download: bool = False
    n_digits: int = 3
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    width: int = 16
    blocks: int = 16
    stages: int = 3
    lam: float = 0.0
    coupling_kernel: str = "uniform"
    coupling_bandwidth: Optional[float] = None
    skip_first: int = 0
    sn_mu: Optional[float] = None
    sn_mode: str = "operator"
    pcr: bool = False
    init: str = "auto"  # "auto": recurrent when lam > 0 (the paper), else nonrecurrent
    bn_gamma_init: float = 1.0
    epochs: int = 60
    batch_size: int = 128  # the global batch (over all processes and accumulation steps)
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    lr: float = 0.1  # at batch size 128; scaled linearly with the batch size
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "auto"
    # torch.compile: True, False, or "auto" (on where it pays: experiments/compilation.py)
    compile: Union[bool, str] = "auto"
    cache_dir: Optional[str] = None
    objectives: dict = field(default_factory=dict)  # extra loss terms, {name: weight} (itconv_fast.objectives)
    objective_k: int = 16  # K_train of the extra-iteration loss
    objective_rho: float = 0.9  # the target sigma of the spectral Jacobian penalty
    freeze_bn: bool = False  # BatchNorm layers normalise with their running statistics, which stay as they are
    # A model by name (models/named.py: torchvision:NAME, timm:NAME, hf:NAME_OR_PATH, file.py:FUNCTION) trained on
    # a user's data (imagefolder:DIR, text:FILE) instead of the paper's IterResNet on `dataset`.
    model: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)  # the constructor's keyword arguments
    weights: Optional[str] = None  # a state dict to start from (read with weights_only=True)
    pretrained: bool = False  # the library's weights, from its local cache
    data: Optional[str] = None
    image_size: Optional[int] = None  # the crop side (default: the model's own preprocessing)
    seq_len: int = 64  # tokens per example of text data
    preset: str = "quick"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        if self.skip_first >= self.blocks:
            raise ConfigError(f"skip_first: must be < blocks ({self.blocks}), got {self.skip_first}", "skip_first")
        if (self.model is None) != (self.data is None):
            key = "data" if self.model is not None else "model"
            raise ConfigError(f"{key}: a model by name and data by path go together (--model with --data)", key)
        if self.batch_size % self.accumulate:
            raise ConfigError(
                f"accumulate: batch_size {self.batch_size} is not divisible by {self.accumulate}", "accumulate"
            )

    def resolved_init(self) -> str:
        if self.init == "auto":
            return "recurrent" if self.lam > 0 else "nonrecurrent"
        return self.init


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Presets: values that differ from the dataclass defaults. Any option overrides its preset value.
PRESETS = {
    # Small network and data set: under 10 minutes on 2 CPU cores, well above chance.
    "quick": dict(
        width=8, blocks=4, train_size=12000, test_size=2000, epochs=8, batch_size=128, lr=0.2, warmup_epochs=0.5
    ),
    # The paper: 3 x 16 blocks, width 16, the full data set, a paper-length schedule.
    "paper": dict(width=16, blocks=16, train_size=None, test_size=None, epochs=60, batch_size=128, lr=0.1),
}


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


MAX_INT = 2**31 - 1  # no count or seed of a run is larger; a larger one is a typo or an attack, not a run


# Field checks: each returns the normalised value (ints stay ints, numbers become floats) or raises.
def _int(low=None, optional=False):
    def check(key, v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low) or abs(v) > MAX_INT:
            bound = f" >= {low}" if low is not None else ""
            bound += f" and <= {MAX_INT}"
            raise ConfigError(f"{key}: must be an integer{bound}{' or null' if optional else ''}, got {v!r}", key)
        return v

    return check


def _float(low=None, high=None, low_open=False, optional=False):
    def check(key, v):
        if v is None and optional:
            return None
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and _finite(v)
        ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
        if not ok:
            what = "a finite number"
            if low is not None and high is not None:
                what += f" in [{low}, {high}]"
            elif low is not None:
                what += f" {'>' if low_open else '>='} {low}"
            raise ConfigError(f"{key}: must be {what}{' or null' if optional else ''}, got {v!r}", key)
        return float(v)

    return check


def _choice(options):
    def check(key, v):
        if v not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}; got {v!r}", key)
        return v

    return check


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: must be true or false, got {v!r}", key)
    return v


def _compile(key, v):
    if isinstance(v, bool) or v == "auto":
        return v
    if v in ("on", "off"):  # the CLI's spelling
        return v == "on"
    raise ConfigError(f"{key}: must be true, false or auto, got {v!r}", key)


def _text(optional):
    def check(key, v):
        if (v is None and optional) or isinstance(v, str):
            return v
        raise ConfigError(f"{key}: must be a string{' or null' if optional else ''}, got {v!r}", key)

    return check


# The objectives' names (itconv_fast.objectives.OBJECTIVES), kept here so that configurations are checked without
# importing the objectives (tests/test_objectives.py checks that the two lists agree).
OBJECTIVE_NAMES = ("extra-iterations", "fixed-point", "jacobian-frobenius", "jacobian-spectral")


def _objectives(key, v):
    """{name: weight}, names from OBJECTIVE_NAMES, weights finite and >= 0; returned sorted by name."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a mapping of objective names to weights, got {v!r}", key)
    checked = {}
    for name in sorted(v, key=str):
        if name not in OBJECTIVE_NAMES:
            raise ConfigError(f"{key}: unknown objective {name!r}; expected one of {', '.join(OBJECTIVE_NAMES)}", key)
        weight = v[name]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _finite(weight) or weight < 0:
            raise ConfigError(f"{key}: the weight of {name} must be a finite number >= 0, got {weight!r}", key)
        checked[name] = float(weight)
    return checked


def _spec(module: str, parser: str):
    """A string or None that module.parser accepts (imported when first used; it raises ValueError otherwise)."""

    def check(key, v):
        if v is None:
            return None
        try:
            getattr(importlib.import_module(module, __package__), parser)(_text(False)(key, v))
        except ValueError as exc:  # ModelNameError is one
            raise ConfigError(f"{key}: {exc}", key) from None
        return v

    return check


def _kwargs(key, v):
    """{name: plain value} (numbers, strings, booleans, None, lists of them): a constructor's keyword arguments."""
    if v is None:
        return {}
    plain = (bool, int, float, str, type(None))
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and k.isidentifier() and (isinstance(x, plain) or (
            isinstance(x, list) and all(isinstance(i, plain) for i in x))) for k, x in v.items()
    ):  # fmt: skip
        raise ConfigError(f"{key}: must map argument names to numbers, strings, booleans or lists, got {v!r}", key)
    return dict(v)


_CHECKS = {
    "dataset": _choice(DATASETS),
    "data_dir": _text(True),
    "download": _bool,
    "n_digits": _int(1),
    "train_size": _int(1, True),
    "test_size": _int(1, True),
    "width": _int(1),
    "blocks": _int(1),
    "stages": _int(1),
    "lam": _float(0.0, 1.0),
    "coupling_kernel": _choice(COUPLING_KERNELS),
    "coupling_bandwidth": _float(1.0, optional=True),
    "skip_first": _int(0),
    "sn_mu": _float(0.0, low_open=True, optional=True),
    "sn_mode": _choice(SN_MODES),
    "pcr": _bool,
    "init": _choice(INIT_CHOICES),
    "bn_gamma_init": _float(),
    "epochs": _int(1),
    "batch_size": _int(1),
    "accumulate": _int(1),
    "lr": _float(0.0, low_open=True),
    "weight_decay": _float(0.0),
    "warmup_epochs": _float(0.0),
    "seed": _int(),
    "device": _text(False),
    "compile": _compile,
    "cache_dir": _text(True),
    "preset": _choice(tuple(PRESETS)),
    "objectives": _objectives,
    "objective_k": _int(1),
    "objective_rho": _float(0.0),
    "freeze_bn": _bool,
    "model": _spec("..models.named", "parse_model_name"),
    "model_kwargs": _kwargs,
    "weights": _text(True),
    "pretrained": _bool,
    "data": _spec("..data.datasets", "parse_data_spec"),
    "image_size": _int(1, True),
    "seq_len": _int(1),
}
assert set(_CHECKS) == set(FIELDS), "every TrainConfig field needs a check"


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted((k for k in values if k not in FIELDS), key=repr)
    if unknown:
        names = ", ".join(k if isinstance(k, str) and k.isidentifier() else repr(k) for k in unknown)
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names} (known: {', '.join(FIELDS)})", unknown[0]
        )


def build_config(preset: str = "quick", values: Optional[dict] = None) -> TrainConfig:
    """The preset's values, then every entry of `values` as given (None included: `sn_mu: null` is off). With a
    model by name the preset's train_size and test_size (its data sets') are not used."""
    values = dict(values or {})
    _check_keys(values, "configuration")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}; got {preset!r}", "preset")
    merged = dict(PRESETS[preset])
    if values.get("model") is not None:  # a preset's data sizes are those of the library's data sets, not a user's
        merged.pop("train_size", None)
        merged.pop("test_size", None)
    merged.update(values)
    merged["preset"] = preset
    return TrainConfig(**merged)


def config_from(preset: str = "quick", **overrides) -> TrainConfig:
    """A TrainConfig from a preset plus overrides (None means: keep the preset's value)."""
    return build_config(preset, {k: v for k, v in overrides.items() if v is not None})


def read_yaml(path: str, error=None):
    """The content of a YAML file (yaml.safe_load); an unreadable file or invalid YAML raises `error`
    (default ConfigError) with a one-line message naming the file."""
    import yaml

    error = error or ConfigError
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)  # safe_load: plain data only, a !!python/object tag is an error, never code
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply") from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # ValueError: e.g. an integer of 5,000 digits
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid YAML"
        raise error(f"{path}: not valid YAML ({first[:200]})") from None


def load_config_file(path: str) -> dict:
    """The entries of a YAML configuration file, keys checked against TrainConfig (values are checked when
    the TrainConfig is built). Raises ConfigError naming the file."""
    values = read_yaml(path, ConfigError)
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{path}: must be a mapping of option names to values, got a {type(values).__name__}")
    _check_keys(values, path)
    return values


def config_to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def write_config_file(path: str, config: TrainConfig) -> None:
    """The resolved configuration as YAML, written atomically (`--config` reads it back to the same run)."""
    from ..io.checkpoint import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(
        path, "# itconv-fast run configuration (itconv-fast train --config this-file)\n" + config_to_yaml(config)
    )
