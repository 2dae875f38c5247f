"""Diverging training: a non-finite loss or gradient norm stops the run at that step, before the optimizer
takes it, so that the last good checkpoint is what the run keeps.

`itconv-fast train` exits with EXIT_DIVERGED (3) and metrics.json says `status: diverged` with the epoch,
step and learning rate; `--resume` on such a run starts from its last good epoch only with
`--restart-diverged` (and typically a lower `--lr`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["TrainingDiverged", "EXIT_DIVERGED", "RESTARTABLE_FIELDS", "check_finite_step"]

EXIT_DIVERGED = 3  # the exit code of a diverged `itconv-fast train` (1: other errors, 2: usage errors)
RESTARTABLE_FIELDS = ("lr", "weight_decay")  # what may change when a diverged run restarts from its last good epoch


class TrainingDiverged(RuntimeError):
    """Training met a non-finite loss or gradient norm; no optimizer step was taken with it.

    what: "loss" or "gradient norm"; value: the non-finite value; record: where (epoch, step, lr), filled in by
    the training loop."""

    def __init__(self, what: str, value: float, record: dict = None) -> None:
        self.what, self.value, self.record = what, value, dict(record or {})
        super().__init__(self.describe())

    def describe(self) -> str:
        where = ""
        if self.record:
            where = (f" at epoch {self.record.get('epoch')}, step {self.record.get('step')} "
                     f"(lr {self.record.get('lr', float('nan')):.4g})")
        return f"training diverged: non-finite {self.what} ({self.value}){where}"


def check_finite_step(losses: Iterable[torch.Tensor], parameters: Iterable[torch.nn.Parameter]) -> None:
    """Raises TrainingDiverged when a loss (named first) or the global gradient norm (one fused norm per device and
    dtype) is NaN or inf. Both are read from the device at once: one synchronisation per step, where a GPU step
    is otherwise stalled by every read."""
    values = [loss.detach().float().reshape(1) for loss in losses]
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        values.append(torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms])).reshape(1))
    if not values:
        return
    checked = torch.cat([v.to(values[0].device) for v in values])
    if bool(torch.isfinite(checked).all()):  # the one synchronisation
        return
    read = checked.tolist()
    for value in read[: len(read) - (1 if grads else 0)]:
        if not math.isfinite(value):
            raise TrainingDiverged("loss", value)
    raise TrainingDiverged("gradient norm", read[-1])
