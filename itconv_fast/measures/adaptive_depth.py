"""Adaptive depth: each example leaves a stage once it has converged (or its read-out is settled), and the compute
that saves.

    report = adaptive_depth_report(model, (x, y), taus=(0.01, 0.03, 0.1), confidences=(0.9, 0.99), agreements=(1, 2))
    report.curves[0].errors, report.curves[0].mean_flops, report.compute_saved

Three halting rules, each swept over its levels:

- **update** (the convergence the Divergence Index asks for; Graves 2016): in every stage, blocks are applied
  (after block T the last block again, up to T + K in all) until the relative update ||z_t - z_{t-1}|| /
  ||z_{t-1}|| falls below tau; at least one block runs, and z_t is passed on. With tau = 0 nothing halts early
  (the network with K extra iterations of every stage; K = 0: the network as trained, bit for bit); a huge tau
  runs one block a stage.
- **confidence** (Kaya et al. 2019, Shallow-Deep Networks) and **agreement** (patience-based exits: the read-out's
  decision unchanged for `level` consecutive blocks): these halt on the network's output, which a residual model
  reads out only from its last stage's state (its head). The earlier stages run as trained; in the last stage
  the head reads every block's state out, and an example stops once its read-out is confident (the confidence
  function at or above the level) or has agreed `level` times in a row. The read-outs' own cost is counted in
  the FLOPs.

Halted examples leave the batch, so the saving is real wall time, not a mask; the report times every level
against the full network in the same run. FLOPs are those of convolutions and matrix products
(torch.utils.flop_counter), per block measured once on one example.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..io.checkpoint import json_safe
from ..models.residual import block_update, check_residual_model
from .evaluator import Tally, check_batch_size, check_finite_outputs, evaluate_batches, per_example_norm, top1_wrong

__all__ = [
    "adaptive_depth_report",
    "AdaptiveDepthReport",
    "HaltingCurve",
    "adaptive_forward",
    "network_flops",
    "halting_levels",
    "HALTING_RULES",
    "ERROR_MARGIN",
    "DEFAULT_TAUS",
    "DEFAULT_CONFIDENCES",
    "DEFAULT_AGREEMENTS",
]

ERROR_MARGIN = 0.005  # "at equal error": no more than half a point above the full network's error
DEFAULT_TAUS = (0.01, 0.03, 0.1, 0.3)
DEFAULT_CONFIDENCES = (0.9, 0.99)
DEFAULT_AGREEMENTS = (1, 2)
HALTING_RULES = ("update", "confidence", "agreement")


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability (class targets)."""
    return logits.softmax(dim=1).amax(dim=1)


def argmax_decision(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1)


def _saved(errors, flops, full_error, full_flops) -> float:
    fits = [f for e, f in zip(errors, flops) if e <= full_error + ERROR_MARGIN]
    return max(0.0, 1.0 - min(fits) / full_flops) if fits else 0.0


@dataclass
class HaltingCurve:
    """One rule swept over its levels: per level the error, the mean blocks an example ran (all stages), the mean
    FLOPs an example cost (read-outs included) and the wall time of the halting forwards."""

    rule: str
    levels: list
    errors: list
    mean_blocks: list
    mean_flops: list
    seconds: list


@dataclass
class AdaptiveDepthReport:
    """The curves of the halting rules; full_*: the network as trained (T blocks a stage), timed in the same run."""

    curves: list
    full_error: float
    full_blocks: int
    full_flops: float
    full_seconds: float
    extra_iterations: int
    n: int

    def curve(self, rule: str) -> HaltingCurve:
        return next(c for c in self.curves if c.rule == rule)

    def compute_saved_by(self, rule: str) -> float:
        """1 - FLOPs / full FLOPs at the cheapest level of `rule` whose error is within ERROR_MARGIN of the full
        network's (0 when none is)."""
        c = self.curve(rule)
        return _saved(c.errors, c.mean_flops, self.full_error, self.full_flops)

    @property
    def compute_saved(self) -> float:
        """The most any rule saves at no more than ERROR_MARGIN of error."""
        return max((self.compute_saved_by(c.rule) for c in self.curves), default=0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            compute_saved=self.compute_saved,
            compute_saved_by_rule={c.rule: self.compute_saved_by(c.rule) for c in self.curves},
            error_margin=ERROR_MARGIN,
        )
        return json_safe(out)


