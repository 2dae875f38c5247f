"""itconv-fast: measure and manipulate iterative convergent computation in residual networks.

Implements Lippl, Peters & Kriegeskorte (2024, PLoS ONE 19(3): e0293440) with fused kernels:

- ``itconv_fast.ops``: soft_couple_ (fused soft gradient coupling), batched_spectral_norm
- ``itconv_fast.coupling``: GradientCoupler, groups_from_blocks
- ``itconv_fast.spectral``: StageSpectralNorm (the block-level Lipschitz bound)
- ``itconv_fast.models``: IterResNet (the paper's ResNet family), load_checkpoint
- ``itconv_fast.indices``: compute_indices (Convergence, Recurrence, Divergence)
- ``itconv_fast.analysis``: analyze (refinement measures, anytime inference, convergence traces)
- ``itconv_fast.residual``: the residual-model protocol, ResidualStack, transformer_encoder_adapter
- ``itconv_fast.data``: Digitclutter generator, MNIST / CIFAR readers
- ``itconv_fast.config``, ``itconv_fast.train``: run configurations and the loop behind ``itconv-fast train``
- ``itconv_fast.sweep``, ``itconv_fast.report``, ``itconv_fast.toy``: Ray Tune sweeps, the paper's figures, Fig 1
- ``itconv_fast.checkpoint``: checkpoints read with weights_only=True
- ``itconv_fast.nn``: spectral_norm / BatchedSpectralNorm for any model; ``itconv_fast.lipschitz_report``
"""

from . import nn, ops
from .lipschitz import LipschitzReport, lipschitz_report
from .coupling import GradientCoupler, groups_from_blocks
from .ops import extension_loaded
from .residual import ResidualStack, check_residual_model, transformer_encoder_adapter

__version__ = "0.1.0"

__all__ = ["ops", "nn", "lipschitz_report", "LipschitzReport", "GradientCoupler", "groups_from_blocks", "extension_loaded", "ResidualStack", "check_residual_model",
           "transformer_encoder_adapter", "__version__"]
