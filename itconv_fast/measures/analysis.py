"""Beyond the three indices: iterative-refinement measures, anytime inference and convergence traces.

    report = analyze(model, (x, y), measures=("indices", "refinement", "anytime", "traces"))
    report.indices.di, report.stages[0].refinement[3].cosine_mean, report.stages[0].anytime_error,
    report.anytime_all_error, report.stages[0].trace["fixed_point_residual"]["median"], report.to_dict()

Every measure comes from the cached evaluator (evaluator.py: stage inputs and unperturbed z_t computed once per
batch, perturbed stage outputs batched through the rest of the network), through its hooks (AnalysisHooks), plus one
backward pass per batch for the gradients and one pass per k for the all-stages anytime curve:

- refinement (Jastrzebski et al. 2018), per block t of every stage: the cosine between the block's update
  Delta_t = z_t - z_{t-1} (= f~_t(z_{t-1}) for ordinary and ICR networks; for PCR the actual change
  x_s + f~_t(z_{t-1}) - z_{t-1}) and the negative loss gradient -dL/dz_{t-1} (per example; mean and
  quartiles; 0 where either vector is 0; the gradient is taken through the state, with x_s held fixed);
  the ratio ||Delta_t|| / ||z_{t-1}||; the loss and error after
  dropping block t and after applying block t twice. The gradients of all blocks come from one backward
  pass per batch (torch.autograd.grad on every z_{t-1}).
- anytime inference: error and loss when a stage runs k = 1 .. T + K iterations: k <= T runs its first k
  blocks (early read-out), k > T repeats the last block k - T times (for a weight-shared lam = 1 network
  every block is the same, so this is the stage's own block repeated k times). One curve per stage (the
  other stages unchanged) and one where every stage runs k iterations together.
- traces: along the K extra applications R of the last block, per example: the relative update
  ||z_{T+k} - z_{T+k-1}|| / ||z_{T+k-1}|| (k = 1..K) and the fixed-point residual ||R(z) - z|| / ||z|| at
  z = z_{T+k} (k = 0..K; the residual at z_{T+k-1} is the relative update of step k, so the residual series
  is the update series with one more point, at z_{T+K}); summaries: median, 90th percentile and the
  share of examples under `threshold` (default 0.05). For PCR networks the contraction factor
  ||z_{T+k+1} - z_{T+k}|| / ||z_{T+k} - z_{T+k-1}|| along the trace (median and max per step), beside the
  stage's Lipschitz bound mu when it is spectrally normalised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from ..io.checkpoint import json_safe
from ..models.residual import block_update, check_residual_model
from .evaluator import (
    PassHooks,
    Tally,
    cached_pass,
    check_batch_size,
    check_extra_iterations,
    evaluate_batches,
    per_example_norm,
    stage_iterations,
    top1_wrong,
)
from .indices import IndexReport, index_report

__all__ = ["analyze", "AnalysisReport", "StageAnalysis", "BlockRefinement", "MEASURES"]

MEASURES = ("indices", "refinement", "anytime", "traces")


@dataclass
class BlockRefinement:
    cosine_mean: float
    cosine_quartiles: list  # 25th, 50th, 75th percentile over examples
    ratio_mean: float
    ratio_quartiles: list
    drop_loss: float
    drop_error: float
    twice_loss: float
    twice_error: float


@dataclass
class StageAnalysis:
    refinement: list = field(default_factory=list)  # BlockRefinement per block t = 1..T
    anytime_error: list = field(default_factory=list)  # k = 1..T+K
    anytime_loss: list = field(default_factory=list)
    trace: dict = field(default_factory=dict)


@dataclass
class AnalysisReport:
    indices: IndexReport
    loss: float  # unperturbed mean loss
    stages: list
    anytime_all_error: list = field(default_factory=list)  # every stage runs k iterations, k = 1..T+K
    anytime_all_loss: list = field(default_factory=list)
    threshold: float = 0.05
    measures: tuple = MEASURES
    per_example: dict = field(default_factory=dict, repr=False)  # (stage, name) -> tensor; not in to_dict

    def to_dict(self) -> dict:
        return json_safe(
            {
                "measures": list(self.measures),
                "threshold": self.threshold,
                "loss": self.loss,
                "indices": self.indices.to_dict(),
                "stages": [asdict(s) for s in self.stages],
                "anytime_all_error": self.anytime_all_error,
                "anytime_all_loss": self.anytime_all_loss,
            }
        )


def _default_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _quartiles(values: torch.Tensor) -> list:
    return [float(q) for q in torch.quantile(values.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))]


class AnalysisHooks(PassHooks):
    """What the analyses add to the cached pass: the loss of every perturbation, "apply block t twice"
    perturbations (refinement) and per-example traces of the extra iterations."""

    def __init__(self, loss_fn, twice: bool = False, traces: bool = False) -> None:
        self.loss_fn, self.twice, self.traces = loss_fn, twice, traces
        self.losses = Tally()
        self.step_norms = {}  # s -> [n, K+1] ||z_{T+k+1} - z_{T+k}||, k = 0..K, one tensor per batch
        self.state_norms = {}  # s -> [n, K+1] ||z_{T+k}||

    def on_logits(self, key, logits, y) -> None:
        self.losses.add(key, self.loss_fn(logits, y).sum())

    def stage_perturbations(self, s, stage, x_s, trajectory) -> list:
        """Block t applied twice: from the cached z_t, once more, then on. For t = T this is the first extra
        iteration, counted there (first_extra_iteration_keys)."""
        if not self.twice:
            return []
        T, outputs = len(stage.blocks), []
        for t in range(1, T):
            z = block_update(stage, stage.blocks[t - 1], trajectory[t], x_s)
            for u in range(t + 1, T + 1):
                z = block_update(stage, stage.blocks[u - 1], z, x_s)
            outputs.append(((s, "twice", t), z))
        return outputs

    def first_extra_iteration_keys(self, s, T) -> list:
        return [(s, "twice", T)] if self.twice else []

    def on_trace(self, s, steps, states) -> None:
        self.step_norms.setdefault(s, []).append(steps.double().cpu())
        self.state_norms.setdefault(s, []).append(states.double().cpu())


def _refinement_batch(model, x, y, loss_fn, store):
    """Per-example cosines and ratios for every block, from one backward pass."""
    with torch.enable_grad():
        z = model.stem(x).detach().requires_grad_(True)
        trajectories = []
        for s, stage in enumerate(model.stages):
            if s > 0:
                z = model.transitions[s - 1](z)
            # z_0 as its own node: under PCR x_s also feeds every block directly, and dL/dz_0 is the gradient
            # through the state alone (x_s held fixed), as for every later z_{t-1}.
            x_s, traj = z, [z.clone()]
            for block in stage.blocks:
                traj.append(block_update(stage, block, traj[-1], x_s))
            trajectories.append(traj)
            z = traj[-1]
        loss = loss_fn(model.head(z), y).sum()
        inputs = [traj[t] for traj in trajectories for t in range(len(traj) - 1)]
        grads = torch.autograd.grad(loss, inputs)
    i = 0
    with torch.no_grad():
        for s, traj in enumerate(trajectories):
            for t in range(1, len(traj)):
                delta = (traj[t] - traj[t - 1]).flatten(1)
                g = -grads[i].flatten(1)
                i += 1
                dn, gn = delta.norm(dim=1), g.norm(dim=1)
                cos = torch.where(
                    (dn > 0) & (gn > 0), (delta * g).sum(1) / (dn * gn).clamp_min(1e-30), torch.zeros_like(dn)
                )
                ratio = dn / per_example_norm(traj[t - 1]).clamp_min(1e-12)
                store.setdefault((s, t, "cos"), []).append(cos.double().cpu())
                store.setdefault((s, t, "ratio"), []).append(ratio.double().cpu())


def _anytime_all_batch(model, x, y, error_fn, loss_fn, k_max, wrong: Tally, losses: Tally, skip=None):
    """Every stage runs k iterations together, k = 1..k_max, except k = skip (the unperturbed network, known
    from the cached pass). The first stage's trajectory is built once."""
    z0 = model.stem(x)
    first = model.stages[0]
    z = z0
    for k in range(1, k_max + 1):
        T = len(first.blocks)
        z = block_update(first, first.blocks[min(k - 1, T - 1)], z, z0)
        if k == skip:
            continue
        out = z
        for s in range(1, len(model.stages)):
            out = stage_iterations(model.stages[s], model.transitions[s - 1](out), k)
        logits = model.head(out)
        wrong.add(k, error_fn(logits, y).sum())
        losses.add(k, loss_fn(logits, y).sum())