def _stage_halts(rule, level, new, current, running_logits, state):
    """Which of the running examples halt after this block (rule 'update'; the read-out rules get the head's
    logits of `new` and a per-example state dict they keep across blocks)."""
    if rule == "update":
        return per_example_norm(new - current) < level * per_example_norm(current)
    if rule == "confidence":
        return state["confidence_fn"](running_logits) >= level
    decision = state["decision_fn"](running_logits)
    previous = state.get("decision")
    if previous is None:
        streak = torch.zeros(decision.shape[0], dtype=torch.long, device=decision.device)
    else:
        same = (decision == previous).reshape(decision.shape[0], -1).all(dim=1)
        streak = torch.where(same, state["streak"] + 1, torch.zeros_like(state["streak"]))
    state["decision"], state["streak"] = decision, streak
    return streak >= level


def adaptive_forward(
    model,
    x: torch.Tensor,
    level: float,
    extra_iterations: int = 0,
    *,
    rule: str = "update",
    confidence_fn: Optional[Callable] = None,
    decision_fn: Optional[Callable] = None,
) -> tuple:
    """(logits, blocks [n, stages]): the forward with per-example halting by `rule` at `level` (module docstring);
    blocks counts the blocks each example ran in each stage. confidence_fn (logits -> [n]; default the largest
    softmax probability) and decision_fn (logits -> a per-example decision; default the argmax) serve the
    read-out rules."""
    if rule not in HALTING_RULES:
        raise ValueError(f"adaptive_forward: rule must be one of {HALTING_RULES}, got {rule!r}")
    n, S = x.shape[0], len(model.stages)
    z = model.stem(x)
    blocks = torch.zeros(n, S, dtype=torch.long, device=x.device)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        T = len(stage.blocks)
        halting = rule == "update" or s == S - 1  # read-out rules halt in the last stage only
        last = T + extra_iterations if halting else T
        state = dict(confidence_fn=confidence_fn or softmax_confidence, decision_fn=decision_fn or argmax_decision)
        out = None  # the stage's output, filled as examples halt
        running = torch.arange(n, device=x.device)  # the examples still in the stage
        current, inputs = z, z
        for t in range(1, last + 1):
            new = block_update(stage, stage.blocks[min(t, T) - 1], current, inputs)
            blocks[running, s] += 1
            if t == last:
                halt = torch.ones(running.shape[0], dtype=torch.bool, device=x.device)
            elif not halting:
                halt = torch.zeros(running.shape[0], dtype=torch.bool, device=x.device)
            else:
                logits = model.head(new) if rule != "update" else None
                halt = _stage_halts(rule, level, new, current, logits, state)
            if out is None and bool(halt.all()):  # all halt together: the stage's own output, not a copy
                out = new
                break
            if out is None:
                out = torch.empty_like(z)
            out[running[halt]] = new[halt]
            keep = ~halt
            if not bool(keep.any()):
                break
            running, current, inputs = running[keep], new[keep], inputs[keep]
            if "decision" in state:
                state["decision"], state["streak"] = state["decision"][keep], state["streak"][keep]
        z = out
    return model.head(z), blocks


def network_flops(model, x: torch.Tensor) -> dict:
    """FLOPs for one example (convolutions and matrix products, as torch.utils.flop_counter counts them): the fixed
    part (stem, transitions, head), one block of each stage, and one read-out (the head)."""

    def flops(fn, *args) -> float:
        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        return float(counter.get_total_flops()), out

    with torch.no_grad():
        fixed, z = flops(model.stem, x[:1])
        per_block = []
        for s, stage in enumerate(model.stages):
            if s > 0:
                f, z = flops(model.transitions[s - 1], z)
                fixed += f
            f, _ = flops(block_update, stage, stage.blocks[0], z, z)
            per_block.append(f)
        readout, _ = flops(model.head, z)
    return dict(fixed=fixed + readout, per_block=per_block, readout=readout)


def _levels(values, rule: str, integer: bool = False) -> list:
    values = [values] if isinstance(values, (int, float)) else list(values)
    for v in values:
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
        if bad or (integer and (v != int(v) or v < 1)):
            kind = "an integer >= 1" if integer else "a finite number >= 0"
            raise ValueError(f"adaptive_depth_report: every {rule} level must be {kind}, got {v!r}")
    return [int(v) if integer else float(v) for v in values]


