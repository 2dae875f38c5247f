"""What a training run writes beside its checkpoint: the environment record, metrics.csv and TensorBoard events."""

from __future__ import annotations

import os
import platform
from typing import Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..io.checkpoint import atomic_write_text

__all__ = ["EPOCH_FIELDS", "TENSORBOARD_TAGS", "environment", "write_metrics_csv", "event_writer"]


def environment(device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "extension_backend": "compiled" if ops.extension_loaded() else "reference",
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }
    return env


EPOCH_FIELDS = ("epoch", "train_loss", "train_error", "test_loss", "test_error", "lr", "seconds", "train_seconds")
TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_error": "error/train",
    "test_error": "error/test",
    "lr": "lr",
    "seconds": "seconds_per_epoch",
}


def write_metrics_csv(path: str, epochs: list, objectives: Sequence[str] = ()) -> None:
    """metrics.csv: one row per epoch, the columns of EPOCH_FIELDS and one per objective, named after it (the
    term's mean over the epoch's examples), for spreadsheets and pandas."""
    import csv
    import io

    text = io.StringIO()
    out = csv.DictWriter(
        text, fieldnames=list(EPOCH_FIELDS) + list(objectives), extrasaction="ignore", lineterminator="\n"
    )
    out.writeheader()
    out.writerows(epochs)
    atomic_write_text(path, text.getvalue())


def event_writer(out_dir: str, start_epoch: int):
    """TensorBoard event files in out_dir/tensorboard (scalars per epoch). On resume, events past the last
    finished epoch (from the killed session) are purged, so curves never hold an epoch twice."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)
