"""itconv-fast: measure and manipulate iterative convergent computation in residual networks.

Implements Lippl, Peters & Kriegeskorte (2024, PLoS ONE 19(3): e0293440) with fused kernels:

- ``itconv_fast.ops``: soft_couple_ (fused soft gradient coupling), batched_spectral_norm
- ``itconv_fast.coupling``: GradientCoupler, groups_from_blocks
- ``itconv_fast.spectral``: StageSpectralNorm (the block-level Lipschitz bound)
- ``itconv_fast.models``: IterResNet (the paper's ResNet family), load_checkpoint
- ``itconv_fast.indices``: compute_indices (Convergence, Recurrence, Divergence)
- ``itconv_fast.data``: Digitclutter generator, MNIST / CIFAR readers
- ``itconv_fast.train``: the training loop behind ``itconv-fast train``
"""

from . import ops
from .coupling import GradientCoupler, groups_from_blocks
from .ops import extension_loaded

__version__ = "0.1.0"

__all__ = ["ops", "GradientCoupler", "groups_from_blocks", "extension_loaded", "__version__"]
