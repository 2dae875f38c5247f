"""Objectives that encourage iterative convergent computation: extra loss terms for training any residual
model (IterResNet, ResidualStack, the transformer adapter), each computed from the stage activations of the
training forward pass. Builds on models; the training step (experiments/step.py) adds them to the loss.

    objectives = [FixedPointResidual(weight=0.1), ExtraIterationLoss(weight=0.5, k_max=16)]
    make_objective("jacobian-spectral", 1.0, rho=0.9)
"""

from .base import Objective, ObjectiveContext, ObjectiveTerm, frozen_batchnorm_statistics, record_stages
from .extra_iterations import ExtraIterationLoss
from .fixed_point import FixedPointResidual
from .jacobian import JacobianFrobenius, JacobianSpectral

OBJECTIVES = {cls.name: cls for cls in (ExtraIterationLoss, FixedPointResidual, JacobianFrobenius, JacobianSpectral)}


def make_objective(name: str, weight: float, *, k: int = 16, rho: float = 0.9) -> Objective:
    """The objective called `name` (a key of OBJECTIVES) with its weight; `k` is K_train of the
    extra-iteration loss, `rho` the target of the spectral Jacobian penalty (each ignored by the others)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    if name == ExtraIterationLoss.name:
        return ExtraIterationLoss(weight, k_max=k)
    if name == JacobianSpectral.name:
        return JacobianSpectral(weight, rho=rho)
    return OBJECTIVES[name](weight)


__all__ = [
    "Objective",
    "ObjectiveContext",
    "ObjectiveTerm",
    "OBJECTIVES",
    "make_objective",
    "ExtraIterationLoss",
    "FixedPointResidual",
    "JacobianFrobenius",
    "JacobianSpectral",
    "record_stages",
    "frozen_batchnorm_statistics",
]