def _summary(values: torch.Tensor, threshold: float) -> dict:
    """Per column (step) of an [N, steps] tensor: median, 90th percentile, share under threshold."""
    q = torch.quantile(values, torch.tensor([0.5, 0.9], dtype=values.dtype), dim=0)
    return {
        "median": q[0].tolist(),
        "p90": q[1].tolist(),
        "share_below": (values < threshold).double().mean(0).tolist(),
    }


def _stage_refinement(s: int, T: int, per_example: dict, loss_of: Callable, err_of: Callable) -> list:
    """Stage s's BlockRefinement per block; moves the per-example cosines and ratios to their report keys."""
    blocks = []
    for t in range(1, T + 1):
        cos = torch.cat(per_example.pop((s, t, "cos")))
        ratio = torch.cat(per_example.pop((s, t, "ratio")))
        per_example[(s, f"cosine_block{t}")] = cos
        per_example[(s, f"ratio_block{t}")] = ratio
        blocks.append(
            BlockRefinement(
                float(cos.mean()),
                _quartiles(cos),
                float(ratio.mean()),
                _quartiles(ratio),
                loss_of((s, "drop", t)),
                err_of((s, "drop", t)),
                loss_of((s, "twice", t)),
                err_of((s, "twice", t)),
            )
        )
    return blocks


