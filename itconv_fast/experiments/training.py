"""Training with soft gradient coupling and spectral normalization (the paper's protocol, SPEC 1-3).

    result = train(TrainConfig(lam=0.5, sn_mu=0.95), out_dir="runs/x")

SGD with momentum 0.9 and weight decay, linear warm-up then cosine decay (per step; lr scaled linearly with
batch size from a base of 128), coupling after backward (after DDP's all-reduce), one spectral power step
per training forward, evaluation after every epoch; bf16 autocast on CUDA, channels-last kernels where they are
faster (all of them on CUDA, stages of 16+ channels on the CPU). Outputs in
out_dir: config.yaml (the resolved configuration), metrics.json, metrics.csv, TensorBoard event files in
tensorboard/, and checkpoint.pt (loaded with weights_only=True), all written atomically every epoch;
resume=True continues a killed run from its last finished epoch.
"""

from __future__ import annotations

from typing import Optional

from ..data import datasets
from ..io.checkpoint import atomic_save, atomic_write_json  # noqa: F401 (re-exported)
from .config import PRESETS, TrainConfig, build_config, config_from  # noqa: F401 (re-exported)
from .resume import RunDivergedError, previous_divergence  # noqa: F401 (re-exported)
from .schedule import lr_factor  # noqa: F401 (re-exported)
from .training_run import (  # noqa: F401 (re-exported)
    CPU_CHANNELS_LAST_MIN_WIDTH,
    TrainingRun,
    build_model,
    evaluate,
    objective_values,
    resolve_device,
)

__all__ = [
    "TrainConfig",
    "PRESETS",
    "config_from",
    "build_config",
    "train",
    "train_epochs",
    "evaluate",
    "build_model",
    "atomic_save",
    "atomic_write_json",
]


def train(
    config: TrainConfig,
    out_dir: str,
    *,
    resume: bool = False,
    progress: bool = True,
    task: Optional[datasets.Task] = None,
    stop_after_epochs: Optional[int] = None,
    return_model: bool = False,
    on_epoch=None,
    restart_diverged: bool = False,
    model=None,
):
    """Trains (or resumes) a run; returns the metrics dict also written to out_dir/metrics.json.
    (train_epochs, the same run as a generator of its epochs' records.)

    A non-finite or exploding loss or a non-finite gradient norm raises TrainingDiverged
    (experiments/divergence.py) before the optimizer steps, and a non-finite parameter, buffer or test loss at an
    epoch's end before its checkpoint: metrics.json then says `status: diverged` (with the rule, epoch, step, lr)
    and checkpoint.pt stays the last good epoch's. resume=True on such a run raises RunDivergedError unless
    restart_diverged=True, which continues from the last good epoch and lets lr and weight_decay differ from the
    saved run.

    stop_after_epochs: end after this many epochs of this call (for tests of interruption and resume).
    return_model: return (metrics, model) instead of metrics.
    on_epoch: called on rank 0 with each finished epoch's record, after its checkpoint is written.
    model: the run's model already built for the configuration (with `task`: a named model and its data), or None.
    A named model's run (config.model) also writes its indices before training (indices_before.json) and after
    (indices.json), on its test split.
    Under torchrun (WORLD_SIZE > 1) every rank trains on its shard of each global batch with
    DistributedDataParallel (gloo on CPU, nccl on CUDA); only rank 0 writes.
    """
    epochs = train_epochs(
        config,
        out_dir,
        resume=resume,
        progress=progress,
        task=task,
        stop_after_epochs=stop_after_epochs,
        return_model=return_model,
        on_epoch=on_epoch,
        restart_diverged=restart_diverged,
        model=model,
    )
    while True:
        try:
            next(epochs)
        except StopIteration as finished:
            return finished.value


def train_epochs(
    config: TrainConfig,
    out_dir: str,
    *,
    resume: bool = False,
    progress: bool = True,
    task: Optional[datasets.Task] = None,
    stop_after_epochs: Optional[int] = None,
    return_model: bool = False,
    on_epoch=None,
    restart_diverged: bool = False,
    model=None,
):
    """`train` as a generator: yields each finished epoch's record (after its checkpoint is written) and returns
    what train returns. Lets a caller interleave the epochs of several runs (itconv-fast bench train)."""
    run = TrainingRun.start(config, out_dir, resume=resume, task=task, restart_diverged=restart_diverged, model=model)
    from tqdm.auto import tqdm

    show = progress and run.rank == 0
    epochs_bar = tqdm(
        range(run.start_epoch, config.epochs),
        desc="epochs",
        disable=not show,
        initial=run.start_epoch,
        total=config.epochs,
    )
    ran = 0
    for epoch in epochs_bar:
        record = run.train_one_epoch(epoch, show)
        run.write_epoch(epoch, record, on_epoch)
        epochs_bar.set_postfix(test_error=f"{record['test_error']:.3f}")
        yield record
        ran += 1
        if stop_after_epochs is not None and ran >= stop_after_epochs:
            break
    run.finish()
    return (run.metrics, run.model) if return_model else run.metrics
