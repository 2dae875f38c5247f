"""Thinking longer at test time: the error after k extra iterations of every stage (k = 0..K), on any test set.

    report = thinking_longer_report(model, (x_hard, y_hard), extra_iterations=16, ks="all")
    report.ks, report.errors, report.best_k, report.gain, report.overthinking_rate

Which k are evaluated: `ks="all"` every k = 0..K; `ks="log"` (the default) 0, the powers of two below K, and K
(0, 1, 2, 4, 8, 16 for K = 16), which costs a third as much: each k runs the later stages from scratch (their
input changes with k), so every k = 0..K costs O(K^2) blocks; or an explicit list of k.

With k extra iterations every stage runs its T blocks and then its last block k more times (PCR: with the stage
input), so that a weight-shared network (lam = 1, every block the same) runs its block T + k times, the way
recurrent "deep thinking" networks are run longer on harder inputs (Schwarzschild et al. 2021; Bansal et al.
2022). Unlike the Divergence Index, which perturbs one stage at a time, every stage iterates at once.

The best k is chosen on the examples it is scored on, so `gain` (the error at k = 0 minus the best error, >= 0)
is biased upwards: over six k's that differ by a few examples each, the smallest error is partly luck.
`heldout_gain` is not: the examples are split into two halves (even and odd positions), the best k is chosen on
one half and its gain measured on the other, both ways, and the two gains averaged (weighted by the halves'
sizes). It can be negative: the k that looked best on one half loses on the other.

The pass is batched: the first stage's K extra iterations are built incrementally from its output, and the outputs
for several k go through the later stages together (up to `batch_size` rows a forward), each row group taking its
own number of extra iterations there. `forward_with_extra_iterations` is the unbatched definition: one plain
forward per k, which the tests hold the pass to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..io.checkpoint import json_safe
from ..models.residual import block_update, check_residual_model
from .evaluator import (
    Tally,
    check_batch_size,
    check_extra_iterations,
    check_finite_outputs,
    evaluate_batches,
    stage_output,
    top1_wrong,
)

__all__ = [
    "thinking_longer_report",
    "ThinkingLongerReport",
    "forward_with_extra_iterations",
    "wrong_by_extra_iterations",
    "extra_iteration_grid",
]


@dataclass
class ThinkingLongerReport:
    """errors[i]: the error with ks[i] extra iterations of every stage (ks[0] = 0: the network as trained; ks[-1]
    = K).

    overthinking_rate: the share of examples right at k = 0 and wrong at k = K; rescued_rate: wrong at k = 0 and
    right at k = K.

    heldout_gain: the gain with the best k chosen on other examples (module docstring); NaN for one example."""

    errors: list
    n: int
    overthinking_rate: float
    rescued_rate: float
    ks: list
    heldout_gain: float = float("nan")

    @property
    def extra_iterations(self) -> int:
        return self.ks[-1]

    @property
    def best_k(self) -> int:
        """The k of the lowest error (the smallest such k)."""
        return self.ks[min(range(len(self.errors)), key=lambda i: (self.errors[i], i))]

    @property
    def best_error(self) -> float:
        return self.errors[self.ks.index(self.best_k)]

    @property
    def gain(self) -> float:
        """errors[0] - best_error: what thinking longer buys at its best k (>= 0; chosen on the same examples, so
        biased upwards: heldout_gain is not)."""
        return self.errors[0] - self.best_error

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            extra_iterations=self.extra_iterations,
            error=self.errors[0],
            best_k=self.best_k,
            best_error=self.best_error,
            gain=self.gain,
            error_at_K=self.errors[-1],
        )
        return json_safe(out)


def forward_with_extra_iterations(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """A plain forward with every stage's last block applied k more times (the unbatched definition)."""
    z = model.stem(x)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        z = stage_output(stage, z, extra=k)
    return model.head(z)


def _later_stages(model, z: torch.Tensor, extra: list, n: int) -> torch.Tensor:
    """Stages 1.. and the head for row groups of n examples, group i with extra[i] extra iterations (ascending)."""
    for s in range(1, len(model.stages)):
        stage = model.stages[s]
        x_s = model.transitions[s - 1](z)
        z = stage_output(stage, x_s)
        for j in range(1, max(extra) + 1):  # iteration j for the groups that take at least j
            first = next(i for i, k in enumerate(extra) if k >= j)
            rows = slice(first * n, None)
            z[rows] = block_update(stage, stage.blocks[-1], z[rows], x_s[rows])  # in place: no copy of the rest
    return model.head(z)


def extra_iteration_grid(ks, K: int) -> list:
    """The k evaluated: "all" (0..K), "log" (0, the powers of two below K, and K) or a list of ints in 0..K (sorted,
    0 and K added). Raises ValueError naming a bad one."""
    if ks == "all":
        return list(range(K + 1))
    if ks == "log":
        return sorted({0, K} | {2**i for i in range(K.bit_length()) if 2**i < K})
    if isinstance(ks, str) or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= K for k in ks):
        raise ValueError(f"thinking_longer_report: ks must be 'all', 'log' or ints in 0..K={K}, got {ks!r}")
    return sorted({0, K} | set(ks))


