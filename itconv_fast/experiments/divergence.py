"""Diverging training stops the run, and the run keeps only a state that is usable: its last good checkpoint.

Four rules, each named in the error and in metrics.json (`divergence.rule`):

- `non-finite loss` and `non-finite gradient norm`: checked after a step's last backward, before the optimizer;
- `exploding loss`: a finite task loss above EXPLODING_LOSS_FACTOR times the loss of a prediction at chance
  (all-zero logits), which no training that still learns reaches (checked with the same read of the device);
- `non-finite model state`: at the end of an epoch, a parameter or buffer (BatchNorm running statistics, spectral
  power vectors) that is not finite, or a non-finite test loss; that epoch is then not checkpointed.

A refused step is undone: the running statistics its forward passes changed are put back.

`itconv-fast train` exits with EXIT_DIVERGED (3) and metrics.json says `status: diverged` with the epoch,
step and learning rate; `--resume` on such a run starts from its last good epoch only with
`--restart-diverged` (and typically a lower `--lr`).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import torch

__all__ = [
    "TrainingDiverged",
    "EXIT_DIVERGED",
    "RESTARTABLE_FIELDS",
    "EXPLODING_LOSS_FACTOR",
    "check_finite_step",
    "exploding_loss_limit",
    "check_finite_state",
    "RunningStatisticsSnapshot",
]

EXIT_DIVERGED = 3  # the exit code of a diverged `itconv-fast train` (1: other errors, 2: usage errors)
RESTARTABLE_FIELDS = ("lr", "weight_decay")  # what may change when a diverged run restarts from its last good epoch
# A batch's task loss this many times the loss at chance is divergence (chance: ln C for C classes, 10 ln 2 for
# Digitclutter's 10 sigmoid outputs; a network at initialisation is within a few times it).
EXPLODING_LOSS_FACTOR = 1000.0


class TrainingDiverged(RuntimeError):
    """Training met a non-finite or exploding loss, a non-finite gradient norm or a non-finite model state.

    what: "loss", "gradient norm", a state entry's name or "test loss"; value: the offending value; rule: which
    rule fired (module docstring); record: where (epoch, step, lr), filled in by the training loop. A step-level
    rule took no optimizer step; the state rule keeps the epoch out of the checkpoint."""

    STEP_RULES = ("non-finite loss", "exploding loss", "non-finite gradient norm")

    def __init__(self, what: str, value: float, record: dict = None, *, rule: str = None, limit: float = None) -> None:
        self.what, self.value, self.record = what, value, dict(record or {})
        self.rule = rule or self.record.get("rule") or f"non-finite {what}"
        self.limit = limit if limit is not None else self.record.get("limit")
        super().__init__(self.describe())

    @property
    def step_refused(self) -> bool:
        return self.rule in self.STEP_RULES

    def describe(self) -> str:
        where = ""
        if self.record:
            where = (
                f" at epoch {self.record.get('epoch')}, step {self.record.get('step')} "
                f"(lr {self.record.get('lr', float('nan')):.4g})"
            )
        if self.rule == "exploding loss":
            return (
                f"training diverged: exploding loss ({self.value:.4g}, over the limit {self.limit:.4g}, "
                f"{EXPLODING_LOSS_FACTOR:g} x the loss at chance){where}"
            )
        if self.rule == "non-finite model state":
            return f"training diverged: non-finite model state ({self.what} is {self.value}){where}"
        return f"training diverged: non-finite {self.what} ({self.value}){where}"

    def outcome(self) -> str:
        """What the run did about it, for messages."""
        return "no step was taken with it" if self.step_refused else "the epoch was not kept"


def exploding_loss_limit(loss_fn, num_classes: int, target: torch.Tensor) -> float:
    """EXPLODING_LOSS_FACTOR x the task loss of all-zero logits (a prediction at chance) for one example (a
    sequence of tokens: one logit vector per position)."""
    positions = tuple(target.shape) if target.dim() and not target.is_floating_point() else ()
    logits = torch.zeros(1, *positions, num_classes)
    chance = float(loss_fn(logits, target.unsqueeze(0).cpu()))
    return EXPLODING_LOSS_FACTOR * chance


def check_finite_step(
    losses: Iterable[torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    task_losses: Iterable[torch.Tensor] = (),
    loss_limit: Optional[float] = None,
) -> None:
    """Raises TrainingDiverged when a loss (named first) or a gradient is NaN or inf, or a task loss is above
    loss_limit (when given). Four device ops and one read of the device a step, where a GPU step is otherwise
    stalled by every read and launch-bound at our widths: one fused norm of every loss (|loss|) and gradient, one
    stack, one comparison with their bounds (the largest float, or loss_limit) and one `all`. The reported
    gradient norm is the global one, computed from the per-tensor norms only when the check fails."""
    values = [loss.detach() for loss in losses]
    n_losses = len(values)
    limited = [loss.detach() for loss in task_losses] if loss_limit is not None else []
    grads = [p.grad for p in parameters if p.grad is not None]
    entries = values + limited + grads
    if not entries:
        return
    norms = torch._foreach_norm(entries)
    device = norms[0].device
    checked = torch.stack([n if n.device == device else n.to(device) for n in norms])
    bounds = _bounds(n_losses, len(limited), len(grads), loss_limit, checked.dtype, device)
    if bool(checked.le(bounds).all()):  # the one synchronisation
        return
    read = checked.tolist()
    for value in read[:n_losses]:
        if not math.isfinite(value):
            raise TrainingDiverged("loss", value, rule="non-finite loss")
    for value in read[n_losses : n_losses + len(limited)]:
        if math.isfinite(value) and value > loss_limit:
            raise TrainingDiverged("loss", value, rule="exploding loss", limit=loss_limit)
    grad_norms = read[n_losses + len(limited) :]
    if all(math.isfinite(v) for v in grad_norms):
        total = math.sqrt(math.fsum(v * v for v in grad_norms))
    else:
        total = math.nan if any(math.isnan(v) for v in grad_norms) else math.inf
    raise TrainingDiverged("gradient norm", total, rule="non-finite gradient norm")


@functools.lru_cache(maxsize=16)
def _bounds(n_losses: int, n_limited: int, n_grads: int, limit, dtype: torch.dtype, device: torch.device):
    """The largest value each checked norm may take: the largest float (so: finite) for losses and gradients,
    loss_limit for the task losses under the exploding-loss rule. Made once per step shape (a tensor built each
    step would be a host-to-device copy a step)."""
    largest = torch.finfo(dtype).max
    return torch.tensor([largest] * n_losses + [limit] * n_limited + [largest] * n_grads, dtype=dtype, device=device)


def check_finite_state(model: torch.nn.Module) -> None:
    """Raises TrainingDiverged (rule "non-finite model state") naming the first parameter or floating-point buffer
    with a NaN or inf; one read of the device."""
    entries = [
        (name, t)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_floating_point() and t.numel()
    ]
    if not entries:
        return
    flags = torch.stack([torch.isfinite(t.detach()).all().to(entries[0][1].device) for _, t in entries])
    if bool(flags.all()):
        return
    name, tensor = entries[int((~flags).nonzero()[0])]
    bad = tensor.detach()[~torch.isfinite(tensor.detach())].flatten()[0].item()
    raise TrainingDiverged(name, bad, rule="non-finite model state")


class RunningStatisticsSnapshot:
    """The running statistics (running_mean, running_var, num_batches_tracked) of every layer that tracks them,
    copied before a step so that a refused step can put back what its forward passes changed: they are the
    state a forward changes from the data. Spectral power vectors are not copied: they advance from the weights
    alone, which a refused step leaves as they were, so the extra power step is as valid as the one before (and
    copying them, activation-sized, would cost far more than the statistics). The copies are made once and
    refilled in place each step (one fused copy); each buffer is looked up on its module, so a module moved to
    another device or dtype is followed."""

    def __init__(self, module: torch.nn.Module) -> None:
        # (the module's buffer dict, name): a dict lookup a step, where Module.__getattr__ cost ~2 us a buffer
        self.slots = [(m._buffers, name) for m in module.modules() if getattr(m, "track_running_stats", False)
                      for name, b in m.named_buffers(recurse=False) if b is not None]  # fmt: skip
        self.sources: list = []  # the buffers the copies were made from
        self.saved: list = []
        self.groups: list = []  # indices into sources of each (device, dtype)

    def _current(self) -> list:
        return [buffers[name] for buffers, name in self.slots]

    def take(self) -> None:
        current = self._current()
        if len(current) != len(self.sources) or any(b is not a for b, a in zip(current, self.sources)):
            self.sources, self.saved = current, [b.detach().clone() for b in current]  # first step, or moved
            # One fused copy per (device, dtype): a mixed list (float statistics, int64 batch counts) would take
            # ATen's tensor-by-tensor path, a launch a tensor on a GPU.
            groups: dict = {}
            for i, b in enumerate(current):
                groups.setdefault((b.device, b.dtype), []).append(i)
            self.groups = list(groups.values())
        elif current:
            for group in self.groups:
                torch._foreach_copy_([self.saved[i] for i in group], [current[i] for i in group])

    @torch.no_grad()
    def restore(self) -> None:
        for b, saved in zip(self._current(), self.saved):
            b.copy_(saved)
