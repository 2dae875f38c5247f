"""The baseline of `itconv-fast bench train`: the paper's ResNet trained by the loop a researcher writes in plain
PyTorch, without coupling or spectral normalization. It shares only what a fair comparison must share with
`itconv-fast train`: the network (IterResNet, ordinary initialisation), the data pipeline (datasets.batches),
the optimizer and schedule (SGD with momentum 0.9, linear warm-up then cosine decay per step, lr scaled with
the batch size) and bf16 autocast with channels_last on CUDA. It logs what such a loop logs (mean loss and
error per epoch) and evaluates on the test split after every epoch, like ours; it writes no checkpoints.

benchmarks/plain_loop.py runs it from the command line.
"""

from __future__ import annotations

import math
import time

import torch

from ..data import datasets
from ..models import IterResNet

__all__ = ["plain_epochs"]


def plain_epochs(task: datasets.Task, *, width: int, blocks: int, stages: int = 3, epochs: int, batch_size: int = 128,
                 lr: float = 0.1, weight_decay: float = 5e-4, warmup_epochs: float = 1.0, seed: int = 0,
                 device: str = "cpu"):
    """Trains for `epochs` epochs, yielding one record per epoch: epoch, train_loss, train_error, test_error,
    seconds (training pass and evaluation) and train_seconds (the training pass alone)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = IterResNet(task.num_classes, task.in_channels, width=width, blocks=blocks, stages=stages,
                       input_size=task.train.images.shape[-1]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr * batch_size / 128, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = len(task.train) // batch_size
    total, warmup = steps_per_epoch * epochs, int(round(warmup_epochs * steps_per_epoch))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(task.train), generator=generator)[: steps_per_epoch * batch_size]
        loss_sum, wrong, seen = 0.0, 0, 0
        for x, y in datasets.batches(task, task.train, batch_size, train=True, generator=generator, device=device,
                                     indices=order):
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                logits = model(x)
            loss = task.loss(logits.float(), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * x.shape[0]
            wrong += (~task.correct(logits.float(), y)).sum().item()
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
        yield {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_error": wrong / max(seen, 1),
               "test_error": test_wrong / max(test_seen, 1), "seconds": time.perf_counter() - started,
               "train_seconds": train_seconds}
