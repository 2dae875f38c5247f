"""One training step, kept apart from the loop that drives epochs, checkpoints and logs (as timm's
`train_one_epoch` and Lightning's `training_step` keep theirs).

A non-finite loss or gradient norm, or an exploding task loss (above `loss_limit`), raises `TrainingDiverged`
(experiments/divergence.py) after the last micro-batch's backward, before coupling and the optimizer: no step is
taken with it, and the running statistics its forward passes changed are put back. All are checked with one
read of the device per step (a GPU step is otherwise stalled by every read).

A step is `accumulate` micro-batches: each runs forward and backward (under DDP only the last one
all-reduces, inside its backward); after the last, the gradient coupler mixes the gradients (after the
all-reduce, before the optimizer) and the optimizer and scheduler step.

Extra loss terms plug in here, and only here: `objectives` (itconv_fast.objectives) are computed after each
micro-batch's forward from the stage activations it recorded, and `weight * term` is added to the task loss
(a weight of 0 computes and logs the term without training on it: the step is then the plain one, bit for bit).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..data import datasets
from ..nn.coupling import GradientCoupler
from ..objectives import Objective, ObjectiveContext, record_stages
from .divergence import RunningStatisticsSnapshot, TrainingDiverged, check_finite_step

__all__ = ["TrainStep", "autocast"]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class TrainStep:
    """`step(x, y, m)` runs micro-batch m (0..accumulate-1) of a step and returns (loss, logits), both
    detached (the task loss, without the objectives); the optimizer steps after micro-batch accumulate-1.

    net: the module that runs forward (the model, or its DDP / compiled wrapper); model: the residual model
    inside it (for the objectives; default net); distributed: whether net is DDP (its no_sync skips the
    all-reduce of all micro-batches but the last). objectives: extra loss terms; their values of the last
    micro-batch are in `last_terms` ({name: float}) and their parts in `last_parts` ({name: {part: float}}).
    seed: with the step count and the micro-batch index, seeds the objectives' random draws (a resumed run
    draws what the uninterrupted one drew). loss_limit: a task loss above it is divergence (the exploding-loss
    rule; None: only non-finite values are). channels_last: convert each input batch to channels-last (default: on
    CUDA, where the whole network runs so; bench/launches.py counts the CUDA path's ops on the CPU with it).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        task: datasets.Task,
        optimizer: torch.optim.Optimizer,
        scheduler,
        coupler: GradientCoupler,
        *,
        device: torch.device,
        accumulate: int = 1,
        distributed: bool = False,
        objectives: Sequence[Objective] = (),
        model: Optional[torch.nn.Module] = None,
        seed: int = 0,
        loss_limit: Optional[float] = None,
        channels_last: Optional[bool] = None,
    ):
        self.net, self.task, self.optimizer, self.scheduler, self.coupler = net, task, optimizer, scheduler, coupler
        self.device, self.accumulate, self.distributed = device, accumulate, distributed
        self.objectives = list(objectives)
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"TrainStep: an objective is given twice ({names})")
        self.model = net if model is None else model
        self.seed = seed
        self.loss_limit = loss_limit
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.statistics = RunningStatisticsSnapshot(self.model)  # put back when a step is refused
        self.last_terms: dict = {}
        self.last_parts: dict = {}
        self._losses: list = []  # this step's micro-batch losses, checked with the gradients after the last backward
        self._task_losses: list = []  # the same without the objectives' terms (the exploding-loss rule)

    def optimizer_parameters(self):
        return (p for group in self.optimizer.param_groups for p in group["params"])

    def _generator(self, m: int) -> torch.Generator:
        steps_taken = getattr(self.scheduler, "last_epoch", 0)
        return torch.Generator().manual_seed(((self.seed * 1_000_003) + steps_taken) * 1024 + m)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if m == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.statistics.take()
        skip_sync = self.distributed and m < self.accumulate - 1
        with self.net.no_sync() if skip_sync else contextlib.nullcontext():
            with record_stages(self.model) if self.objectives else contextlib.nullcontext() as stages:
                with autocast(self.device):
                    logits = self.net(x)
            loss = self.task.loss(logits.float(), y)
            total = loss
            if self.objectives:
                context = ObjectiveContext(
                    self.model, stages.inputs, stages.outputs, x, y, self.task.loss, self._generator(m)
                )
                for objective in self.objectives:
                    with autocast(self.device):
                        term = objective(context)
                    self.last_terms[objective.name] = term.value.item()
                    self.last_parts[objective.name] = term.parts
                    if objective.weight != 0:
                        total = total + objective.weight * term.value.float()
            # (one micro-batch: no division, which would be two launches of a GPU step for nothing)
            (total if self.accumulate == 1 else total / self.accumulate).backward()
        if m == 0:
            self._losses, self._task_losses = [], []
        if not self.distributed:  # under DDP a NaN reaches every rank through the all-reduced gradients
            self._losses.append(total.detach())
            self._task_losses.append(loss.detach())  # (rank-local values: under DDP the ranks could disagree)
        if m == self.accumulate - 1:
            try:  # before the step: weights stay as they were
                check_finite_step(self._losses, self.optimizer_parameters(), self._task_losses, self.loss_limit)
            except TrainingDiverged:
                self.statistics.restore()
                raise
            self.coupler()  # after the all-reduce, before the step
            self.optimizer.step()
            self.scheduler.step()
        return loss.detach(), logits.detach()
