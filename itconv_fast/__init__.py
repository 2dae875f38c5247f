"""itconv-fast: measure and manipulate iterative convergent computation in residual networks.

Implements Lippl, Peters & Kriegeskorte (2024, PLoS ONE 19(3): e0293440) with fused kernels:
soft gradient coupling (`itconv_fast.coupling`, `itconv_fast.ops.soft_couple_`).
"""

from . import ops
from .coupling import GradientCoupler, groups_from_blocks
from .ops import extension_loaded

__version__ = "0.1.0"

__all__ = ["ops", "GradientCoupler", "groups_from_blocks", "extension_loaded", "__version__"]
