"""What users put into their own models: spectral normalization of any Linear / ConvNd / ConvTransposeNd layer
(per layer, or batched over a whole model) and soft gradient coupling of same-shaped blocks. Builds on ops.

Files: `geometry` (a layer's linear map and the power steps of same-geometry groups), `parametrization`
(`spectral_norm`), `batched` (`BatchedSpectralNorm`), `coupling` (`GradientCoupler`), `layouts`
(`to_memory_format`, `GlobalAvgPool2d`: layout changes and pooling whose gradients keep the forward's layout),
`norm` (`batch_norm_relu`, `BatchNormReLU2d`: BatchNorm + ReLU in one fused kernel).
"""

from ..ops.spectral import gram_bound_nd
from .batched import BatchedSpectralNorm
from .coupling import GradientCoupler, groups_from_blocks
from .geometry import MODES, LayerGeometry, gram_sigmas, layer_geometry, supported_layer
from .layouts import GlobalAvgPool2d, to_memory_format
from .norm import BatchNormReLU2d, batch_norm_relu
from .parametrization import SpectralNorm, converge_power_vectors, spectral_norm

__all__ = [
    "MODES",
    "SpectralNorm",
    "spectral_norm",
    "converge_power_vectors",
    "BatchedSpectralNorm",
    "supported_layer",
    "layer_geometry",
    "LayerGeometry",
    "gram_sigmas",
    "gram_bound_nd",
    "GradientCoupler",
    "groups_from_blocks",
    "GlobalAvgPool2d",
    "to_memory_format",
    "batch_norm_relu",
    "BatchNormReLU2d",
]