def _stage_trace(s: int, stage, hooks: "AnalysisHooks", K: int, threshold: float, per_example: dict) -> dict:
    """Stage s's trace summaries over the K extra iterations; adds their per-example tensors."""
    steps = torch.cat(hooks.step_norms[s])  # [N, K+1]: ||z_{T+k+1} - z_{T+k}||, k = 0..K
    states = torch.cat(hooks.state_norms[s]).clamp_min(1e-12)
    residual = steps / states  # at z_{T+k}, k = 0..K
    update = residual[:, :K]  # step k = 1..K: ||z_{T+k} - z_{T+k-1}|| / ||z_{T+k-1}||
    per_example[(s, "fixed_point_residual")] = residual
    per_example[(s, "step_norm")] = steps
    trace = {"relative_update": _summary(update, threshold), "fixed_point_residual": _summary(residual, threshold)}
    if stage.pcr:
        factor = steps[:, 1:] / steps[:, :-1].clamp_min(1e-30)  # k = 1..K
        per_example[(s, "contraction")] = factor
        trace["contraction"] = {
            "median": factor.median(0).values.tolist(),
            "max": factor.max(0).values.tolist(),
            "lipschitz_bound": getattr(getattr(stage, "sn", None), "mu", None),
        }
    return trace


def analyze(
    model,
    data: Union[tuple, Iterable],
    *,
    measures=MEASURES,
    extra_iterations: int = 16,
    threshold: float = 0.05,
    chance_error: Optional[float] = None,
    error_fn: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
    batch_size: int = 512,
) -> AnalysisReport:
    """The indices plus the measures named in `measures` (a subset of MEASURES, or "all").

    Args as for compute_indices, plus loss_fn: (logits, targets) -> per-example loss (default cross-entropy)
    and threshold: the trace summaries' cut-off for "converged". The three indices are always computed (they
    come from the same pass). Data is read once: each batch goes through every pass before the next.
    """
    check_residual_model(model, "analyze")
    if measures == "all":
        measures = MEASURES
    measures = tuple(measures)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"analyze: unknown measure {unknown[0]!r}; choose from {MEASURES} or 'all'")
    check_extra_iterations(extra_iterations, "analyze")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"analyze: threshold must be a finite number > 0, got {threshold!r}")
    check_batch_size(batch_size, "analyze")
    error_fn = error_fn or top1_wrong
    loss_fn = loss_fn or _default_loss
    K = extra_iterations
    k_max = max(len(st.blocks) for st in model.stages) + K
    depths = {len(st.blocks) for st in model.stages}
    k_plain = depths.pop() if len(depths) == 1 else None  # every stage at its own T: the unperturbed network
    hooks = AnalysisHooks(loss_fn, twice="refinement" in measures, traces="traces" in measures)
    counter, norms = Tally(), Tally()
    per_example, all_wrong, all_losses = {}, Tally(), Tally()

    def per_batch(x, y):  # data is read once: each batch goes through every pass before the next
        num_classes = cached_pass(model, x, y, error_fn, counter, K, chunk=batch_size, norms=norms, hooks=hooks)
        if "anytime" in measures:
            _anytime_all_batch(model, x, y, error_fn, loss_fn, k_max, all_wrong, all_losses, skip=k_plain)
        if "refinement" in measures:
            _refinement_batch(model, x, y, loss_fn, per_example)  # (enables gradients for its backward)
        return num_classes

    n, num_classes = evaluate_batches(model, data, batch_size, "analyze", per_batch)
    indices = index_report(model, counter, norms, n, num_classes, K, "cached", chance_error)
    loss_of = lambda key: hooks.losses[key] / n  # noqa: E731
    err_of = lambda key: counter[key] / n  # noqa: E731
    stages = []
    for s, stage in enumerate(model.stages):
        st = StageAnalysis()
        if "refinement" in measures:
            st.refinement = _stage_refinement(s, len(stage.blocks), per_example, loss_of, err_of)
        if "anytime" in measures:
            keys = [(s, "conv", k) for k in range(1, len(stage.blocks))] + ["star"]
            keys += [(s, "div", k) for k in range(1, K + 1)]
            st.anytime_error = [err_of(key) for key in keys]
            st.anytime_loss = [loss_of(key) for key in keys]
        if "traces" in measures:
            st.trace = _stage_trace(s, stage, hooks, K, threshold, per_example)
        stages.append(st)
    report = AnalysisReport(
        indices, loss_of("star"), stages, threshold=float(threshold), measures=measures, per_example=per_example
    )
    if "anytime" in measures:
        if k_plain is not None:
            all_wrong.add(k_plain, counter["star"])
            all_losses.add(k_plain, hooks.losses["star"])
        report.anytime_all_error = [all_wrong[k] / n for k in range(1, k_max + 1)]
        report.anytime_all_loss = [all_losses[k] / n for k in range(1, k_max + 1)]
    return report
