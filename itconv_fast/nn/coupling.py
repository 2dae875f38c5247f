"""Soft gradient coupling for whole models (SPEC section 2; the paper's recurrence regularisation).

Call the coupler between ``loss.backward()`` (after the data-parallel all-reduce, which DDP finishes
inside backward) and ``optimizer.step()``::

    coupler = GradientCoupler(groups_from_blocks(model.layers), lam=0.5)
    loss.backward()
    coupler()           # one fused call for every slot of every stage
    optimizer.step()

With gradient accumulation, call it once, after the last backward of the step.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..ops.coupling import as_coupling_groups, check_coupling_groups, check_coupling_settings, soft_couple_

__all__ = ["GradientCoupler", "groups_from_blocks"]


def groups_from_blocks(*block_lists: Iterable[nn.Module]) -> list[list[nn.Parameter]]:
    """Parameter groups for coupling, built from lists of same-shaped blocks.

    Each argument is one "stage": an iterable (e.g. an ``nn.ModuleList``) of blocks with the same
    parameter names and shapes. Same-named parameters of a stage's blocks form one group. Raises
    ValueError if the blocks of a stage differ in their parameters' names or shapes.
    """
    groups: list[list[nn.Parameter]] = []
    for s, blocks in enumerate(block_lists):
        blocks = list(blocks)
        if not blocks:
            continue
        named = [dict(block.named_parameters()) for block in blocks]
        names = list(named[0])
        for t, params in enumerate(named[1:], start=1):
            if list(params) != names:
                raise ValueError(
                    f"groups_from_blocks: stage {s}, block {t} has parameters {sorted(params)}, block 0 has "
                    f"{sorted(names)}"
                )
            for name in names:
                if params[name].shape != named[0][name].shape:
                    raise ValueError(
                        f"groups_from_blocks: stage {s}, block {t}: {name} has shape {tuple(params[name].shape)}, "
                        f"block 0 has {tuple(named[0][name].shape)}"
                    )
        for name in names:
            groups.append([params[name] for params in named])
    return groups


class GradientCoupler:
    """Applies soft gradient coupling to groups of parameters' gradients.

    Args:
        groups: a model that defines ``coupling_groups()`` (the toolkit's ResNets and ResidualStack do), a
            residual model with ``stages[s].blocks`` (itconv_fast.models.residual), or a sequence of parameter groups
            (see :func:`groups_from_blocks`).
        lam: coupling factor in [0, 1] (0: ordinary training; 1: the gradients of a group are replaced by
            their mean, so recurrently initialised blocks stay identical: a recurrent network).
        kernel: "uniform" or "triangular"; bandwidth and skip_first: see :func:`itconv_fast.ops.soft_couple_`.

    A ``None`` gradient counts as zero: when other members of its group have gradients, it is
    materialised as zeros before coupling (so that block does receive its share of the mean).
    """

    def __init__(
        self,
        groups,
        lam: float,
        *,
        kernel: str = "uniform",
        bandwidth: Optional[float] = None,
        skip_first: int = 0,
    ) -> None:
        if hasattr(groups, "coupling_groups"):
            groups = groups.coupling_groups()
        elif isinstance(groups, nn.Module) and hasattr(groups, "stages"):
            # A residual model (itconv_fast.models.residual): each stage's blocks, same-named parameters grouped.
            stages = groups.stages
            if not all(isinstance(b, nn.Module) for st in stages for b in getattr(st, "blocks", [None])):
                raise TypeError(
                    "GradientCoupler: the model's stages need `blocks` that are nn.Modules (a residual model)"
                )
            groups = groups_from_blocks(*(st.blocks for st in stages))
        if isinstance(groups, nn.Module):
            raise TypeError(
                "GradientCoupler: this model defines no coupling_groups() and no stages of blocks; build the groups "
                "with groups_from_blocks(model.<blocks>, ...) or wrap it in itconv_fast.ResidualStack"
            )
        self.groups: list[list[nn.Parameter]] = [list(g) for g in groups]
        for gi, group in enumerate(self.groups):
            for j, p in enumerate(group):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"GradientCoupler: group {gi}, member {j} is a {type(p).__name__}, not a parameter")
        # Check the settings and the parameters' shapes now, not at the first step.
        check_coupling_settings(lam, kernel, bandwidth, skip_first)
        with torch.no_grad():
            check_coupling_groups(as_coupling_groups([[p.detach() for p in g] for g in self.groups]), skip_first)
        self.lam = float(lam)
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.skip_first = skip_first

    def gradient_groups(self) -> list[list[torch.Tensor]]:
        """The current gradients of every group (None gradients materialised as zeros)."""
        out = []
        for group in self.groups:
            if all(p.grad is None for p in group):
                continue
            for p in group:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            out.append([p.grad for p in group])
        return out

    @torch.no_grad()
    def __call__(self) -> None:
        """Couple the gradients now (after backward, before the optimizer step)."""
        if self.lam == 0.0:
            return
        soft_couple_(
            self.gradient_groups(),
            self.lam,
            kernel=self.kernel,
            bandwidth=self.bandwidth,
            skip_first=self.skip_first,
        )

    step = __call__

    def __repr__(self) -> str:
        return (
            f"GradientCoupler(groups={len(self.groups)}, lam={self.lam}, kernel={self.kernel!r}, "
            f"bandwidth={self.bandwidth}, skip_first={self.skip_first})"
        )
