"""itconv-fast: measure and manipulate iterative convergent computation in residual networks.

Implements Lippl, Peters & Kriegeskorte (2024, PLoS ONE 19(3): e0293440) with fused kernels. The package is in
layers, each folder importing only from the ones below it (docs/architecture.md):

- ``itconv_fast.ops``: the fused kernels' typed wrappers (soft_couple_, batched_spectral_norm, ...), their
  pure-PyTorch references and the extension loader;
- ``itconv_fast.nn``: what users put into their own models: spectral_norm / BatchedSpectralNorm for any layer,
  GradientCoupler;
- ``itconv_fast.models``: IterResNet (the paper's ResNet family) and its stage spectral norm, the residual-model
  protocol (ResidualStack, transformer_encoder_adapter), a zoo of torchvision-like ResNets;
- ``itconv_fast.measures``: compute_indices (Convergence, Recurrence, Divergence), analyze, lipschitz_report;
- ``itconv_fast.objectives``: extra loss terms that encourage convergence (extra-iteration loss, fixed-point
  residual, Jacobian penalties) on any residual model;
- ``itconv_fast.experiments``: run configurations, train(), indices_of_run, Ray Tune sweeps, reports, the toy
  problem;
- ``itconv_fast.data`` (Digitclutter, MNIST, CIFAR), ``itconv_fast.io`` (safe checkpoints, atomic writes),
  ``itconv_fast.bench`` (the benchmarks), ``itconv_fast.cli`` (the ``itconv-fast`` command).

The names users reach for are importable from here: ``from itconv_fast import compute_indices``.
"""

from . import data, experiments, measures, models, nn, objectives, ops
from .experiments import TrainConfig, indices_of_run, train
from .measures import AnalysisReport, IndexReport, LipschitzReport, analyze, compute_indices, lipschitz_report
from .models import (
    IterResNet,
    ResidualStack,
    StageSpectralNorm,
    check_residual_model,
    load_checkpoint,
    residual_model,
    sequence_error,
    sequence_loss,
    transformer_encoder_adapter,
)
from .nn import BatchedSpectralNorm, GradientCoupler, groups_from_blocks, spectral_norm
from .objectives import (
    ExtraIterationLoss,
    FixedPointResidual,
    JacobianFrobenius,
    JacobianSpectral,
    make_objective,
    record_stages,
)
from .ops import batched_spectral_norm, extension_loaded, soft_couple_

__version__ = "0.1.0"

__all__ = [
    # layers
    "ops",
    "nn",
    "models",
    "measures",
    "objectives",
    "experiments",
    "data",
    # ops
    "soft_couple_",
    "batched_spectral_norm",
    "extension_loaded",
    # nn
    "GradientCoupler",
    "groups_from_blocks",
    "spectral_norm",
    "BatchedSpectralNorm",
    # models
    "IterResNet",
    "StageSpectralNorm",
    "load_checkpoint",
    "ResidualStack",
    "check_residual_model",
    "transformer_encoder_adapter",
    "residual_model",
    "sequence_error",
    "sequence_loss",
    # measures
    "compute_indices",
    "IndexReport",
    "analyze",
    "AnalysisReport",
    "lipschitz_report",
    "LipschitzReport",
    # objectives
    "ExtraIterationLoss",
    "FixedPointResidual",
    "JacobianFrobenius",
    "JacobianSpectral",
    "make_objective",
    "record_stages",
    # experiments
    "TrainConfig",
    "train",
    "indices_of_run",
    "__version__",
]
