"""Measuring a training run: its model, test set and scoring read back from its checkpoint, and its indices.

report = indices_of_run("runs/x")   # or "runs/x/checkpoint.pt"
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..data import datasets, digitclutter
from ..io.checkpoint import CheckpointError, load_checkpoint_state
from ..measures.indices import IndexReport, compute_indices
from ..models import load_checkpoint
from .config import TrainConfig
from .training import resolve_device

__all__ = ["run_config", "run_evaluation", "indices_of_run"]


def run_config(run: str) -> TrainConfig:
    """The training configuration of a run (a run directory or its checkpoint.pt), read safely."""
    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    state = load_checkpoint_state(path, map_location="cpu", required=("model", "model_config", "config"))
    try:
        return TrainConfig(**state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its training configuration is not readable ({exc})") from None


def run_evaluation(run: str, *, batch_size: int = 512, test_size: Optional[int] = None, device: str = "auto"):
    """What measuring a training run needs: (model, test batches, chance error, error_fn, loss_fn), the test
    set and scoring being the run's own (exact digit sets and summed BCE for Digitclutter). The checkpoint is
    read safely (weights_only); a bad one raises CheckpointError naming it."""
    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    dev = resolve_device(device)
    config = run_config(path)
    model = load_checkpoint(path, map_location=dev)
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
    if task.multilabel:
        error_fn = lambda logits, y: ~digitclutter.exact_set_correct(logits, y)  # noqa: E731
        loss_fn = lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
            logits, y, reduction="none"
        ).sum(1)
    else:
        error_fn, loss_fn = None, None
    return model, data, task.chance_error, error_fn, loss_fn


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
    model, data, chance, error_fn, _ = run_evaluation(run, batch_size=batch_size, test_size=test_size, device=device)
    return compute_indices(
        model,
        data,
        extra_iterations=extra_iterations,
        method=method,
        chance_error=chance,
        batch_size=batch_size,
        error_fn=error_fn,
    )
