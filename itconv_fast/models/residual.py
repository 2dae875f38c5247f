"""Any residual stack: the protocol the indices, the analysis and the coupler accept, and adapters.

A residual model, for itconv-fast, is an object with
- `stem(x) -> z`: the input to the first stage;
- `stages`: a sequence of stages; each has `blocks` (a sequence of objects with `residual(z) -> f_t(z)`) and
  `pcr` (False: z_t = z_{t-1} + f_t(z_{t-1}); True: z_t = x_s + f_t(z_{t-1}), x_s the stage's input);
- `transitions`: len(stages) - 1 callables between consecutive stages (identity where there is none);
- `head(z) -> outputs`: logits [N, K], or [N, L, K] for sequence outputs;
- `parameters()` (an nn.Module's), for the device and dtype.

`IterResNet` is one. `ResidualStack` wraps any stem, lists of residual functions and head in a few lines;
`ResidualStack.from_layers` takes layers that compute the whole update z -> z + f(z) (as most models'
blocks do: f(z) = layer(z) - z); `transformer_encoder_adapter` wraps `torch.nn.TransformerEncoder`.

Sequence outputs: `sequence_error` and `sequence_loss` score [N, L, K] logits against [N, L] targets per
token and reduce per example by the mean over its tokens, so an evaluation set's error is the mean token
error (for sequences of equal length; with `ignore_index` tokens left out of their example's mean).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "ResidualStack",
    "transformer_encoder_adapter",
    "check_residual_model",
    "sequence_error",
    "sequence_loss",
    "LayerResidual",
    "block_update",
]


def block_update(stage, block, z: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
    """One block update of a residual model's stage: z + f(z), or x_s + f(z) when the stage is PCR."""
    return (x_s if stage.pcr else z) + block.residual(z)


def check_residual_model(model, where: str = "itconv-fast") -> None:
    """Raises TypeError naming the first missing part of the residual-model protocol (module docstring)."""

    def missing(what):
        raise TypeError(
            f"{where}: the model is not a residual model: {what} (see itconv_fast.models.residual; wrap it with "
            "ResidualStack or transformer_encoder_adapter)"
        )

    for name in ("stem", "head"):
        if not callable(getattr(model, name, None)):
            missing(f"it has no callable `{name}`")
    stages = getattr(model, "stages", None)
    if stages is None or not hasattr(stages, "__len__") or len(stages) == 0:
        missing("it has no non-empty `stages`")
    for s, stage in enumerate(stages):
        blocks = getattr(stage, "blocks", None)
        if blocks is None or len(blocks) == 0:
            missing(f"stage {s} has no non-empty `blocks`")
        if not isinstance(getattr(stage, "pcr", None), bool):
            missing(f"stage {s} has no boolean `pcr` (its update rule)")
        for t, block in enumerate(blocks):
            if not callable(getattr(block, "residual", None)):
                missing(f"stage {s}, block {t} has no `residual(z)`")
    transitions = getattr(model, "transitions", None)
    if transitions is None or len(transitions) != len(stages) - 1:
        missing(f"it needs `transitions`, {len(stages) - 1} callables between its {len(stages)} stages")
    if not callable(getattr(model, "parameters", None)) or next(iter(model.parameters()), None) is None:
        missing("it has no parameters() (an nn.Module's, for the device and dtype)")


def sequence_error(logits: torch.Tensor, targets: torch.Tensor, ignore_index: Optional[int] = None) -> torch.Tensor:
    """Per example: the share of its tokens whose arg-max is wrong ([N, L, K] logits, [N, L] targets)."""
    wrong = (logits.argmax(-1) != targets).double()
    if ignore_index is None:
        return wrong.mean(-1)
    keep = (targets != ignore_index).double()
    return (wrong * keep).sum(-1) / keep.sum(-1).clamp_min(1)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per example: the mean cross-entropy over its tokens."""
    loss = nn.functional.cross_entropy(logits.transpose(1, -1), targets, reduction="none", ignore_index=ignore_index)
    keep = (targets != ignore_index).to(loss.dtype)
    return loss.sum(-1) / keep.sum(-1).clamp_min(1)


class _Block(nn.Module):
    """One block of a ResidualStack: residual(z) is the user's f(z)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        return self.f(z)


