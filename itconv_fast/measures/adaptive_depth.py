"""Adaptive depth: each example leaves a stage once the stage has converged on it, and the compute that saves.

    report = adaptive_depth_report(model, (x, y), taus=(0.01, 0.03, 0.1), extra_iterations=0)
    report.errors[i], report.mean_blocks[i], report.compute_saved

Per example and stage, blocks are applied (after block T, the last block again, up to T + K in all) until the
relative update ||z_t - z_{t-1}|| / ||z_{t-1}|| falls below tau; at least one block runs, and z_t is passed on
(Graves 2016; Kaya et al. 2019 halt on read-outs instead). Halted examples leave the batch, so the saving is real
wall time, not a mask. With tau = 0 nothing halts early: the network with K extra iterations of every stage (K = 0:
the network as trained, bit for bit); a huge tau runs one block a stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..io.checkpoint import json_safe
from ..models.residual import block_update, check_residual_model
from .evaluator import Tally, check_batch_size, check_finite_outputs, evaluate_batches, per_example_norm, top1_wrong

__all__ = ["adaptive_depth_report", "AdaptiveDepthReport", "adaptive_forward", "ERROR_MARGIN"]

ERROR_MARGIN = 0.005  # "at equal error": no more than half a point above the full network's error


@dataclass
class AdaptiveDepthReport:
    """Per tau: the error, the mean number of blocks an example ran (over all stages) and the wall time of the
    halting forwards; full_*: the network as trained (T blocks a stage), timed in the same run."""

    taus: list
    errors: list
    mean_blocks: list
    full_error: float
    full_blocks: int
    extra_iterations: int
    n: int
    seconds: list
    full_seconds: float

    @property
    def compute_saved(self) -> float:
        """1 - blocks / full blocks at the cheapest tau whose error is within ERROR_MARGIN of the full network's
        (0 when none is)."""
        fits = [b for e, b in zip(self.errors, self.mean_blocks) if e <= self.full_error + ERROR_MARGIN]
        return max(0.0, 1.0 - min(fits) / self.full_blocks) if fits else 0.0

    def to_dict(self) -> dict:
        return json_safe(dict(asdict(self), compute_saved=self.compute_saved, error_margin=ERROR_MARGIN))


def adaptive_forward(model, x: torch.Tensor, tau: float, extra_iterations: int = 0) -> tuple:
    """(logits, blocks [n]): the forward with per-example halting (module docstring); blocks counts the blocks
    each example ran over all stages."""
    z = model.stem(x)
    blocks = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        T = len(stage.blocks)
        out = None  # the stage's output, filled as examples halt
        running = torch.arange(x.shape[0], device=x.device)  # the examples still in the stage
        current, inputs = z, z
        for t in range(1, T + extra_iterations + 1):
            new = block_update(stage, stage.blocks[min(t, T) - 1], current, inputs)
            blocks[running] += 1
            if t == T + extra_iterations:
                halt = torch.ones(running.shape[0], dtype=torch.bool, device=x.device)
            else:
                halt = per_example_norm(new - current) < tau * per_example_norm(current)
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
        z = out
    return model.head(z), blocks


def _device_of(out) -> torch.device:
    return (out[0] if isinstance(out, tuple) else out).device


def _check_taus(taus) -> list:
    taus = [taus] if isinstance(taus, (int, float)) else list(taus)
    if not taus:
        raise ValueError("adaptive_depth_report: taus must not be empty")
    for tau in taus:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
            raise ValueError(f"adaptive_depth_report: every tau must be a finite number >= 0, got {tau!r}")
    return [float(t) for t in taus]


def adaptive_depth_report(
    model,
    data: Union[tuple, Iterable],
    *,
    taus: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3),
    extra_iterations: int = 0,
    error_fn: Optional[Callable] = None,
    batch_size: int = 512,
) -> AdaptiveDepthReport:
    """The error and mean blocks run at each tau, against the full network (module docstring)."""
    check_residual_model(model, "adaptive_depth_report")
    taus = _check_taus(taus)
    if isinstance(extra_iterations, bool) or not isinstance(extra_iterations, int) or extra_iterations < 0:
        raise ValueError(f"adaptive_depth_report: extra_iterations must be an int >= 0, got {extra_iterations!r}")
    check_batch_size(batch_size, "adaptive_depth_report")
    wrong_fn = error_fn or top1_wrong
    tally = Tally()

    def timed(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if _device_of(out).type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    warm = []

    def per_batch(x, y):
        if not warm:  # the first calls build kernels and caches: not part of either time
            model(x)
            adaptive_forward(model, x, taus[0], extra_iterations)
            warm.append(True)
        logits, seconds = timed(model, x)
        check_finite_outputs(logits)
        tally.add("full", wrong_fn(logits, y).sum())
        tally.add("full seconds", seconds)
        for i, tau in enumerate(taus):
            (logits, blocks), seconds = timed(adaptive_forward, model, x, tau, extra_iterations)
            tally.add(("wrong", i), wrong_fn(logits, y).sum())
            tally.add(("blocks", i), blocks.sum())
            tally.add(("seconds", i), seconds)

    n, _ = evaluate_batches(model, data, batch_size, "adaptive_depth_report", per_batch)
    return AdaptiveDepthReport(
        taus=taus,
        errors=[tally[("wrong", i)] / n for i in range(len(taus))],
        mean_blocks=[tally[("blocks", i)] / n for i in range(len(taus))],
        full_error=tally["full"] / n,
        full_blocks=sum(len(stage.blocks) for stage in model.stages),
        extra_iterations=extra_iterations,
        n=n,
        seconds=[tally[("seconds", i)] for i in range(len(taus))],
        full_seconds=tally["full seconds"],
    )
