"""What every objective shares: the stage activations recorded during the training forward pass, the
block map R of a stage's last block, runs of the rest of the network, and batch-norm statistics that the
extra block evaluations must not move.

An objective is called after the training forward with an `ObjectiveContext` and returns an
`ObjectiveTerm`: the unweighted loss term (a scalar with its graph) and its parts for logging.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..models.residual import block_update, check_residual_model

__all__ = [
    "Objective",
    "ObjectiveContext",
    "ObjectiveTerm",
    "record_stages",
    "frozen_batchnorm_statistics",
    "last_block_map",
    "run_stage",
    "rest_of_network",
]


@dataclass
class ObjectiveTerm:
    value: torch.Tensor  # the unweighted term: a scalar with its graph
    parts: dict = field(default_factory=dict)  # floats for logging (per stage, the drawn k, ...)


@dataclass
class ObjectiveContext:
    """What an objective may reuse from the training forward pass of one micro-batch."""

    model: nn.Module  # the residual model (not a DDP / compiled wrapper)
    stage_inputs: list  # x_s of every stage, with their graphs
    stage_outputs: list  # z_T of every stage, with their graphs
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable  # (logits, targets) -> scalar loss, the task's
    generator: torch.Generator  # for random draws (seeded per step, so resumed runs draw the same)

    def stages(self):
        """(stage, x_s, z_T) of every stage."""
        return zip(self.model.stages, self.stage_inputs, self.stage_outputs)


class Objective:
    """An extra loss term; `weight` multiplies it in the training loss (0: computed and logged, not trained on)."""

    name = "objective"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_float(weight, f"{self.name}: weight", 0.0)

    def __call__(self, context: ObjectiveContext) -> ObjectiveTerm:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"


class _StageRecorder:
    def __init__(self, n: int) -> None:
        self.inputs: list = [None] * n
        self.outputs: list = [None] * n


@contextlib.contextmanager
def record_stages(model: nn.Module):
    """Records x_s and z_T of every stage during the forward passes inside the block (forward hooks on the
    stages, removed on exit; the first pass through each stage counts). Yields a recorder with `inputs` and
    `outputs` lists."""
    check_residual_model(model, "objectives")
    if not all(isinstance(stage, nn.Module) for stage in model.stages):
        raise TypeError("objectives: the model's stages must be nn.Modules (their forward passes are recorded)")
    recorder = _StageRecorder(len(model.stages))

    def hook_for(s):
        def hook(module, args, output):
            if recorder.outputs[s] is None:
                recorder.inputs[s], recorder.outputs[s] = args[0], output

        return hook

    handles = [stage.register_forward_hook(hook_for(s)) for s, stage in enumerate(model.stages)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """Batch norm layers in training mode normalise with batch statistics as usual, but do not update their
    running statistics inside the block: the objectives' extra block evaluations do not count as data seen.
    (The buffers are not even written: the training forward's graph saved them, and an in-place write would
    invalidate its backward.)"""
    paused = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in paused:
        m.track_running_stats = False  # nn.BatchNorm then passes no running statistics to batch_norm
    try:
        yield
    finally:
        for m in paused:
            m.track_running_stats = True


def last_block_map(stage, z: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
    """R(z): the stage's last block applied once more (z + f~_T(z), or x_s + f~_T(z) for PCR)."""
    return block_update(stage, stage.blocks[-1], z, x_s)


def run_stage(stage, x_s: torch.Tensor) -> torch.Tensor:
    """A stage's output through the residual-model protocol (its blocks' `residual`)."""
    z = x_s
    for block in stage.blocks:
        z = block_update(stage, block, z, x_s)
    return z


def rest_of_network(model, z: torch.Tensor, s: int) -> torch.Tensor:
    """The outputs when stage s hands z on: transitions, later stages, head. Runs the blocks through the
    protocol rather than the stages' own forward, so that no stage takes a spectral power step."""
    for i in range(s + 1, len(model.stages)):
        z = run_stage(model.stages[i], model.transitions[i - 1](z))
    return model.head(z)


def per_example_squared_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def check_float(value, what: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{what} must be a finite number >= {low:g}, got {value!r}")
    return float(value)