class LayerResidual(nn.Module):
    """The residual function of a layer that computes the whole update: f(z) = layer(z) - z, so that
    z + f(z) is exactly layer(z)."""

    def __init__(self, layer: Callable) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer(z) - z


class _Stage(nn.Module):
    def __init__(self, functions: Iterable[nn.Module], pcr: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(f) for f in functions)
        self.pcr = bool(pcr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x
        for block in self.blocks:
            z = (x if self.pcr else z) + block.residual(z)
        return z


class ResidualStack(nn.Module):
    """A residual model from parts: stem, stages of residual functions f_t (modules z -> f_t(z)), optional
    transitions, head. The parts are the user's own modules (not copies), so training the wrapper trains them.

        stack = ResidualStack(stem=model.embed, stages=[[blk.mlp for blk in model.blocks]], head=model.classifier)
        compute_indices(stack, (x, y)); GradientCoupler(stack, lam=0.5)
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[Sequence[nn.Module]],
        head: nn.Module,
        transitions: Sequence[nn.Module] = (),
        pcr: bool = False,
    ) -> None:
        super().__init__()
        stages = [list(functions) for functions in stages]
        if not stages or any(not functions for functions in stages):
            raise ValueError("ResidualStack: every stage needs at least one residual function")
        transitions = list(transitions) or [nn.Identity() for _ in range(len(stages) - 1)]
        if len(transitions) != len(stages) - 1:
            raise ValueError(
                f"ResidualStack: {len(stages)} stages need {len(stages) - 1} transitions, got {len(transitions)}"
            )
        self.stem = stem
        self.stages = nn.ModuleList(_Stage(functions, pcr) for functions in stages)
        self.transitions = nn.ModuleList(transitions)
        self.head = head

    @classmethod
    def from_layers(
        cls,
        stem: nn.Module,
        stages: Sequence[Sequence[Callable]],
        head: nn.Module,
        transitions: Sequence[nn.Module] = (),
    ) -> "ResidualStack":
        """Stages of layers that compute z -> z + f(z) themselves; f(z) = layer(z) - z (LayerResidual)."""
        return cls(stem, [[LayerResidual(layer) for layer in layers] for layers in stages], head, transitions)

    def after_stage(self, z: torch.Tensor, s: int) -> torch.Tensor:
        for i in range(s + 1, len(self.stages)):
            z = self.stages[i](self.transitions[i - 1](z))
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                z = self.transitions[s - 1](z)
            z = stage(z)
        return self.head(z)

    def coupling_groups(self) -> list:
        """Same-named parameters of a stage's residual functions, one group each (for GradientCoupler)."""
        from ..nn.coupling import groups_from_blocks

        return groups_from_blocks(*([block.f for block in stage.blocks] for stage in self.stages))


def transformer_encoder_adapter(encoder: nn.TransformerEncoder, stem: nn.Module, head: nn.Module) -> ResidualStack:
    """`torch.nn.TransformerEncoder` as one stage of T blocks (its layers), f_t(z) = layer_t(z) - z.

    Pre-norm layers (norm_first=True) compute z + SA(LN(z)) followed by + FF(LN(.)): f_t is the sum of the two
    residual branches, a true update of the residual stream. Post-norm layers compute LN(z + ...) and so
    rescale the stream in every layer: z + f_t(z) still reproduces the layer exactly, but f_t then contains the
    normalisation (a layer that changes nothing has f_t(z) = LN(z) - z, not 0), so its size is not the size
    of an update. The encoder's final norm, if any, goes in front of `head`. Masks are not supported (the
    stages run without a src mask or padding mask). The layers are the encoder's own modules.
    """
    if not isinstance(encoder, nn.TransformerEncoder):
        raise TypeError(f"transformer_encoder_adapter: expected nn.TransformerEncoder, got {type(encoder).__name__}")
    if encoder.norm is not None:
        head = nn.Sequential(encoder.norm, head)
    return ResidualStack.from_layers(stem, [list(encoder.layers)], head)
