"""One training step, kept apart from the loop that drives epochs, checkpoints and logs (as timm's
`train_one_epoch` and Lightning's `training_step` keep theirs).

A step is `accumulate` micro-batches: each runs forward and backward (under DDP only the last one
all-reduces, inside its backward); after the last, the gradient coupler mixes the gradients (after the
all-reduce, before the optimizer) and the optimizer and scheduler step.
"""

from __future__ import annotations

import contextlib

import torch

from ..data import datasets
from ..nn.coupling import GradientCoupler

__all__ = ["TrainStep", "autocast"]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class TrainStep:
    """`step(x, y, m)` runs micro-batch m (0..accumulate-1) of a step and returns (loss, logits), both
    detached; the optimizer steps after micro-batch accumulate-1.

    net: the module that runs forward (the model, or its DDP / compiled wrapper); distributed: whether net
    is DDP (its no_sync skips the all-reduce of all micro-batches but the last).
    """

    def __init__(self, net: torch.nn.Module, task: datasets.Task, optimizer: torch.optim.Optimizer, scheduler,
                 coupler: GradientCoupler, *, device: torch.device, accumulate: int = 1, distributed: bool = False):
        self.net, self.task, self.optimizer, self.scheduler, self.coupler = net, task, optimizer, scheduler, coupler
        self.device, self.accumulate, self.distributed = device, accumulate, distributed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if m == 0:
            self.optimizer.zero_grad(set_to_none=True)
        skip_sync = self.distributed and m < self.accumulate - 1
        with self.net.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(self.device):
                logits = self.net(x)
            loss = self.task.loss(logits.float(), y)
            (loss / self.accumulate).backward()
        if m == self.accumulate - 1:
            self.coupler()  # after the all-reduce, before the step
            self.optimizer.step()
            self.scheduler.step()
        return loss.detach(), logits.detach()
