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
batches several perturbations share a forward). Both count the same errors. The passes themselves are the
evaluator's (evaluator.py), which the other measures share.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

from ..io.checkpoint import json_safe
from ..models.residual import check_residual_model
from .evaluator import (
    NonFiniteOutputsError,
    Tally,
    cached_pass,
    check_batch_size,
    check_extra_iterations,
    evaluate_batches,
    reference_pass,
    top1_wrong,
)

__all__ = [
    "compute_indices",
    "IndexReport",
    "StageIndices",
    "index_flops",
    "index_report",
    "NonFiniteOutputsError",
    "METHODS",
]

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
    check_extra_iterations(extra_iterations, "compute_indices")
    if method not in METHODS:
        raise ValueError(f"compute_indices: method must be one of {METHODS}, got {method!r}")
    check_batch_size(batch_size, "compute_indices")
    check_residual_model(model, "compute_indices")
    wrong_fn = error_fn or top1_wrong
    errors, norms = Tally(), Tally()

    def per_batch(x, y):
        if method == "reference":
            return reference_pass(model, x, y, wrong_fn, errors, extra_iterations)
        return cached_pass(model, x, y, wrong_fn, errors, extra_iterations, chunk=batch_size, norms=norms)

    n, num_classes = evaluate_batches(model, data, batch_size, "compute_indices", per_batch)
    return index_report(model, errors, norms, n, num_classes, extra_iterations, method, chance_error)


def index_report(
    model,
    errors: Tally,
    norms: Tally,
    n: int,
    num_classes: int,
    extra_iterations: int,
    method: str,
    chance_error: Optional[float],
) -> IndexReport:
    """The indices from the evaluator's tallies (SPEC section 4)."""
    e_ch = chance_error if chance_error is not None else 1.0 - 1.0 / num_classes
    e_star = errors["star"] / n
    notes = []
    defined = e_ch > e_star
    if not defined:
        notes.append(f"indices undefined: the unperturbed error {e_star:.4f} is not below chance {e_ch:.4f}")
    stages = []
    for s, stage in enumerate(model.stages):
        T = len(stage.blocks)
        e_conv = [errors[(s, "conv", t)] / n for t in range(1, T)]
        e_drop = [errors[(s, "drop", t)] / n for t in range(1, T + 1)]
        e_div = [errors[(s, "div", k)] / n for k in range(1, extra_iterations + 1)]
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
        reference += (
            sum(full - (Ts - t) for t in range(1, Ts)) + Ts * (full - 1) + sum(full + k for k in range(1, K + 1))
        )
        # Cached: every perturbed stage output goes through the rest of the network once; drop-out of
        # block t re-runs blocks t+1..T from the cached z_{t-1}; extra iterations are incremental.
        cached += (Ts - 1 + Ts + K) * rest + sum(Ts - t for t in range(1, Ts + 1)) + K
    return {"reference_blocks": reference, "cached_blocks": cached, "ratio": reference / cached}
