"""The cached-pass evaluator that every measure of a trained residual network runs on (SPEC section 4).

For each batch, one unperturbed pass keeps every stage input x_s and every state z_t; each perturbation of a
stage is then built from that cache (early read-out straight from it, a dropped block continued from z_{t-1},
extra iterations incrementally) and the perturbed stage outputs are sent through the rest of the network
together, several per forward (up to `chunk` examples).

    errors, norms = Tally(), Tally()
    n, num_outputs = evaluate_batches(model, data, batch_size, "caller",
                                      lambda x, y: cached_pass(model, x, y, top1_wrong, errors, K, batch_size, norms))

Measures plug in through `PassHooks`: they see every perturbation's logits (`on_logits`), may add perturbations
of their own to a stage (`stage_perturbations`) and read the extra-iteration trace (`on_trace`). The indices
(indices.py) use the pass as it is; the analyses (analysis.py) add losses, "block applied twice" and traces.
`reference_pass` is the unbatched check: one plain forward per perturbation.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..models.residual import block_update

__all__ = [
    "Tally",
    "PassHooks",
    "NonFiniteOutputsError",
    "check_extra_iterations",
    "check_batch_size",
    "iterate_batches",
    "evaluate_batches",
    "cached_pass",
    "reference_pass",
    "stage_output",
    "stage_iterations",
    "forward_with_stage_perturbed",
    "rest_of_network",
    "top1_wrong",
    "per_example_norm",
]


class Tally:
    """Sums of named values over batches (wrong counts, losses, norms), as Python floats. A float: per-example
    errors may be fractions (the share of wrong tokens of a sequence)."""

    def __init__(self) -> None:
        self.values: dict = {}

    def add(self, key, value) -> None:
        self.values[key] = self.values.get(key, 0.0) + float(value)

    def __getitem__(self, key) -> float:
        return self.values[key]


class NonFiniteOutputsError(ValueError):
    """The unperturbed network's outputs hold NaN or inf: its errors, and so its indices, are undefined."""


