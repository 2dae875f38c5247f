"""Jacobian penalties of the block map (Bai, Koltun & Kolter 2021, "Stabilizing equilibrium models by Jacobian
regularization"), so that the last block's map R contracts near z_T:

- Frobenius: a Hutchinson estimate of ||J_R(z_T)||_F^2 / d from one vector-Jacobian product,
  E_eps ||eps^T J||^2 / d with eps ~ N(0, I) and d the number of entries of z_T;
- spectral: sigma, the largest singular value of J_R(z_T) estimated by a few power steps (J v by a double
  vector-Jacobian product, J^T u by one), penalised as max(0, sigma - rho)^2.

J is the Jacobian of the map on the whole micro-batch (batch norm in training mode normalises with batch
statistics, so examples are coupled); d = numel(z_T).
"""

from __future__ import annotations

import torch

from .base import (
    Objective,
    ObjectiveContext,
    ObjectiveTerm,
    check_float,
    check_positive_int,
    frozen_batchnorm_statistics,
    last_block_map,
)

__all__ = ["JacobianFrobenius", "JacobianSpectral"]


def _normalized(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(1e-12)


class JacobianFrobenius(Objective):
    """Mean over stages of ||eps^T J_R(z_T)||^2 / d (one Gaussian eps per stage and call)."""

    name = "jacobian-frobenius"

    def __call__(self, context: ObjectiveContext) -> ObjectiveTerm:
        model = context.model
        values = []
        with frozen_batchnorm_statistics(model):
            for stage, x_s, z in context.stages():
                out = last_block_map(stage, z, x_s)
                eps = torch.randn(z.shape, generator=context.generator, dtype=z.dtype).to(z.device)
                (vjp,) = torch.autograd.grad(out, z, eps, create_graph=True)
                values.append(vjp.pow(2).sum() / z.numel())
        value = torch.stack(values).mean()
        return ObjectiveTerm(value, {f"s{s + 1}": v.item() for s, v in enumerate(values)})


class JacobianSpectral(Objective):
    """Mean over stages of max(0, sigma - rho)^2, sigma estimated by `power_steps` power iterations on J^T J
    from a random start (an estimate from below), then sigma = <J^T u, v> with u, v held constant (the
    gradient of the largest singular value, as in spectral normalization)."""

    name = "jacobian-spectral"

    def __init__(self, weight: float = 1.0, rho: float = 0.9, power_steps: int = 4) -> None:
        super().__init__(weight)
        self.rho = check_float(rho, f"{self.name}: rho", 0.0)
        self.power_steps = check_positive_int(power_steps, f"{self.name}: power_steps")

    def __repr__(self) -> str:
        return f"JacobianSpectral(weight={self.weight:g}, rho={self.rho:g}, power_steps={self.power_steps})"

    def __call__(self, context: ObjectiveContext) -> ObjectiveTerm:
        model = context.model
        values, sigmas = [], []
        with frozen_batchnorm_statistics(model):
            for stage, x_s, z in context.stages():
                out = last_block_map(stage, z, x_s)
                # J^T g is linear in g: differentiating it against g with v gives J v (a double VJP).
                g = torch.zeros_like(out, requires_grad=True)
                (jt_g,) = torch.autograd.grad(out, z, g, create_graph=True)
                v = _normalized(torch.randn(z.shape, generator=context.generator, dtype=z.dtype).to(z.device))
                for _ in range(self.power_steps):
                    u = _normalized(torch.autograd.grad(jt_g, g, v, retain_graph=True)[0])
                    v = _normalized(torch.autograd.grad(out, z, u, retain_graph=True)[0])
                (jt_u,) = torch.autograd.grad(out, z, u.detach(), create_graph=True)
                sigma = (jt_u * v.detach()).sum()
                sigmas.append(sigma.detach())
                values.append(torch.relu(sigma - self.rho).pow(2))
        value = torch.stack(values).mean()
        parts = {f"sigma_s{s + 1}": v.item() for s, v in enumerate(sigmas)}
        return ObjectiveTerm(value, parts)
