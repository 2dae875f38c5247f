"""Running the science: run configurations, the training loop (`train`, with its step in `step`), measuring a run
(`indices_of_run`), Ray Tune sweeps, the markdown report with the paper's figures, and the toy problem of Fig 1.
Builds on every layer below (data, models, measures, nn, ops, io).
"""

from .config import PRESETS, ConfigError, TrainConfig, build_config, config_from, load_config_file, write_config_file
from .evaluation import indices_of_run, run_evaluation
from .step import TrainStep
from .training import evaluate, train

__all__ = [
    "TrainConfig",
    "PRESETS",
    "ConfigError",
    "build_config",
    "config_from",
    "load_config_file",
    "write_config_file",
    "train",
    "evaluate",
    "TrainStep",
    "indices_of_run",
    "run_evaluation",
]
