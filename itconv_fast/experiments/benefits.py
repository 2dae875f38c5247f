"""What converging buys a training run: the benefit measures on its own test set and on harder ones.

    result = benefits_of_run("runs/x")
    result["thinking_longer"]["digitclutter-5"]["gain"], result["adaptive_depth"]["compute_saved"],
    result["robustness"]["pgd_errors"]

Harder test sets for thinking longer: Digitclutter with more digits than the run was trained on (the n highest
outputs scored against the n digits, SPEC section 5), drawn from the run's test seed, and the run's own test set
with Gaussian noise of std `noise_sigma` added to its (normalised) inputs.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..data import datasets
from ..measures.adaptive_depth import (
    DEFAULT_AGREEMENTS,
    DEFAULT_CONFIDENCES,
    DEFAULT_TAUS,
    adaptive_depth_report,
    halting_levels,
)
from ..measures.evaluator import check_extra_iterations
from ..measures.robustness import DEFAULT_EPSILONS, DEFAULT_SIGMAS, check_pgd_steps, check_sizes, robustness_report
from ..measures.thinking_longer import extra_iteration_grid, thinking_longer_report
from .evaluation import RunEvaluation, run_evaluation

__all__ = ["benefits_of_run", "benefit_columns", "BENEFIT_MEASURES", "default_harder_digits"]

BENEFIT_MEASURES = ("thinking-longer", "adaptive-depth", "robustness")


def default_harder_digits(n_digits: int) -> tuple:
    """Digitclutter with one and two more digits than trained on (up to 10)."""
    return tuple(n for n in (n_digits + 1, n_digits + 2) if n <= 10)


def _noisy(data: list, sigma: float, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(x + sigma * torch.randn(x.shape, generator=generator).to(x.device, x.dtype), y) for x, y in data]


def _harder_sets(config, data, harder_digits: Sequence[int], noise_sigma: Optional[float], batch_size, device):
    """{name: batches}: the run's test set, Digitclutter with more digits, the noisy test set."""
    sets = {"test set": data}
    if config.dataset == "digitclutter" and config.data is None:
        n_test = sum(x.shape[0] for x, _ in data)
        for n in harder_digits:  # the run's test split (its seed and size), with n digits an image
            task = datasets.load(
                "digitclutter",
                n_digits=n,
                train_size=1,
                test_size=n_test,
                seed=config.seed,
                cache_dir=config.cache_dir or datasets.default_cache_dir(),
            )
            sets[f"digitclutter-{n}"] = list(datasets.batches(task, task.test, batch_size, train=False, device=device))
    if noise_sigma:
        sets[f"noise {noise_sigma:g}"] = _noisy(data, noise_sigma, config.seed)
    return sets


