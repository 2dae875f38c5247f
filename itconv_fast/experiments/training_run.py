"""One training run between its epochs (TrainingRun: set-up, one epoch, the write of an epoch's results) and
what it is built from: the device, the model, the test evaluation and the objectives' logged values.
`experiments/training.py`'s `train` and `train_epochs` drive it."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data import datasets
from ..io.checkpoint import atomic_write_json, rng_state, save_checkpoint
from ..models import IterResNet
from .compilation import compile_mode, decide_compile, use_compile_cache
from .config import TrainConfig, write_config_file
from .divergence import TrainingDiverged, check_finite_state
from .host_memory import keep_freed_memory
from .resume import resume_run
from .run_log import TENSORBOARD_TAGS, environment, event_writer, write_metrics_csv
from .run_parts import (  # noqa: F401 (build_model, objective_values and the width re-exported)
    CPU_CHANNELS_LAST_MIN_WIDTH,
    EpochTally,
    build_model,
    make_train_step,
    objective_values,
    training_parts,
)
from .step import TrainStep, autocast

__all__ = [
    "TrainingRun",
    "build_model",
    "evaluate",
    "resolve_device",
    "objective_values",
    "freeze_batchnorm",
    "CPU_CHANNELS_LAST_MIN_WIDTH",
]


INDICES_BEFORE, INDICES_AFTER = "indices_before.json", "indices.json"  # a named model's, around its fine-tuning


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return device


@torch.no_grad()
def evaluate(model, task: datasets.Task, split: datasets.Split, device, batch_size: int = 500) -> tuple[float, float]:
    """(mean loss, error) of the model on a split, in eval mode."""
    was = model.training
    model.eval()
    loss_sum, wrong, n, scored = 0.0, 0, 0, 0
    for x, y in datasets.batches(task, split, batch_size, train=False, device=device):
        with autocast(device):
            logits = model(x)
        logits = logits.float()
        loss_sum += task.loss(logits, y).item() * x.shape[0]
        correct = task.correct(logits, y)  # per example, or per token of a sequence task
        wrong += (~correct).sum().item()
        scored += correct.numel()
        n += x.shape[0]
    model.train(was)
    return loss_sum / max(n, 1), wrong / max(scored, 1)


def _load_task(config: TrainConfig, rank: int, model=None) -> datasets.Task:
    """The run's data set (downloaded by rank 0 alone when asked); a named model's data as that model sees it."""
    if config.data is not None:
        from .named_runs import task_for

        return task_for(config, model, hold_out=True)
    return datasets.load(
        config.dataset, data_dir=config.data_dir, download=config.download and rank == 0, n_digits=config.n_digits,
        train_size=config.train_size, test_size=config.test_size, seed=config.seed,
        cache_dir=config.cache_dir or datasets.default_cache_dir(),
    )  # fmt: skip


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Puts every BatchNorm layer in eval mode: it normalises with its running statistics and does not update them
    (its affine parameters still train). Training then computes what evaluation does, extra iterations of an
    objective included."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _init_distributed(device: torch.device) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, distributed); under torchrun (WORLD_SIZE > 1) joins the process group (gloo on
    the CPU, nccl on CUDA, one GPU per local rank)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return device, rank, world, distributed


@dataclasses.dataclass
class TrainingRun:
    """One run's state between its epochs: what `train_epochs` sets up once (TrainingRun.start), then drives an
    epoch at a time (train_one_epoch) and writes after each (write_epoch)."""

    config: TrainConfig
    out_dir: str
    device: torch.device
    rank: int
    world: int
    task: datasets.Task
    model: IterResNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    metrics: dict
    step: TrainStep
    start_epoch: int
    writer: object = None

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        out_dir: str,
        *,
        resume: bool,
        task: Optional[datasets.Task],
        restart_diverged: bool,
        model: Optional[torch.nn.Module] = None,
    ) -> "TrainingRun":
        """Process group, seeds, data, model, optimizer and schedule, the resumed state, compilation and the step.
        model, task: both already built for the configuration (build_model; the named model's data), or None."""
        device, rank, world, distributed = _init_distributed(resolve_device(config.device))
        parts = world * config.accumulate
        if config.accumulate < 1 or config.batch_size % parts:
            raise ValueError(
                f"batch size {config.batch_size} is not divisible by {world} processes x "
                f"{config.accumulate} accumulation steps"
            )
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        if task is None and config.data is not None:  # a named model's data is read with the model's preprocessing
            from .named_runs import data_classes, named_model_of

            model = model if model is not None else named_model_of(config, data_classes(config))
        task = task if task is not None else _load_task(config, rank, model)
        model, coupler, optimizer, scheduler, lr, total_steps, warmup = training_parts(
            config, task, device, model=model
        )
        generator = torch.Generator().manual_seed(config.seed)

        os.makedirs(out_dir, exist_ok=True)
        metrics = {"config": dataclasses.asdict(config), "environment": environment(device), "epochs": [],
                   "status": "running"}  # fmt: skip
        if device.type == "cpu":  # a CPU step maps and zeroes fresh pages for its activations unless they are kept
            metrics["environment"]["malloc"] = keep_freed_memory()
        start_epoch = 0
        if resume:
            start_epoch = resume_run(
                out_dir, config, device, model, optimizer, scheduler, generator, metrics,
                restart_diverged=restart_diverged, lr=lr, total_steps=total_steps, warmup=warmup,
            )  # fmt: skip
        writer = None
        if rank == 0:
            write_config_file(os.path.join(out_dir, "config.yaml"), config)
            writer = event_writer(out_dir, start_epoch)
        if config.model is not None and rank == 0 and start_epoch == 0:  # a fine-tuned model's indices, before
            from .named_runs import write_indices

            metrics["indices"] = {"before": write_indices(model, task, device, os.path.join(out_dir, INDICES_BEFORE))}
        net = _wrap_network(model, config, device, distributed, total_steps - scheduler.last_epoch, metrics)
        step = make_train_step(net, model, task, optimizer, scheduler, coupler, config, device,
                               distributed=distributed)  # fmt: skip
        return cls(config, out_dir, device, rank, world, task, model, optimizer, scheduler, generator, metrics, step,
                   start_epoch, writer)  # fmt: skip

    def train_one_epoch(self, epoch: int, show: bool) -> dict:
        """Trains one epoch and evaluates on the test set; returns the epoch's record. Raises TrainingDiverged
        (after writing metrics.json, keeping the checkpoint as it was) when a step or the epoch's end state breaks
        a divergence rule."""
        from tqdm.auto import tqdm

        config, task, step = self.config, self.task, self.step
        started = time.perf_counter()
        self.model.train()
        if config.freeze_bn:  # fine-tuning's frozen BatchNorm: the running statistics, in every forward
            freeze_batchnorm(self.model)
        order = torch.randperm(len(task.train), generator=self.generator)
        # Each global batch is cut into world x accumulate equal micro-batches; micro-batch m of rank r is
        # part r * accumulate + m. So N processes and N accumulation steps see the same examples per step.
        micro = config.batch_size // (self.world * config.accumulate)
        n_steps = len(order) // config.batch_size
        mine = order[: n_steps * config.batch_size].view(n_steps, self.world, config.accumulate, micro)[:, self.rank]
        tally = EpochTally()
        batch_bar = tqdm(
            datasets.batches(
                task,
                task.train,
                micro,
                train=True,
                generator=self.generator,
                device=self.device,
                indices=mine.reshape(-1),
            ),
            total=n_steps * config.accumulate,
            desc=f"epoch {epoch + 1}",
            leave=False,
            disable=not show,
        )
        for i, (x, y) in enumerate(batch_bar):
            try:
                loss, logits = step(x, y, i % config.accumulate)
            except TrainingDiverged as exc:
                self._stop_diverged(exc, epoch, step_in_epoch=i // config.accumulate + 1)
            tally.add(task, loss, logits, y, step)
            if show and i % 20 == 0:
                batch_bar.set_postfix(loss=f"{loss.item():.3f}")
        loss_sum, wrong, seen, term_sums, scored = tally.totals()  # (this read waits for the epoch's last step)
        train_seconds = time.perf_counter() - started  # the training pass alone
        self._check_state(epoch)
        test_loss, test_error = evaluate(self.model, task, task.test, self.device)
        if not math.isfinite(test_loss):
            self._stop_diverged(TrainingDiverged("test loss", test_loss, rule="non-finite model state"), epoch)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_error": wrong / max(scored, 1),
            "test_loss": test_loss,
            "test_error": test_error,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,
        }
        record.update({key: total / max(seen, 1) for key, total in term_sums.items()})
        return record

    def _check_state(self, epoch: int) -> None:
        try:
            check_finite_state(self.model)
        except TrainingDiverged as exc:
            self._stop_diverged(exc, epoch)

    def _stop_diverged(self, exc: TrainingDiverged, epoch: int, step_in_epoch: Optional[int] = None):
        """Records the divergence in metrics.json (the checkpoint stays the last good epoch's) and raises it with
        where it happened."""
        record = dict(
            epoch=epoch + 1,
            step=self.scheduler.last_epoch + (1 if exc.step_refused else 0),
            lr=self.optimizer.param_groups[0]["lr"],
            what=exc.what,
            value=str(exc.value),
            rule=exc.rule,
        )
        if step_in_epoch is not None:
            record["step_in_epoch"] = step_in_epoch
        if exc.limit is not None:
            record["limit"] = exc.limit
        exc.record.update(record)
        self.metrics.update(status="diverged", divergence=exc.record, chance_error=self.task.chance_error)
        if self.rank == 0:
            self.writer.close()
            atomic_write_json(os.path.join(self.out_dir, "metrics.json"), self.metrics)
        raise TrainingDiverged(exc.what, exc.value, exc.record, rule=exc.rule, limit=exc.limit) from None

    def write_epoch(self, epoch: int, record: dict, on_epoch=None) -> None:
        """Appends the record and, on rank 0, writes the checkpoint, metrics.json, metrics.csv and the
        TensorBoard scalars (each file atomically), then calls on_epoch."""
        self.metrics["epochs"].append(record)
        if self.rank != 0:
            return
        config = self.config
        save_checkpoint(
            {
                "model": self.model.state_dict(),
                "model_config": self.model.config,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.generator),
                "epoch": epoch,
                "epochs": self.metrics["epochs"],
                "config": dataclasses.asdict(config),
                "resumed_at_epochs": self.metrics.get("resumed_at_epochs", []),
                "restarts": self.metrics.get("restarts", []),
            },
            os.path.join(self.out_dir, "checkpoint.pt"),
        )
        atomic_write_json(os.path.join(self.out_dir, "metrics.json"), self.metrics)
        write_metrics_csv(
            os.path.join(self.out_dir, "metrics.csv"), self.metrics["epochs"], objectives=list(config.objectives)
        )
        for key, tag in TENSORBOARD_TAGS.items():
            self.writer.add_scalar(tag, record[key], epoch + 1)
        for key in record:
            if key.split("/")[0] in config.objectives:  # an objective's value and its parts
                self.writer.add_scalar(f"objective/{key}", record[key], epoch + 1)
        self.writer.flush()
        if on_epoch is not None:
            on_epoch(record)

    def finish(self) -> None:
        self.metrics["chance_error"] = self.task.chance_error
        self.metrics["status"] = "ok" if len(self.metrics["epochs"]) == self.config.epochs else "stopped"
        if self.config.model is not None and self.rank == 0 and self.metrics["status"] == "ok":  # and after
            from .named_runs import indices_summary, write_indices

            indices = self.metrics.setdefault("indices", {})
            before = os.path.join(self.out_dir, INDICES_BEFORE)
            if "before" not in indices and os.path.isfile(before):  # a resumed run: measured by its first start
                indices["before"] = indices_summary(before)
            indices["after"] = write_indices(
                self.model, self.task, self.device, os.path.join(self.out_dir, INDICES_AFTER)
            )
        if self.rank == 0:
            self.writer.close()
            atomic_write_json(os.path.join(self.out_dir, "metrics.json"), self.metrics)


def _wrap_network(model, config: TrainConfig, device, distributed: bool, steps_left: int, metrics: dict):
    """The module the steps run: the model, under DDP and torch.compile where they apply (metrics["compile"] says
    whether compilation is on and why)."""
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    compiled, why = decide_compile(
        config.compile, device, steps_left, objectives=bool(config.objectives), distributed=distributed
    )
    metrics["compile"] = {"setting": config.compile, "on": compiled, "reason": why}
    if compiled:
        metrics["compile"].update(cache_dir=use_compile_cache(), mode=compile_mode(device))
        if config.compile == "auto":  # a default run never fails for compiling: TorchDynamo falls back to eager code
            importlib.import_module("torch._dynamo").config.suppress_errors = True
        net = torch.compile(net, mode=compile_mode(device))
    return net