def wrong_by_extra_iterations(
    model, x: torch.Tensor, y: torch.Tensor, K: int, wrong_fn: Callable = top1_wrong, chunk: int = 512, ks=None
) -> torch.Tensor:
    """[n, len(ks)]: whether each example is wrong with each k of ks (default every k = 0..K) extra iterations of
    every stage (batched)."""
    ks = list(range(K + 1)) if ks is None else ks
    n = x.shape[0]
    stage0 = model.stages[0]
    x_0 = model.stem(x)
    z = stage_output(stage0, x_0)
    group = max(1, chunk // n)  # values of k per forward through the later stages
    columns, pending = [], []

    def flush():
        extra = [k for k, _ in pending]
        logits = _later_stages(model, torch.cat([out for _, out in pending]), extra, n)
        if not extra[0]:
            check_finite_outputs(logits[:n])
        columns.extend(wrong_fn(logits[i * n : (i + 1) * n], y) for i in range(len(extra)))
        pending.clear()

    wanted = set(ks)
    for k in range(max(ks) + 1):
        if k > 0:
            z = block_update(stage0, stage0.blocks[-1], z, x_0)
        if k not in wanted:
            continue
        pending.append((k, z))
        if len(pending) == group:
            flush()
    if pending:
        flush()
    return torch.stack(columns, dim=1)


def thinking_longer_report(
    model,
    data: Union[tuple, Iterable],
    *,
    extra_iterations: int = 16,
    ks: Union[str, Sequence[int]] = "log",
    error_fn: Optional[Callable] = None,
    batch_size: int = 512,
) -> ThinkingLongerReport:
    """The error with k = 0..K extra iterations of every stage (module docstring), in eval mode, without gradients.

    Args:
        model: a residual model (itconv_fast.models.residual).
        data: (x, y) tensors or an iterable of (x, y) batches: the test set, harder than the training set or not.
        extra_iterations: K >= 1.
        ks: the k evaluated (module docstring): "log" (default), "all" or a list (0 and K always added).
        error_fn: (logits, targets) -> per-example wrong (bool or a share in [0, 1]); default top-1.
        batch_size: examples a batch (and rows a forward through the later stages).
    """
    check_residual_model(model, "thinking_longer_report")
    check_extra_iterations(extra_iterations, "thinking_longer_report")
    check_batch_size(batch_size, "thinking_longer_report")
    wrong_fn = error_fn or top1_wrong
    K = extra_iterations
    ks = extra_iteration_grid(ks, K)
    tally = Tally()
    seen = [0]  # examples before this batch: their positions decide the halves

    def per_batch(x, y):
        wrong = wrong_by_extra_iterations(model, x, y, K, wrong_fn, batch_size, ks).double()
        tally.add("over", ((1 - wrong[:, 0]) * wrong[:, -1]).sum())
        tally.add("rescued", (wrong[:, 0] * (1 - wrong[:, -1])).sum())
        odd = (torch.arange(seen[0], seen[0] + wrong.shape[0], device=wrong.device) % 2).bool()
        seen[0] += wrong.shape[0]
        for half, rows in ((0, ~odd), (1, odd)):  # wrong counts per k, per half: the errors are their sums
            tally.add(("n", half), rows.sum())
            for i, count in enumerate(wrong[rows].sum(0).tolist()):
                tally.add((half, i), count)

    n, _ = evaluate_batches(model, data, batch_size, "thinking_longer_report", per_batch)
    wrong_by_half = [[tally[(h, i)] for i in range(len(ks))] for h in (0, 1)]
    errors = [(wrong_by_half[0][i] + wrong_by_half[1][i]) / n for i in range(len(ks))]
    heldout = _heldout_gain(wrong_by_half, [tally[("n", h)] for h in (0, 1)])
    return ThinkingLongerReport(errors, n, tally["over"] / n, tally["rescued"] / n, ks, heldout)


def _heldout_gain(wrong: list, n: list) -> float:
    """wrong[h][i]: the wrong count of half h at the i-th k; n[h]: its size. The gain of the k chosen on one half
    (the lowest error, the smallest k on ties), measured on the other, both ways, weighted by size."""
    if min(n) == 0:
        return float("nan")
    gain = 0.0
    for chosen_on, scored_on in ((0, 1), (1, 0)):
        best = min(range(len(wrong[chosen_on])), key=lambda i: (wrong[chosen_on][i], i))
        gain += wrong[scored_on][0] - wrong[scored_on][best]  # = n[scored_on] * (its error gain)
    return gain / sum(n)
