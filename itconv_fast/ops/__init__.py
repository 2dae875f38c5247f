"""The ops layer: typed, validated wrappers around `torch.ops.itconv_fast.*`, their pure-PyTorch references and
the extension loader. One file per op family; nothing here imports from another layer of the package.

Every op checks its arguments completely before any tensor is touched (a rejected call modifies nothing), then
dispatches to the compiled kernel for the tensors' device, or, where there is none (the extension not built, or
built without CUDA kernels and given CUDA tensors), to the pure-PyTorch reference in `itconv_fast.ops._reference`,
with one warning per op and process.
"""

from ._extension import extension_loaded
from .batch_norm import batch_norm_relu
from .coupling import COUPLING_KERNELS, soft_couple_
from .spectral import SPECTRAL_MODES, batched_spectral_norm, gram_bound_nd, gram_spectral_bound, init_power_vector

__all__ = [
    "extension_loaded",
    "soft_couple_",
    "COUPLING_KERNELS",
    "batched_spectral_norm",
    "gram_spectral_bound",
    "gram_bound_nd",
    "init_power_vector",
    "SPECTRAL_MODES",
    "batch_norm_relu",
]