class PassHooks:
    """What a measure adds to the cached pass; override what you need (each default adds nothing).

    traces: whether the pass runs one extra iteration beyond K and reports the trace to `on_trace`."""

    traces: bool = False

    def on_logits(self, key, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Called with the logits of every perturbation (and of the unperturbed network, key "star")."""

    def stage_perturbations(self, s: int, stage, x_s: torch.Tensor, trajectory: Sequence[torch.Tensor]) -> list:
        """[(key, stage output)]: more perturbed outputs of stage s, sent through the rest of the network after
        the block drop-outs and before the extra iterations. trajectory: the cached z_0 .. z_T."""
        return []

    def first_extra_iteration_keys(self, s: int, T: int) -> list:
        """Keys also counted with the first extra iteration's output (a perturbation that equals it)."""
        return []

    def on_trace(self, s: int, steps: torch.Tensor, states: torch.Tensor) -> None:
        """With traces: [n, K+1] ||z_{T+k+1} - z_{T+k}|| and ||z_{T+k}||, k = 0..K, of stage s."""


def check_extra_iterations(extra_iterations, caller: str) -> None:
    if isinstance(extra_iterations, bool) or not isinstance(extra_iterations, int) or extra_iterations < 1:
        raise ValueError(f"{caller}: extra_iterations must be an int >= 1, got {extra_iterations!r}")


def check_batch_size(batch_size, caller: str) -> None:
    if batch_size < 1:
        raise ValueError(f"{caller}: batch_size must be >= 1, got {batch_size}")


def top1_wrong(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) != targets


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def iterate_batches(data, batch_size: int, caller: str = "compute_indices"):
    """(x, y) batches of a pair of tensors (cut into batch_size examples) or of an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{caller}: x has {x.shape[0]} examples but y has {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        for batch in data:
            x, y = batch
            yield x, y


def evaluate_batches(model, data: Iterable, batch_size: int, caller: str, per_batch: Callable) -> tuple[int, int]:
    """Runs per_batch(x, y) -> number of outputs on every batch, on the model's device, in eval mode and without
    gradients (a measure that needs them enables them itself); the training flag is restored. Returns
    (examples, number of outputs)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, num_outputs = 0, None
    try:
        with torch.no_grad():
            for x, y in iterate_batches(data, batch_size, caller):
                x, y = x.to(device), y.to(device)
                n += x.shape[0]
                num_outputs = per_batch(x, y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"{caller}: no data (empty evaluation set)")
    return n, num_outputs


def stage_output(stage, x_s, *, stop_after=None, drop=None, extra=0):
    """A stage's output with one perturbation: stop after block `stop_after`, skip block `drop` (1-based),
    or apply the last block `extra` more times."""
    z = x_s
    T = len(stage.blocks)
    for t in range(1, T + 1):
        if stop_after is not None and t > stop_after:
            break
        if drop == t:
            continue
        z = block_update(stage, stage.blocks[t - 1], z, x_s)
    for _ in range(extra):
        z = block_update(stage, stage.blocks[-1], z, x_s)
    return z


def stage_iterations(stage, x_s, k: int):
    """The stage with k iterations: its first min(k, T) blocks, then the last block k - T more times."""
    z = x_s
    T = len(stage.blocks)
    for t in range(k):
        z = block_update(stage, stage.blocks[min(t, T - 1)], z, x_s)
    return z


def forward_with_stage_perturbed(model, x, s, **perturbation):
    """A plain forward of the whole network with stage s perturbed (stage_output's keywords)."""
    z = model.stem(x)
    for i, stage in enumerate(model.stages):
        if i > 0:
            z = model.transitions[i - 1](z)
        z = stage_output(stage, z, **perturbation) if i == s else stage_output(stage, z)
    return model.head(z)


def rest_of_network(model, z, s):
    """The network after stage s (the model's own after_stage if it has one)."""
    if hasattr(model, "after_stage"):
        return model.after_stage(z, s)
    for i in range(s + 1, len(model.stages)):
        z = stage_output(model.stages[i], model.transitions[i - 1](z))
    return model.head(z)


def check_finite_outputs(logits: torch.Tensor) -> None:
    bad = (~torch.isfinite(logits)).reshape(logits.shape[0], -1).any(dim=1)
    if bad.any():
        raise NonFiniteOutputsError(
            f"the network's outputs are not finite (NaN or inf) on {int(bad.sum())} of {logits.shape[0]} examples of "
            "a batch: its errors and indices are undefined (did its training diverge?)"
        )


def reference_pass(model, x, y, wrong_fn, errors: Tally, K: int) -> int:
    """One plain forward per perturbation; returns the number of outputs (the logits' last dimension)."""
    logits = forward_with_stage_perturbed(model, x, 0)
    check_finite_outputs(logits)
    errors.add("star", wrong_fn(logits, y).sum())
    for s, stage in enumerate(model.stages):
        T = len(stage.blocks)
        for t in range(1, T):
            errors.add((s, "conv", t), wrong_fn(forward_with_stage_perturbed(model, x, s, stop_after=t), y).sum())
        for t in range(1, T + 1):
            errors.add((s, "drop", t), wrong_fn(forward_with_stage_perturbed(model, x, s, drop=t), y).sum())
        for k in range(1, K + 1):
            errors.add((s, "div", k), wrong_fn(forward_with_stage_perturbed(model, x, s, extra=k), y).sum())
    return logits.shape[-1]


def _unperturbed(model, x):
    """Every stage input and every z_t of one plain pass, and the logits."""
    inputs, trajectories = [], []
    z = model.stem(x)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        inputs.append(z)
        trajectory = [z]
        for block in stage.blocks:
            trajectory.append(block_update(stage, block, trajectory[-1], z))
        trajectories.append(trajectory)
        z = trajectory[-1]
    return inputs, trajectories, model.head(z)


class _StageBatcher:
    """Perturbed outputs of one stage, sent through the rest of the network once `chunk` examples wait."""

    def __init__(self, model, s, y, wrong_fn, errors: Tally, hooks: PassHooks, chunk: int) -> None:
        self.model, self.s, self.y, self.wrong_fn, self.errors, self.hooks = model, s, y, wrong_fn, errors, hooks
        self.n, self.chunk, self.pending = y.shape[0], chunk, []

    def emit(self, keys, out) -> None:
        self.pending.append((keys if isinstance(keys, list) else [keys], out))
        if len(self.pending) * self.n >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        logits = rest_of_network(self.model, torch.cat([out for _, out in self.pending]), self.s)
        for i, (keys, _) in enumerate(self.pending):
            part = logits[i * self.n : (i + 1) * self.n]
            wrong = self.wrong_fn(part, self.y).sum()
            for key in keys:
                self.errors.add(key, wrong)
                self.hooks.on_logits(key, part, self.y)
        self.pending.clear()


def cached_pass(
    model, x, y, wrong_fn, errors: Tally, K: int, chunk: int, norms: Tally, hooks: Optional[PassHooks] = None
) -> int:
    """One batch of the cached evaluator: wrong counts of the unperturbed network ("star") and of every
    perturbation ((s, "conv", t), (s, "drop", t), (s, "div", k)) into errors, per-block relative updates
    ((s, "update", t)) and the first extra iteration's fixed-point residual ((s, "fixed")) into norms.
    Returns the number of outputs."""
    hooks = hooks or PassHooks()
    inputs, trajectories, logits = _unperturbed(model, x)
    check_finite_outputs(logits)
    errors.add("star", wrong_fn(logits, y).sum())
    hooks.on_logits("star", logits, y)
    for s, stage in enumerate(model.stages):
        T, x_s, trajectory = len(stage.blocks), inputs[s], trajectories[s]
        batcher = _StageBatcher(model, s, y, wrong_fn, errors, hooks, chunk)
        for t in range(1, T):  # early read-out: straight from the cache
            batcher.emit((s, "conv", t), trajectory[t])
        for t in range(1, T + 1):  # drop block t: continue from z_{t-1}
            z = trajectory[t - 1]
            for u in range(t + 1, T + 1):
                z = block_update(stage, stage.blocks[u - 1], z, x_s)
            batcher.emit((s, "drop", t), z)
        for key, out in hooks.stage_perturbations(s, stage, x_s, trajectory):
            batcher.emit(key, out)
        _extra_iterations(stage, s, x_s, trajectory[T], K, batcher, norms, hooks)
        batcher.flush()
        for t in range(1, T + 1):
            prev, cur = trajectory[t - 1], trajectory[t]
            norms.add((s, "update", t), (per_example_norm(cur - prev) / per_example_norm(prev).clamp_min(1e-12)).sum())
    return logits.shape[-1]


def _extra_iterations(stage, s, x_s, z, K, batcher: _StageBatcher, norms: Tally, hooks: PassHooks) -> None:
    """The last block applied k = 1..K more times, incrementally (one more with traces)."""
    first_keys = [(s, "div", 1)] + hooks.first_extra_iteration_keys(s, len(stage.blocks))
    steps, states = [], []
    for k in range(1, K + 2 if hooks.traces else K + 1):
        z_next = block_update(stage, stage.blocks[-1], z, x_s)
        if k == 1:
            norms.add((s, "fixed"), (per_example_norm(z_next - z) / per_example_norm(z).clamp_min(1e-12)).sum())
        if hooks.traces:
            steps.append(per_example_norm(z_next - z))
            states.append(per_example_norm(z))
        z = z_next
        if k <= K:
            batcher.emit(first_keys if k == 1 and len(first_keys) > 1 else (s, "div", k), z)
    if hooks.traces:
        hooks.on_trace(s, torch.stack(steps, dim=1), torch.stack(states, dim=1))
