"""The extra-iteration loss (the "progressive loss" of Bansal et al. 2022, "End-to-end algorithm synthesis with
recurrent networks: logical extrapolation without overthinking"): the output must stay right when a stage's
last block is applied k more times."""

from __future__ import annotations

import torch

from .base import (
    Objective,
    ObjectiveContext,
    ObjectiveTerm,
    check_positive_int,
    frozen_batchnorm_statistics,
    last_block_map,
    rest_of_network,
)

__all__ = ["ExtraIterationLoss"]


class ExtraIterationLoss(Objective):
    """The task loss of the read-out when stage s's last block runs k more times, z_{T+j} = R(z_{T+j-1}), from
    the forward pass's z_T, the rest of the network unchanged. Each call draws s uniformly from the stages
    and k uniformly from 1..k_max (the Divergence Index perturbs one stage at a time in the same way).

    Cost: k + (blocks after stage s) block evaluations and the head, forward and backward."""

    name = "extra-iterations"

    def __init__(self, weight: float = 1.0, k_max: int = 16) -> None:
        super().__init__(weight)
        self.k_max = check_positive_int(k_max, f"{self.name}: k_max")

    def __repr__(self) -> str:
        return f"ExtraIterationLoss(weight={self.weight:g}, k_max={self.k_max})"

    def __call__(self, context: ObjectiveContext) -> ObjectiveTerm:
        model = context.model
        s = int(torch.randint(len(model.stages), (1,), generator=context.generator))
        k = int(torch.randint(1, self.k_max + 1, (1,), generator=context.generator))
        stage, x_s, z = model.stages[s], context.stage_inputs[s], context.stage_outputs[s]
        with frozen_batchnorm_statistics(model):
            for _ in range(k):
                z = last_block_map(stage, z, x_s)
            logits = rest_of_network(model, z, s)
        value = context.loss_fn(logits.float(), context.y)
        return ObjectiveTerm(value, {"stage": s + 1, "k": k})
