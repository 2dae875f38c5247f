"""The fixed-point residual penalty: ||R(z_T) - z_T||^2 / ||z_T||^2 per stage, R the stage's last block map
(ICR: z + f~_T(z); PCR: x_s + f~_T(z)), so that z_T is near a fixed point of the last block."""

from __future__ import annotations

import torch

from .base import (
    Objective,
    ObjectiveContext,
    ObjectiveTerm,
    frozen_batchnorm_statistics,
    last_block_map,
    per_example_squared_norm,
)

__all__ = ["FixedPointResidual"]


class FixedPointResidual(Objective):
    """Mean over stages of the mean over examples of ||R(z_T) - z_T||^2 / ||z_T||^2.

    Reuses the forward pass's z_T and x_s: one extra evaluation of each stage's last block. Exactly 0 when
    z_T is a fixed point of R (e.g. f~_T = 0 for the ICR)."""

    name = "fixed-point"

    def __call__(self, context: ObjectiveContext) -> ObjectiveTerm:
        model = context.model
        values = []
        with frozen_batchnorm_statistics(model):
            for stage, x_s, z in context.stages():
                step = last_block_map(stage, z, x_s) - z
                ratio = per_example_squared_norm(step) / per_example_squared_norm(z).clamp_min(1e-12)
                values.append(ratio.mean())
        value = torch.stack(values).mean()
        return ObjectiveTerm(value, {f"s{s + 1}": v.item() for s, v in enumerate(values)})
