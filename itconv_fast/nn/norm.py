"""BatchNorm followed by ReLU through the fused kernel (ops.batch_norm_relu): `batch_norm_relu(bn, x)` for any
BatchNorm module, and `BatchNormReLU2d`, a BatchNorm2d whose forward includes the ReLU.

The module's bookkeeping is nn.BatchNorm's own (num_batches_tracked, momentum None as a cumulative average,
track_running_stats, eval mode with running statistics); only the arithmetic moves into one kernel. A module
whose class brings its own forward (SyncBatchNorm, a user's subclass) runs `torch.relu(bn(x))` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.batch_norm import check_arguments, checked_batch_norm_relu

__all__ = ["batch_norm_relu", "BatchNormReLU2d"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _fused(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """relu(bn(x)) with nn.BatchNorm's forward logic (torch/nn/modules/batchnorm.py), the op fused."""
    bn._check_input_dim(x)
    keep_buffers = not bn.training or bn.track_running_stats
    running_mean, running_var = (bn.running_mean, bn.running_var) if keep_buffers else (None, None)
    factor = 0.0 if bn.momentum is None else bn.momentum
    # Every argument checked before num_batches_tracked moves: a rejected call changes nothing.
    check_arguments(x, running_mean, running_var, bn.weight, bn.bias, factor, bn.eps)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return checked_batch_norm_relu(x, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, factor, bn.eps)


def batch_norm_relu(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch.relu(bn(x)) for a BatchNorm module `bn`: the same values (to float rounding) and the same updates
    of its buffers, in one fused kernel forward and one backward in training mode."""
    if isinstance(bn, _BatchNorm) and type(bn).forward is _BatchNorm.forward:
        return _fused(bn, x)
    return torch.relu(bn(x))


class BatchNormReLU2d(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, fused (same arguments and state dict as nn.BatchNorm2d)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _fused(self, input)