def halting_levels(taus, confidences, agreements) -> list:
    """[(rule, levels)] of the rules with levels, checked: taus and confidences finite and >= 0, agreements
    integers >= 1, at least one level in all. Raises ValueError naming the bad one."""
    sweeps = [
        ("update", _levels(taus, "update (tau)")),
        ("confidence", _levels(confidences, "confidence")),
        ("agreement", _levels(agreements, "agreement", integer=True)),
    ]
    sweeps = [(rule, levels) for rule, levels in sweeps if levels]
    if not sweeps:
        raise ValueError("adaptive_depth_report: no levels (taus, confidences and agreements are all empty)")
    return sweeps


def adaptive_depth_report(
    model,
    data: Union[tuple, Iterable],
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    confidences: Sequence[float] = DEFAULT_CONFIDENCES,
    agreements: Sequence[int] = DEFAULT_AGREEMENTS,
    extra_iterations: int = 0,
    error_fn: Optional[Callable] = None,
    confidence_fn: Optional[Callable] = None,
    decision_fn: Optional[Callable] = None,
    batch_size: int = 512,
) -> AdaptiveDepthReport:
    """The error, mean blocks and FLOPs of each halting rule at each level, against the full network (module
    docstring). An empty sequence leaves its rule out; at least one level in all."""
    check_residual_model(model, "adaptive_depth_report")
    sweeps = halting_levels(taus, confidences, agreements)
    if isinstance(extra_iterations, bool) or not isinstance(extra_iterations, int) or extra_iterations < 0:
        raise ValueError(f"adaptive_depth_report: extra_iterations must be an int >= 0, got {extra_iterations!r}")
    check_batch_size(batch_size, "adaptive_depth_report")
    wrong_fn = error_fn or top1_wrong
    readout = dict(confidence_fn=confidence_fn, decision_fn=decision_fn)
    tally = Tally()
    cost = {}

    def timed(fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if (out[0] if isinstance(out, tuple) else out).device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def per_batch(x, y):
        if not cost:  # the first calls build kernels and caches: not part of any time
            cost.update(network_flops(model, x))
            model(x)
            adaptive_forward(model, x, sweeps[0][1][0], extra_iterations, rule=sweeps[0][0], **readout)
        logits, seconds = timed(model, x)
        check_finite_outputs(logits)
        tally.add("full", wrong_fn(logits, y).sum())
        tally.add("full seconds", seconds)
        per_block = torch.tensor(cost["per_block"], dtype=torch.float64, device=x.device)
        for rule, levels in sweeps:
            for i, level in enumerate(levels):
                (logits, blocks), seconds = timed(
                    adaptive_forward, model, x, level, extra_iterations, rule=rule, **readout
                )
                flops = (blocks.double() * per_block).sum() + x.shape[0] * cost["fixed"]
                if rule != "update":  # a read-out after every block of the last stage but the final one
                    flops = flops + (blocks[:, -1] - 1).sum() * cost["readout"]
                tally.add((rule, "wrong", i), wrong_fn(logits, y).sum())
                tally.add((rule, "blocks", i), blocks.sum())
                tally.add((rule, "flops", i), flops)
                tally.add((rule, "seconds", i), seconds)

    n, _ = evaluate_batches(model, data, batch_size, "adaptive_depth_report", per_batch)
    blocks_per_stage = [len(stage.blocks) for stage in model.stages]
    curves = [
        HaltingCurve(
            rule=rule,
            levels=levels,
            errors=[tally[(rule, "wrong", i)] / n for i in range(len(levels))],
            mean_blocks=[tally[(rule, "blocks", i)] / n for i in range(len(levels))],
            mean_flops=[tally[(rule, "flops", i)] / n for i in range(len(levels))],
            seconds=[tally[(rule, "seconds", i)] for i in range(len(levels))],
        )
        for rule, levels in sweeps
    ]
    return AdaptiveDepthReport(
        curves=curves,
        full_error=tally["full"] / n,
        full_blocks=sum(blocks_per_stage),
        full_flops=cost["fixed"] + sum(b * f for b, f in zip(blocks_per_stage, cost["per_block"])),
        full_seconds=tally["full seconds"],
        extra_iterations=extra_iterations,
        n=n,
    )
