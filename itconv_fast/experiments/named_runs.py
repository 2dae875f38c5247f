"""A model by name on a user's data: the model (models/named.py) and the task (`imagefolder:DIR` read with the model's
own preprocessing, `text:FILE` with its tokenizer), the scoring that measures them (next-token error for text), and
the indices `train` writes before and after fine-tuning.

    model, task = named_model_and_task(config, hold_out=False)      # what `indices --model ... --data ...` measures
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..data import datasets
from ..data.image_folder import folder_classes
from ..measures.indices import IndexReport, compute_indices
from ..models.named import NamedModel, image_preprocessing, load_tokenizer, named_model
from ..models.residual import sequence_error, sequence_loss
from .config import TrainConfig

SUMMARY = ("error", "ci", "ri", "di")

__all__ = [
    "named_model_and_task",
    "write_indices",
    "indices_summary",
    "named_model_of",
    "Scoring",
    "scoring",
    "measure_indices",
    "task_batches",
]


def named_model_of(config: TrainConfig, num_classes: Optional[int]) -> NamedModel:
    """The run's model: its name, keyword arguments, spectral normalization and starting weights (the library's
    pretrained ones, the --weights file, or random ones drawn from config.seed, whoever calls: the global generator
    is left as it was)."""
    sn = None if config.sn_mu is None else {"mu": config.sn_mu, "mode": config.sn_mode}
    return named_model(
        config.model,
        num_classes=num_classes,
        kwargs=config.model_kwargs,
        sn=sn,
        pretrained=config.pretrained,
        weights=config.weights,
        seed=config.seed,
    )


def data_classes(config: TrainConfig) -> Optional[int]:
    """The number of classes of image-folder data (the model's head); None for text."""
    kind, path = datasets.parse_data_spec(config.data)
    return len(folder_classes(path)) if kind == "imagefolder" else None


def task_for(config: TrainConfig, model: NamedModel, *, hold_out: bool) -> datasets.Task:
    """The data of `config.data` as the model sees it (see datasets.image_folder_task and text_task for hold_out),
    cut to config.train_size (a seeded, class-stratified subset of images; the first windows of a text) and
    config.test_size (the first examples)."""
    task = _full_task(config, model, hold_out)
    if config.train_size is not None and config.train_size < len(task.train):
        if task.sequence:
            keep = torch.arange(config.train_size)
        else:
            keep = datasets.stratified_subset(task.train.targets, config.train_size, config.seed)
        task.train = datasets.Split(task.train.images[keep], task.train.targets[keep])
    if config.test_size is not None and config.test_size < len(task.test):
        task.test = datasets.Split(task.test.images[: config.test_size], task.test.targets[: config.test_size])
    return task


def _full_task(config: TrainConfig, model: NamedModel, hold_out: bool) -> datasets.Task:
    kind, path = datasets.parse_data_spec(config.data)
    if kind == "imagefolder":
        prep = image_preprocessing(model)
        if config.image_size is not None:
            prep = prep.with_size(config.image_size)
        return datasets.image_folder_task(path, prep, hold_out=hold_out)
    tokenizer = load_tokenizer(model)
    vocab = model.network.get_output_embeddings().out_features
    task = datasets.text_task(
        path,
        lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
        config.seq_len,
        vocab,
        hold_out=hold_out,
    )
    largest = max(int(task.train.images.max()) if len(task.train) else 0, int(task.test.images.max()))
    if largest >= vocab:
        raise ValueError(f"{path}: the tokenizer gives token id {largest}, beyond the model's vocabulary of {vocab}")
    return task


def named_model_and_task(config: TrainConfig, *, hold_out: bool) -> tuple[NamedModel, datasets.Task]:
    """The model (with its weights) and its data; the head gets as many outputs as the folder has classes."""
    model = named_model_of(config, data_classes(config))
    return model, task_for(config, model, hold_out=hold_out)


class Scoring(NamedTuple):
    chance_error: float
    error_fn: Optional[object]  # None: top-1
    loss_fn: Optional[object]  # None: cross-entropy


def scoring(task: datasets.Task) -> Scoring:
    """How the measures score the task: top-1 for images; per-token next-token error and loss for text (chance
    1 - 1/vocabulary)."""
    if task.sequence:
        return Scoring(task.chance_error, sequence_error, sequence_loss)
    return Scoring(task.chance_error, None, None)


def task_batches(task: datasets.Task, batch_size: int, device) -> list:
    """The test split's batches on `device`, as the measures take them."""
    return list(datasets.batches(task, task.test, batch_size, train=False, device=device))


def measure_indices(
    model: torch.nn.Module, task: datasets.Task, device, *, batch_size: int = 128, extra_iterations: int = 16
) -> IndexReport:
    """The indices of the model on the task's test split (compute_indices evaluates in eval mode and puts the
    model's mode back)."""
    score = scoring(task)
    return compute_indices(
        model,
        task_batches(task, batch_size, device),
        extra_iterations=extra_iterations,
        chance_error=score.chance_error,
        error_fn=score.error_fn,
        batch_size=batch_size,
    )


def write_indices(model: torch.nn.Module, task: datasets.Task, device, path: str) -> dict:
    """Measures the indices (measure_indices), writes their report to `path` (JSON, atomically) and returns the
    summary that metrics.json keeps: error, CI, RI, DI."""
    from ..io.checkpoint import atomic_write_json

    report = measure_indices(model, task, device)
    atomic_write_json(path, report.to_dict())
    return {key: getattr(report, key) for key in SUMMARY}


def indices_summary(path: str) -> dict:
    """The summary of an indices report written by write_indices."""
    import json

    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return {key: report.get(key) for key in SUMMARY}