def benefits_of_run(
    run: str,
    *,
    measures: Sequence[str] = BENEFIT_MEASURES,
    extra_iterations: int = 16,
    ks="log",
    harder_digits: Optional[Sequence[int]] = None,
    noise_sigma: Optional[float] = 0.5,
    taus: Sequence[float] = DEFAULT_TAUS,
    confidences: Sequence[float] = DEFAULT_CONFIDENCES,
    agreements: Sequence[int] = DEFAULT_AGREEMENTS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    pgd_steps: int = 10,
    batch_size: int = 512,
    test_size: Optional[int] = None,
    device: str = "auto",
    evaluation: Optional[RunEvaluation] = None,
) -> dict:
    """The benefit measures of a run (a run directory or its checkpoint.pt) as a JSON-ready dict.

    ks: the k of thinking longer ("log": 0, powers of two, K; "all"; or a list).
    harder_digits: Digitclutter runs only: the digit counts of the harder test sets (default: n + 1 and n + 2).
    taus, confidences, agreements: the levels of adaptive depth's halting rules (an empty one leaves it out).
    evaluation: measure this (a named model on a user's data: evaluation.named_evaluation) instead of reading
    `run`, which then only names the result. A text model's inputs are token ids: only thinking-longer applies.
    Raises ValueError naming a bad argument before anything is computed; CheckpointError for a bad checkpoint."""
    unknown = [m for m in measures if m not in BENEFIT_MEASURES]
    if unknown or not measures:
        raise ValueError(
            f"benefits: unknown measure {unknown[0] if unknown else measures!r}; choose from {BENEFIT_MEASURES}"
        )
    if harder_digits is not None:
        bad = [n for n in harder_digits if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10]
        if bad:
            raise ValueError(f"benefits: harder digit counts must be ints in 1..10, got {bad[0]!r}")
    if noise_sigma is not None and not (isinstance(noise_sigma, (int, float)) and 0 <= noise_sigma < float("inf")):
        raise ValueError(f"benefits: noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    halting_levels(taus, confidences, agreements)
    check_sizes(sigmas, "sigma"), check_sizes(epsilons, "epsilon"), check_pgd_steps(pgd_steps)
    check_extra_iterations(extra_iterations, "benefits")
    extra_iteration_grid(ks, extra_iterations)
    path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    found = evaluation or run_evaluation(path, batch_size=batch_size, test_size=test_size, device=device)
    model, data, config, error_fn = found.model, found.data, found.config, found.error_fn
    digitclutter_run = config.dataset == "digitclutter" and config.data is None
    if harder_digits is None:
        harder_digits = default_harder_digits(config.n_digits) if digitclutter_run else ()
    tokens = not data[0][0].is_floating_point()
    if tokens and (set(measures) - {"thinking-longer"} or noise_sigma):
        raise ValueError(
            "benefits: a text model's inputs are token ids; measure thinking-longer alone, with --noise-sigma 0"
        )
    device = next(model.parameters()).device
    out = {
        "run": run if evaluation is not None else os.path.dirname(os.path.abspath(path)),
        "chance_error": found.chance_error,
        "n": sum(len(y) for _, y in data),
    }
    if "thinking-longer" in measures:
        sets = _harder_sets(config, data, harder_digits, noise_sigma, batch_size, device)
        out["thinking_longer"] = {
            name: thinking_longer_report(
                model, batches, extra_iterations=extra_iterations, ks=ks, error_fn=error_fn, batch_size=batch_size
            ).to_dict()
            for name, batches in sets.items()
        }
    if "adaptive-depth" in measures:
        out["adaptive_depth"] = adaptive_depth_report(
            model,
            data,
            taus=taus,
            confidences=confidences,
            agreements=agreements,
            error_fn=error_fn,
            confidence_fn=found.confidence_fn,
            decision_fn=found.decision_fn,
            batch_size=batch_size,
        ).to_dict()
    if "robustness" in measures:
        report = robustness_report(
            model,
            data,
            sigmas=sigmas,
            epsilons=epsilons,
            pgd_steps=pgd_steps,
            error_fn=error_fn,
            loss_fn=found.loss_fn,
            batch_size=batch_size,
            seed=config.seed,
        )
        out["robustness"] = report.to_dict()
    return out


def benefit_columns(result: dict) -> dict:
    """The result-table columns of a `benefits_of_run` result (a sweep's results.csv): per thinking-longer test
    set its error, gain, held-out gain, best k and overthinking rate; adaptive depth's compute saved; per sigma and
    epsilon the noise, PGD errors and certified shares."""
    columns = {}
    for name, r in result.get("thinking_longer", {}).items():
        key = name.replace(" ", "_")
        for field in ("error", "gain", "heldout_gain", "best_k", "error_at_K", "overthinking_rate"):
            columns[f"tl_{key}_{field}"] = r[field]
    if "adaptive_depth" in result:
        r = result["adaptive_depth"]
        columns.update(ad_compute_saved=r["compute_saved"], ad_full_error=r["full_error"])
        for rule, saved in r["compute_saved_by_rule"].items():
            columns[f"ad_compute_saved_{rule}"] = saved
    if "robustness" in result:
        r = result["robustness"]
        for sigma, e in zip(r["sigmas"], r["noise_errors"]):
            columns[f"noise_error_sigma{sigma:g}"] = e
        certified = r["certified_shares"] or [None] * len(r["epsilons"])
        for eps, e, c in zip(r["epsilons"], r["pgd_errors"], certified):
            columns[f"pgd_error_eps{eps:g}"] = e
            columns[f"certified_eps{eps:g}"] = c
    return columns
