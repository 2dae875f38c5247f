"""What a training run is built from, and the bookkeeping of its training pass: the model of a configuration, the
coupler, optimizer and schedule (`training_parts`, with the choices made for CUDA), the step (`make_train_step`)
and the epoch's tally (`EpochTally`). TrainingRun (training_run.py) puts them together; bench/launches.py builds
the same step on the CPU to count a CUDA step's launches.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..data import datasets
from ..models import IterResNet
from ..nn.coupling import GradientCoupler
from ..objectives import make_objective
from .config import TrainConfig
from .divergence import exploding_loss_limit
from .schedule import lr_factor
from .step import TrainStep

__all__ = [
    "build_model",
    "objective_values",
    "training_parts",
    "TrainingParts",
    "make_train_step",
    "EpochTally",
    "CPU_CHANNELS_LAST_MIN_WIDTH",
]

CPU_CHANNELS_LAST_MIN_WIDTH = 16  # measured: benchmarks/NOTES.md "Memory format on the CPU"


def build_model(config: TrainConfig, task: datasets.Task) -> torch.nn.Module:
    """The run's network: the paper's IterResNet, or the model named by config.model (named_runs.py)."""
    if config.model is not None:
        from .named_runs import named_model_of

        return named_model_of(config, None if task.sequence else task.num_classes)
    side = task.train.images.shape[-1]
    return IterResNet(
        num_classes=task.num_classes,
        in_channels=task.in_channels,
        width=config.width,
        blocks=config.blocks,
        stages=config.stages,
        input_size=side,
        pcr=config.pcr,
        sn_mu=config.sn_mu,
        sn_mode=config.sn_mode,
        init=config.resolved_init(),
        bn_gamma_init=config.bn_gamma_init,
    )


def objective_values(step: TrainStep) -> dict:
    """The last micro-batch's objective terms and their numeric parts, as {name: v, "name/part": v}."""
    values = dict(step.last_terms)
    for name, parts in step.last_parts.items():
        values.update({f"{name}/{part}": float(v) for part, v in parts.items() if isinstance(v, (int, float))})
    return values


class TrainingParts(NamedTuple):
    model: torch.nn.Module  # IterResNet, or a NamedModel
    coupler: GradientCoupler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr: float  # at the schedule's peak (scaled with the batch size)
    total_steps: int
    warmup: int  # steps


def training_parts(
    config: TrainConfig,
    task: datasets.Task,
    device: torch.device,
    *,
    cuda_path: Optional[bool] = None,
    model: Optional[torch.nn.Module] = None,
) -> TrainingParts:
    """The model, coupler, optimizer and schedule of a run, as `train` makes them on `device`, before any
    resumed state. cuda_path: the choices made for CUDA (default: when device is CUDA): the whole network
    channels-last, BatchNorm and ReLU as cuDNN's and ATen's ops, and SGD's fused kernel (one launch a step for all
    parameters, where the default foreach path takes four; the same update). bench/launches.py sets it on
    the CPU to count a CUDA step's ops there. model: the run's model already built (build_model), e.g. by the
    command that checked it before writing anything."""
    cuda_path = device.type == "cuda" if cuda_path is None else cuda_path
    model = (model if model is not None else build_model(config, task)).to(device)
    if isinstance(model, IterResNet):
        # NHWC where it is faster: everywhere on CUDA, stages of 16+ channels on the CPU (to_channels_last).
        model.to_channels_last(min_width=1 if cuda_path else CPU_CHANNELS_LAST_MIN_WIDTH)
        if cuda_path and device.type != "cuda":
            model.fuse_bn_relu(False)  # what CUDA runs (iter_resnet._bn_relu fuses on the CPU only)
    coupler = GradientCoupler(
        model, config.lam, kernel=config.coupling_kernel, bandwidth=config.coupling_bandwidth,
        skip_first=config.skip_first,
    )  # fmt: skip
    lr = config.lr * config.batch_size / 128
    kernels = {"fused": True} if cuda_path else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=config.weight_decay, **kernels)
    steps_per_epoch = max(1, len(task.train) // config.batch_size)  # the last partial batch is dropped
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    return TrainingParts(model, coupler, optimizer, scheduler, lr, total_steps, warmup)


def make_train_step(
    net, model, task, optimizer, scheduler, coupler, config: TrainConfig, device: torch.device, *,
    distributed: bool = False, channels_last: Optional[bool] = None,
) -> TrainStep:  # fmt: skip
    """The run's TrainStep, with its objectives and the exploding-loss limit of its task."""
    objectives = [make_objective(name, weight, k=config.objective_k, rho=config.objective_rho)
                  for name, weight in config.objectives.items()]  # fmt: skip
    return TrainStep(
        net, task, optimizer, scheduler, coupler, device=device, accumulate=config.accumulate,
        distributed=distributed, objectives=objectives, model=model, seed=config.seed,
        loss_limit=exploding_loss_limit(task.loss, task.num_classes, task.train.targets[0]),
        channels_last=channels_last if channels_last is not None or isinstance(model, IterResNet) else False,
    )  # fmt: skip


class EpochTally:
    """A training pass's bookkeeping: each step's loss and error count kept on the device and read once, at the
    end (a read a step would stall a GPU's launch queue, and a running sum there would be launches a step:
    bench/launches.py), and the objectives' logged values."""

    def __init__(self) -> None:
        self.losses: list = []
        self.wrongs: list = []
        self.sizes: list = []
        self.scored: list = []
        self.term_sums: dict = {}  # objective name (and name/part) -> sum over examples

    def add(self, task: datasets.Task, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step) -> None:
        n = y.shape[0]
        self.losses.append(loss)
        self.sizes.append(n)
        correct = task.correct(logits.float(), y)
        self.scored.append(correct.numel())  # examples, or tokens of a sequence task
        self.wrongs.append((~correct).sum())
        for key, value in objective_values(step).items():
            self.term_sums[key] = self.term_sums.get(key, 0.0) + value * n

    def totals(self) -> tuple[float, int, int, dict, int]:
        """(loss summed over examples, wrong predictions, examples, objective sums, predictions scored: the
        examples, or a sequence task's tokens). The loss sum in float64, in step order: the numbers of summing
        loss.item() x batch size."""
        if not self.losses:
            return 0.0, 0, 0, dict(self.term_sums), 0
        loss_sum = sum(v * n for v, n in zip(torch.stack(self.losses).tolist(), self.sizes))
        wrong = int(torch.stack(self.wrongs).sum())
        return loss_sum, wrong, sum(self.sizes), dict(self.term_sums), sum(self.scored)
