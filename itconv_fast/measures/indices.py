"""The three indices of iterative convergence (SPEC section 4; the paper's Convergence, Recurrence and
Divergence Index), measured by perturbing one stage of a trained network at a time, in eval mode.

    report = compute_indices(model, (x, y))           # or an iterable of (x, y) batches
    report.ci, report.ri, report.di, report.stages[0].e_drop, report.to_dict()

phi(e) = clip((e - e*) / (e_ch - e*), 0, 1), e* the unperturbed error, e_ch the chance error.
- Convergence (early read-out): e_conv(t), stage s stops after block t, t = 1..T-1;
  CI_s = 1 - mean_t phi(e_conv(t)).
- Recurrence (block drop-out): e_drop(t), block t skipped (z_t = z_{t-1}), t = 1..T;
  RI_s = 1 - mean_{t<T} min(1, |e_drop(t) - e_drop(T)| / (e_ch - e*)).
- Divergence (extra iterations): e_div(k), the last block applied k more times (PCR: with the stage
  input), k = 1..K; DI_s = mean_k phi(e_div(k)).
Network indices are means over stages; undefined values are NaN with the reason in `report.notes`.

method="reference" runs one plain forward per perturbation. method="cached" computes every stage
input and the unperturbed z_t once, reads early read-outs straight from the cache, starts each block
drop-out from the cached z_{t-1}, builds extra iterations incrementally, and sends several perturbed stage
outputs through the rest of the network in one forward (up to batch_size examples: with small data
batches several perturbations share a forward). Both count the same errors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from ..io.checkpoint import json_safe
from ..models.residual import block_update, check_residual_model

__all__ = ["compute_indices", "IndexReport", "StageIndices", "index_flops", "NonFiniteOutputsError"]

METHODS = ("cached", "reference")


@dataclass
class StageIndices:
    ci: float
    ri: float
    di: float
    e_conv: list  # T-1 errors, t = 1..T-1
    e_drop: list  # T errors, t = 1..T
    e_div: list  # extra_iterations errors, k = 1..K
    relative_update: list  # T values: mean ||z_t - z_{t-1}|| / ||z_{t-1}||
    fixed_point_residual: float  # mean ||R(z_T) - z_T|| / ||z_T||


@dataclass
class IndexReport:
    ci: float
    ri: float
    di: float
    error: float  # e*
    chance_error: float
    n: int
    stages: list
    method: str = "cached"
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))  # JSON has no NaN: undefined values are None


def _phi(e, e_star, e_ch):
    return min(1.0, max(0.0, (e - e_star) / (e_ch - e_star)))


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


class _Counter:
    """Accumulates wrong counts for named perturbations over batches."""

    def __init__(self):
        self.wrong = {}

    def add(self, key, wrong):
        # A float: per-example errors may be fractions (the share of wrong tokens of a sequence).
        self.wrong[key] = self.wrong.get(key, 0.0) + float(wrong)


_stage_step = block_update  # one block update: z + f~(z) (ICR) or x_s + f~(z) (PCR)


def _run_stage(stage, x_s, *, stop_after=None, drop=None, extra=0):
    """A stage's output with one perturbation: stop after block `stop_after`, skip block `drop` (1-based),
    or apply the last block `extra` more times."""
    z = x_s
    T = len(stage.blocks)
    for t in range(1, T + 1):
        if stop_after is not None and t > stop_after:
            break
        if drop == t:
            continue
        z = _stage_step(stage, stage.blocks[t - 1], z, x_s)
    for _ in range(extra):
        z = _stage_step(stage, stage.blocks[-1], z, x_s)
    return z


def _perturbed_forward(model, x, s, **perturbation):
    z = model.stem(x)
    for i, stage in enumerate(model.stages):
        if i > 0:
            z = model.transitions[i - 1](z)
        z = _run_stage(stage, z, **perturbation) if i == s else _run_stage(stage, z)
    return model.head(z)


def _after_stage(model, z, s):
    """The rest of the network after stage s (the model's own after_stage if it has one)."""
    if hasattr(model, "after_stage"):
        return model.after_stage(z, s)
    for i in range(s + 1, len(model.stages)):
        z = _run_stage(model.stages[i], model.transitions[i - 1](z))
    return model.head(z)


class NonFiniteOutputsError(ValueError):
    """The unperturbed network's outputs hold NaN or inf: its errors, and so its indices, are undefined."""


def _check_finite_outputs(logits: torch.Tensor) -> None:
    bad = (~torch.isfinite(logits)).reshape(logits.shape[0], -1).any(dim=1)
    if bad.any():
        raise NonFiniteOutputsError(
            f"the network's outputs are not finite (NaN or inf) on {int(bad.sum())} of {logits.shape[0]} examples of "
            "a batch: its errors and indices are undefined (did its training diverge?)")


def _reference_batch(model, x, y, wrong_fn, counter, K):
    """One plain forward per perturbation; returns the number of outputs K (the logits' last dimension)."""
    logits = _perturbed_forward(model, x, 0)
    _check_finite_outputs(logits)
    counter.add("star", wrong_fn(logits, y).sum())
    for s, stage in enumerate(model.stages):
        T = len(stage.blocks)
        for t in range(1, T):
            counter.add((s, "conv", t), wrong_fn(_perturbed_forward(model, x, s, stop_after=t), y).sum())
        for t in range(1, T + 1):
            counter.add((s, "drop", t), wrong_fn(_perturbed_forward(model, x, s, drop=t), y).sum())
        for k in range(1, K + 1):
            counter.add((s, "div", k), wrong_fn(_perturbed_forward(model, x, s, extra=k), y).sum())
    return logits.shape[-1]


class _Extras:
    """What the analysis (itconv_fast.measures.analysis) adds to the cached pass: losses of every perturbation,
    "apply block t twice" perturbations, and per-example traces of the extra iterations."""

    def __init__(self, loss_fn=None, twice: bool = False, traces: bool = False) -> None:
        self.loss_fn, self.twice, self.traces = loss_fn, twice, traces
        self.losses = _Sums()
        self.step_norms = {}  # s -> [n, K+1] ||z_{T+k+1} - z_{T+k}||, k = 0..K
        self.state_norms = {}  # s -> [n, K+1] ||z_{T+k}||

    def add_logits(self, key, logits, y):
        if self.loss_fn is not None:
            self.losses.add(key, self.loss_fn(logits, y).sum())


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _cached_batch(model, x, y, wrong_fn, counter, K, chunk, norms, extras: Optional[_Extras] = None):
    n = x.shape[0]
    # One unperturbed pass, keeping every stage input and every z_t.
    inputs, trajectories = [], []
    z = model.stem(x)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        inputs.append(z)
        traj = [z]
        for block in stage.blocks:
            traj.append(_stage_step(stage, block, traj[-1], z))
        trajectories.append(traj)
        z = traj[-1]
    logits = model.head(z)
    _check_finite_outputs(logits)
    num_outputs = logits.shape[-1]
    counter.add("star", wrong_fn(logits, y).sum())
    if extras is not None:
        extras.add_logits("star", logits, y)

    for s, stage in enumerate(model.stages):
        T, x_s, traj = len(stage.blocks), inputs[s], trajectories[s]
        pending = []  # (key, perturbed stage output), sent through the rest of the network in batches

        def flush():
            if not pending:
                return
            logits = _after_stage(model, torch.cat([out for _, out in pending]), s)
            for i, (keys, _) in enumerate(pending):
                part = logits[i * n : (i + 1) * n]
                wrong = wrong_fn(part, y).sum()
                for key in keys:
                    counter.add(key, wrong)
                    if extras is not None:
                        extras.add_logits(key, part, y)
            pending.clear()

        def emit(keys, out):
            pending.append((keys if isinstance(keys, list) else [keys], out))
            if len(pending) * n >= chunk:
                flush()

        for t in range(1, T):  # early read-out: straight from the cache
            emit((s, "conv", t), traj[t])
        for t in range(1, T + 1):  # drop block t: continue from z_{t-1}
            z = traj[t - 1]
            for u in range(t + 1, T + 1):
                z = _stage_step(stage, stage.blocks[u - 1], z, x_s)
            emit((s, "drop", t), z)
        twice = extras is not None and extras.twice
        if twice:
            # Apply block t twice: from the cached z_t, once more, then continue. For t = T this is the
            # first extra iteration, counted below under both keys.
            for t in range(1, T):
                z = _stage_step(stage, stage.blocks[t - 1], traj[t], x_s)
                for u in range(t + 1, T + 1):
                    z = _stage_step(stage, stage.blocks[u - 1], z, x_s)
                emit((s, "twice", t), z)
        z = traj[T]
        trace = extras is not None and extras.traces
        steps, states = [], []
        for k in range(1, K + 2 if trace else K + 1):  # extra iterations, incrementally
            z_next = _stage_step(stage, stage.blocks[-1], z, x_s)
            if k == 1:
                norms.add((s, "fixed"), (_per_example_norm(z_next - z) / _per_example_norm(z).clamp_min(1e-12)).sum())
            if trace:
                steps.append(_per_example_norm(z_next - z))
                states.append(_per_example_norm(z))
            z = z_next
            if k <= K:
                emit([(s, "div", k), (s, "twice", T)] if twice and k == 1 else (s, "div", k), z)
        if trace:
            for store, values in ((extras.step_norms, steps), (extras.state_norms, states)):
                store.setdefault(s, []).append(torch.stack(values, dim=1).double().cpu())
        flush()
        for t in range(1, T + 1):
            prev, cur = traj[t - 1], traj[t]
            norms.add((s, "update", t), (_per_example_norm(cur - prev) / _per_example_norm(prev).clamp_min(1e-12)).sum())
    return num_outputs


class _Sums:
    def __init__(self):
        self.values = {}

    def add(self, key, value):
        self.values[key] = self.values.get(key, 0.0) + float(value)


def _batches(data, batch_size):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"compute_indices: x has {x.shape[0]} examples but y has {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        for batch in data:
            x, y = batch
            yield x, y


def compute_indices(
    model,
    data: Union[tuple, Iterable],
    *,
    extra_iterations: int = 16,
    method: str = "cached",
    chance_error: Optional[float] = None,
    error_fn: Optional[Callable] = None,
    batch_size: int = 512,
) -> IndexReport:
    """Convergence, Recurrence and Divergence indices of a trained IterResNet (SPEC section 4).

    Args:
        model: an IterResNet or any residual model (itconv_fast.models.residual: stem, stages[s].blocks[t].residual,
            stages[s].pcr, transitions, head; ResidualStack and transformer_encoder_adapter wrap others).
            Evaluated in eval mode; its training flag is restored.
        data: (x, y) tensors, or an iterable of (x, y) batches (already normalised, on any device).
        extra_iterations: K, the extra applications of each stage's last block.
        method: "cached" (default) or "reference" (one full forward per perturbation).
        chance_error: e_ch; default 1 - 1/K for K output classes.
        error_fn: (logits, targets) -> per-example "wrong" (bool, or a fraction such as
            residual.sequence_error's share of wrong tokens); default top-1 error.
        batch_size: examples per forward; the cached method fills each forward through the rest of the
            network with as many perturbations as fit.
    """
    if isinstance(extra_iterations, bool) or not isinstance(extra_iterations, int) or extra_iterations < 1:
        raise ValueError(f"compute_indices: extra_iterations must be an int >= 1, got {extra_iterations!r}")
    if method not in METHODS:
        raise ValueError(f"compute_indices: method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"compute_indices: batch_size must be >= 1, got {batch_size}")
    check_residual_model(model, "compute_indices")
    counter, norms, n, num_classes = _evaluate(model, data, extra_iterations, method, error_fn, batch_size)
    return _index_report(model, counter, norms, n, num_classes, extra_iterations, method, chance_error)


def _top1_wrong(logits, targets):
    return logits.argmax(dim=1) != targets


def _evaluate(model, data, extra_iterations, method, error_fn, batch_size, extras: Optional[_Extras] = None):
    """The perturbation passes over every batch: (error counts, norm sums, n, number of outputs)."""
    error_fn = error_fn or _top1_wrong
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter, norms, n = _Counter(), _Sums(), 0
    num_classes = None
    try:
        with torch.no_grad():
            for x, y in _batches(data, batch_size):
                x, y = x.to(device), y.to(device)
                n += x.shape[0]
                if method == "reference":
                    num_classes = _reference_batch(model, x, y, error_fn, counter, extra_iterations)
                else:
                    num_classes = _cached_batch(model, x, y, error_fn, counter, extra_iterations, chunk=batch_size,
                                                norms=norms, extras=extras)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("compute_indices: no data (empty evaluation set)")
    return counter, norms, n, num_classes


def _index_report(model, counter, norms, n, num_classes, extra_iterations, method, chance_error) -> "IndexReport":
    e_ch = chance_error if chance_error is not None else 1.0 - 1.0 / num_classes
    e_star = counter.wrong["star"] / n
    notes = []
    defined = e_ch > e_star
    if not defined:
        notes.append(f"indices undefined: the unperturbed error {e_star:.4f} is not below chance {e_ch:.4f}")
    stages = []
    for s, stage in enumerate(model.stages):
        T = len(stage.blocks)
        e_conv = [counter.wrong[(s, "conv", t)] / n for t in range(1, T)]
        e_drop = [counter.wrong[(s, "drop", t)] / n for t in range(1, T + 1)]
        e_div = [counter.wrong[(s, "div", k)] / n for k in range(1, extra_iterations + 1)]
        nan = float("nan")
        if defined and T > 1:
            ci = 1.0 - _mean([_phi(e, e_star, e_ch) for e in e_conv])
            ri = 1.0 - _mean([min(1.0, abs(e - e_drop[-1]) / (e_ch - e_star)) for e in e_drop[:-1]])
        else:
            ci = ri = nan
        di = _mean([_phi(e, e_star, e_ch) for e in e_div]) if defined else nan
        updates = [norms.values.get((s, "update", t), nan) / n for t in range(1, T + 1)]
        fixed = norms.values.get((s, "fixed"), nan) / n
        stages.append(StageIndices(ci, ri, di, e_conv, e_drop, e_div, updates, fixed))
    if any(len(stage.blocks) == 1 for stage in model.stages):
        notes.append("CI and RI are undefined for stages with a single block (T = 1)")

    def net(attr):
        values = [getattr(st, attr) for st in stages]
        return float("nan") if any(math.isnan(v) for v in values) else _mean(values)

    return IndexReport(net("ci"), net("ri"), net("di"), e_star, e_ch, n, stages, method, notes)


def index_flops(model, extra_iterations: int = 16) -> dict:
    """Residual-block evaluations per example that each method needs, counting a block as one unit (every
    stage's block costs about the same MACs: channels double as the side halves) and ignoring the stem,
    transitions and head (a few percent)."""
    T = [len(st.blocks) for st in model.stages]
    K = extra_iterations
    full = sum(T)
    reference, cached = full, full  # e*: one plain forward
    for s, Ts in enumerate(T):
        rest = sum(T[s + 1 :])
        # Reference: a full forward per perturbation (early read-out skips T-t blocks, drop-out one,
        # extra iterations add k).
        reference += sum(full - (Ts - t) for t in range(1, Ts)) + Ts * (full - 1) + sum(full + k for k in range(1, K + 1))
        # Cached: every perturbed stage output goes through the rest of the network once; drop-out of
        # block t re-runs blocks t+1..T from the cached z_{t-1}; extra iterations are incremental.
        cached += (Ts - 1 + Ts + K) * rest + sum(Ts - t for t in range(1, Ts + 1)) + K
    return {"reference_blocks": reference, "cached_blocks": cached, "ratio": reference / cached}
