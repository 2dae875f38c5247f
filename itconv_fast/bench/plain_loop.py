"""The baseline of `itconv-fast bench train`: the paper's ResNet trained by the loop a researcher writes in plain
PyTorch, without coupling or spectral normalization. It shares only what a fair comparison must share with
`itconv-fast train`: the network (IterResNet, ordinary initialisation, its BatchNorm + ReLU as ATen's two ops
rather than our fused kernel), the data pipeline (datasets.batches), the optimizer and schedule (SGD with
momentum 0.9, linear warm-up then cosine decay per step, lr scaled with the batch size) and bf16 autocast with
channels_last on CUDA. It logs what such a loop logs (mean loss and error per epoch) and evaluates on the test
split after every epoch, like ours; it writes no checkpoints.

`bench train` runs it in a process of its own, as a researcher's script runs (with the C library's default
allocator, not the one `itconv-fast train` sets: experiments/host_memory.py); benchmarks/plain_loop.py runs it
from the command line (`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from ..data import datasets
from ..experiments.schedule import lr_factor
from ..models import IterResNet

__all__ = [
    "plain_epochs",
    "plain_optimizer",
    "plain_step",
    "plain_run",
    "train_benchmark_values",
    "train_benchmark_task",
    "main",
]

SIZES = ("quick", "paper")


def plain_epochs(
    task: datasets.Task,
    *,
    width: int,
    blocks: int,
    stages: int = 3,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
):
    """Trains for `epochs` epochs, yielding one record per epoch: epoch, train_loss, train_error, test_error,
    seconds (training pass and evaluation) and train_seconds (the training pass alone)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    # BatchNorm + ReLU as ATen's two ops, as in a model written in plain PyTorch (not our fused kernel).
    model = (
        IterResNet(
            task.num_classes,
            task.in_channels,
            width=width,
            blocks=blocks,
            stages=stages,
            input_size=task.train.images.shape[-1],
        )
        .fuse_bn_relu(False)
        .to(device)
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(task.train) // batch_size
    total, warmup = steps_per_epoch * epochs, int(round(warmup_epochs * steps_per_epoch))
    optimizer, scheduler = plain_optimizer(model, lr, batch_size, weight_decay, total, warmup)
    generator = torch.Generator().manual_seed(seed)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(task.train), generator=generator)[: steps_per_epoch * batch_size]
        loss_sum, wrong, seen = 0.0, 0, 0
        for x, y in datasets.batches(
            task, task.train, batch_size, train=True, generator=generator, device=device, indices=order
        ):
            loss, wrong_here = plain_step(model, optimizer, scheduler, task, x, y, device.type == "cuda", amp)
            loss_sum += loss * x.shape[0]
            wrong += wrong_here
            seen += x.shape[0]
        train_seconds = time.perf_counter() - started
        model.eval()
        test_wrong, test_seen = 0, 0
        with torch.no_grad():
            for x, y in datasets.batches(task, task.test, 500, train=False, device=device):
                with torch.autocast(**amp):
                    logits = model(x)
                test_wrong += (~task.correct(logits.float(), y)).sum().item()
                test_seen += x.shape[0]
        yield {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_error": wrong / max(seen, 1),
            "test_error": test_wrong / max(test_seen, 1),
            "seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,
        }


def plain_optimizer(model, lr: float, batch_size: int, weight_decay: float, total: int, warmup: int):
    """SGD with momentum 0.9 (its default kernels: foreach on CUDA) and `train`'s schedule, a pure function of the
    step (sharing it keeps the two schedules equal)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr * batch_size / 128, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    return optimizer, scheduler


def plain_step(model, optimizer, scheduler, task, x, y, channels_last: bool, amp) -> tuple[float, int]:
    """One step as such a loop writes it, logging what it logs: (the loss, the wrong examples), read at once.
    amp: torch.autocast's arguments (None: no autocast)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(**amp) if amp else contextlib.nullcontext():
        logits = model(x)
    loss = task.loss(logits.float(), y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item(), (~task.correct(logits.float(), y)).sum().item()


def train_benchmark_values(size: str, *, paper_steps: int = 200, batch_size: int = 128, quick_train_size=None) -> dict:
    """The TrainConfig values of a size (train_size gives its steps an epoch with batch_size)."""
    from ..experiments.config import PRESETS

    if size == "quick":
        values = dict(PRESETS["quick"], dataset="digitclutter")
        if quick_train_size is not None:
            values["train_size"] = quick_train_size
        return values
    if size != "paper":
        raise ValueError(f"bench train: size must be one of {SIZES}, got {size!r}")
    return dict(
        PRESETS["paper"], dataset="cifar10", train_size=paper_steps * batch_size, test_size=1000, batch_size=batch_size
    )


def train_benchmark_task(size: str, *, paper_steps: int = 200, batch_size: int = 128, quick_train_size=None):
    """(task, TrainConfig values) of a size: Digitclutter for "quick" (cached on disk), random CIFAR-shaped images
    for "paper"."""
    values = train_benchmark_values(
        size, paper_steps=paper_steps, batch_size=batch_size, quick_train_size=quick_train_size
    )
    if size == "quick":
        task = datasets.load(
            "digitclutter",
            n_digits=3,
            train_size=values["train_size"],
            test_size=values["test_size"],
            seed=0,
            cache_dir=datasets.default_cache_dir(),
        )
        return task, values
    g = torch.Generator().manual_seed(0)

    def split(n):
        return datasets.Split(
            torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g),
        )

    task = datasets.Task(
        "cifar10-shaped random",
        split(values["train_size"]),
        split(values["test_size"]),
        num_classes=10,
        in_channels=3,
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        augment=True,
    )
    return task, values


def plain_run(size: str, *, epochs: int, device: str = "cpu", paper_steps: int = 200, quick_train_size=None):
    """plain_epochs on a size's task, with its preset's width, depth, batch, lr and warm-up."""
    task, values = train_benchmark_task(size, paper_steps=paper_steps, quick_train_size=quick_train_size)
    return plain_epochs(
        task,
        width=values["width"],
        blocks=values["blocks"],
        epochs=epochs,
        batch_size=values["batch_size"],
        lr=values["lr"],
        warmup_epochs=values.get("warmup_epochs", 1.0),
        device=device,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The plain PyTorch training loop, one JSON record per epoch.")
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--paper-steps", type=int, default=200)
    parser.add_argument("--quick-train-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for record in plain_run(
        args.size,
        epochs=args.epochs,
        device=args.device,
        paper_steps=args.paper_steps,
        quick_train_size=args.quick_train_size,
    ):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
