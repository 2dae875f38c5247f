"""Measuring a training run: its model, test set and scoring read back from its checkpoint, and its indices.

report = indices_of_run("runs/x")   # or "runs/x/checkpoint.pt"
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from ..data import datasets, digitclutter
from ..io.checkpoint import CheckpointError, load_checkpoint_state
from ..measures.indices import IndexReport, compute_indices
from ..models import model_from_state
from .config import TrainConfig
from .named_runs import scoring, task_batches, task_for
from .training import resolve_device

__all__ = ["run_config", "run_evaluation", "RunEvaluation", "indices_of_run", "named_evaluation"]


def run_config(run: str) -> TrainConfig:
    """The training configuration of a run (a run directory or its checkpoint.pt), read safely."""
    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    state = load_checkpoint_state(path, map_location="cpu", required=("model", "model_config", "config"))
    return _config_of(state, path)


def _config_of(state: dict, path: str) -> TrainConfig:
    try:
        return TrainConfig(**state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its training configuration is not readable ({exc})") from None


class RunEvaluation(NamedTuple):
    """What measuring a training run needs (see run_evaluation)."""

    model: torch.nn.Module
    data: list  # the test batches, on the model's device
    chance_error: float
    error_fn: Optional[Callable]  # (logits, targets) -> per-example wrong; None: top-1
    loss_fn: Optional[Callable]  # per-example loss an attack ascends; None: cross-entropy
    confidence_fn: Optional[Callable]  # logits -> per-example confidence of the read-out; None: softmax
    decision_fn: Optional[Callable]  # logits -> per-example decision; None: argmax
    config: TrainConfig


def run_evaluation(
    run: str, *, batch_size: int = 512, test_size: Optional[int] = None, device: str = "auto"
) -> RunEvaluation:
    """The model, test batches and scoring of a training run, the test set and scoring being the run's own (exact
    digit sets, summed BCE and the predicted set's probability for Digitclutter). The checkpoint is read once and
    safely (weights_only); a bad one raises CheckpointError naming it."""
    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    dev = resolve_device(device)
    state = load_checkpoint_state(path, map_location=dev, required=("model", "model_config", "config"))
    config = _config_of(state, path)
    model = model_from_state(state, path).to(dev)
    if config.data is not None:  # a named model's run: its own data, read as the model sees it
        return named_evaluation(model, task_for(config, model, hold_out=True), config, batch_size, test_size, dev)
    task = datasets.load(
        config.dataset,
        data_dir=config.data_dir,
        n_digits=config.n_digits,
        train_size=config.train_size,
        test_size=config.test_size,
        seed=config.seed,
        cache_dir=config.cache_dir or datasets.default_cache_dir(),
    )
    if test_size is not None:
        task.test = datasets.Split(task.test.images[:test_size], task.test.targets[:test_size])
    data = list(datasets.batches(task, task.test, batch_size, train=False, device=dev))
    if not task.multilabel:
        return RunEvaluation(model, data, task.chance_error, None, None, None, None, config)
    n = task.n_digits
    return RunEvaluation(
        model,
        data,
        task.chance_error,
        error_fn=lambda logits, y: ~digitclutter.exact_set_correct(logits, y),
        loss_fn=lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(
            1
        ),
        confidence_fn=lambda logits: digitclutter.set_confidence(logits, n),
        decision_fn=lambda logits: digitclutter.top_set(logits, n),
        config=config,
    )


def named_evaluation(model, task, config, batch_size: int, test_size: Optional[int], device) -> RunEvaluation:
    """A RunEvaluation of a named model on a user's data (named_runs.scoring: top-1, or next-token error)."""
    if test_size is not None:
        task.test = datasets.Split(task.test.images[:test_size], task.test.targets[:test_size])
    score = scoring(task)
    data = task_batches(task, batch_size, device)
    return RunEvaluation(model, data, score.chance_error, score.error_fn, score.loss_fn, None, None, config)


def indices_of_run(
    run: str,
    *,
    extra_iterations: int = 16,
    method: str = "cached",
    batch_size: int = 512,
    test_size: Optional[int] = None,
    device: str = "auto",
) -> IndexReport:
    """The indices of a training run (a run directory or its checkpoint.pt) on the run's own test set
    (see run_evaluation)."""
    run = run_evaluation(run, batch_size=batch_size, test_size=test_size, device=device)
    return compute_indices(
        run.model,
        run.data,
        extra_iterations=extra_iterations,
        method=method,
        chance_error=run.chance_error,
        batch_size=batch_size,
        error_fn=run.error_fn,
    )
