"""The kernel launches of one training step on the CUDA path, counted on a machine without a GPU.

    report, table = run_launch_count()          # `itconv-fast bench launches`

CUDA tensors cannot run a backward without a GPU (autograd's engine needs the device), so each step runs on the
CPU with the choices the CUDA path makes (run_parts.training_parts(cuda_path=True): the whole network
channels-last, cuDNN's BatchNorm and ATen's ReLU rather than our fused CPU kernel, SGD's fused kernel; the
input converted to channels-last) under a LaunchCounter (launch_counter.py). The cases: the plain loop a
researcher writes (plain_loop.plain_step, SGD's default foreach kernels on CUDA) and `train`'s step
(TrainStep, with the loop's own bookkeeping) at lam 0, lam 0.5, spectral normalization (operator and matrix),
both, and each objective. Not counted, and the same in both loops: autocast's bf16 casts (CUDA runs the
convolutions in bf16: a cast of each kernel forward and of its gradient back). A foreach op off its fast route
(mixed dtypes or devices) launches one kernel a tensor and is counted so; one on it may still split a long list
over several launches (multi_tensor_apply's limits), and one of our ops launches what its CUDA kernel does. The
profiler on the device is the check (`profile_launch_counts`, run by `make gpu-check`).

LAUNCH_GOALS are the budgets a step should meet; LAUNCH_CEILINGS today's counts, which tests/test_launches.py
holds every change to.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..data import datasets
from .launch_counter import LaunchCounter
from .runner import machine_description

__all__ = [
    "LaunchCount",
    "launch_cases",
    "count_step",
    "run_launch_count",
    "LAUNCH_GOALS",
    "LAUNCH_CEILINGS",
    "PLAIN_LOOP",
    "TRAIN_CASES",
    "profiled_launches",
    "profile_launch_counts",
]

PLAIN_LOOP = "plain loop"
TRAIN_CASES = {
    "train lam 0": {},
    "train lam 0.5": {"lam": 0.5},
    "train mu 0.95 (operator)": {"sn_mu": 0.95},
    "train mu 0.95 (matrix)": {"sn_mu": 0.95, "sn_mode": "matrix"},
    "train lam 0.5 + mu 0.95": {"lam": 0.5, "sn_mu": 0.95},
    "train + extra-iterations": {"objectives": {"extra-iterations": 1.0}},
    "train + fixed-point": {"objectives": {"fixed-point": 1.0}},
    "train + jacobian-frobenius": {"objectives": {"jacobian-frobenius": 1.0}},
    "train + jacobian-spectral": {"objectives": {"jacobian-spectral": 1.0}},
}
# The goals (the GPU-training issue's budgets), as (the case measured against, the launches it may add): `train` at
# lam 0 launches no more than the plain loop; coupling adds at most 2 launches a step; spectral normalization at
# most a few a stage (3 stages). Not all are met (benchmarks/NOTES.md, "Launches"); `run_launch_count` says which.
STAGE_SN_GOAL = 4
LAUNCH_GOALS = {
    "train lam 0": (PLAIN_LOOP, 0),
    "train lam 0.5": ("train lam 0", 2),
    "train mu 0.95 (operator)": ("train lam 0", 3 * STAGE_SN_GOAL),
    "train mu 0.95 (matrix)": ("train lam 0", 3 * STAGE_SN_GOAL),
    "train lam 0.5 + mu 0.95": ("train mu 0.95 (operator)", 2),
}
# Today's counts (torch 2.14, the quick preset's network): tests/test_launches.py fails a change that adds to one.
LAUNCH_CEILINGS = {
    PLAIN_LOOP: 243,
    "train lam 0": 246,
    "train lam 0.5": 247,
    "train mu 0.95 (operator)": 429,
    "train mu 0.95 (matrix)": 429,
    "train lam 0.5 + mu 0.95": 430,
    "train + extra-iterations": 554,
    "train + fixed-point": 399,
    "train + jacobian-frobenius": 876,
    "train + jacobian-spectral": 3054,
}


class LaunchCount(NamedTuple):
    launches: int
    syncs: int
    by_op: dict


def _small_task() -> datasets.Task:
    # Op counts do not depend on the batch: 8 Digitclutter images serve (generated, not cached).
    return datasets.load("digitclutter", n_digits=3, train_size=16, test_size=8, seed=0, cache_dir=None)


def _plain_step(task, x, y, device: torch.device) -> Callable[[], None]:
    from ..models import IterResNet
    from .plain_loop import plain_optimizer, plain_step

    torch.manual_seed(0)
    model = IterResNet(task.num_classes, task.in_channels, width=8, blocks=4, stages=3, input_size=32).to(device)
    model = model.fuse_bn_relu(False).to(memory_format=torch.channels_last).train()
    optimizer, scheduler = plain_optimizer(model, lr=0.2, batch_size=128, weight_decay=5e-4, total=1000, warmup=10)
    optimizer.param_groups[0]["foreach"] = True  # SGD's default for CUDA parameters
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None  # as plain_epochs
    return lambda: plain_step(model, optimizer, scheduler, task, x, y, channels_last=True, amp=amp)


def _train_step(task, x, y, overrides: dict, device: torch.device) -> Callable[[], None]:
    from ..experiments.config import config_from
    from ..experiments.run_parts import EpochTally, make_train_step, training_parts

    config = config_from("quick", device=str(device), compile=False, batch_size=x.shape[0], **overrides)
    torch.manual_seed(0)
    parts = training_parts(config, task, device, cuda_path=True)
    model = parts.model.train()
    step = make_train_step(
        model, model, task, parts.optimizer, parts.scheduler, parts.coupler, config, device, channels_last=True
    )
    tally = EpochTally()

    def run():
        loss, logits = step(x, y, 0)
        tally.add(task, loss, logits, y, step)

    return run


def launch_cases(names=None, device="cpu") -> dict:
    """{case: a function running one step of it}, built once (the first call of each warms it up). device "cpu":
    the CUDA path's choices on the CPU (what the counter counts); "cuda": the steps themselves, for the profiler."""
    device = torch.device(device)
    task = _small_task()
    x, y = next(datasets.batches(task, task.train, 8, train=False, device=device))
    names = list(names or [PLAIN_LOOP, *TRAIN_CASES])
    cases = {}
    for name in names:
        if name == PLAIN_LOOP:
            cases[name] = _plain_step(task, x, y, device)
        elif name in TRAIN_CASES:
            cases[name] = _train_step(task, x, y, TRAIN_CASES[name], device)
        else:
            raise ValueError(f"launch count: unknown case {name!r}; choose from {[PLAIN_LOOP, *TRAIN_CASES]}")
    return cases


def profiled_launches(events) -> dict:
    """What the CUDA profiler saw of one step, from its events (torch.profiler's `events()`): kernels that ran
    on the device, the host's kernel-launch calls, and its memory copies and sets (the counter counts a copy as
    an op too)."""
    kernels = sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    launch_calls = sum(1 for e in events if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    copies = sum(1 for e in events if e.name.startswith(("cudaMemcpy", "cudaMemset")))
    return {"kernels": kernels, "launch_calls": launch_calls, "memory_calls": copies}


def profile_launch_counts(names=None, warmup: int = 2) -> dict:
    """On a GPU: each case's step under torch.profiler beside the count of the CPU emulation, as {case:
    {"counted", "kernels", "launch_calls", "memory_calls"}} (`make gpu-check`; the check of the counter)."""
    from torch.profiler import ProfilerActivity, profile

    counted = {name: count_step(step).launches for name, step in launch_cases(names, "cpu").items()}
    out = {}
    for name, step in launch_cases(names, "cuda").items():
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        out[name] = {"counted": counted[name], **profiled_launches(prof.events())}
    return out


def count_step(step: Callable[[], None], warmup: int = 2) -> LaunchCount:
    """The launches and host reads of one call of `step`, after `warmup` calls (the optimizer's first step makes
    its momentum buffers; the spectral vectors settle)."""
    for _ in range(warmup):
        step()
    with LaunchCounter() as counter:
        step()
    return LaunchCount(counter.launches, counter.syncs, dict(counter.by_op.most_common()))


def run_launch_count(names=None):
    """(report, table): every case's launches and host reads a step, and each goal: met, or by how much not."""
    counts = {name: count_step(step) for name, step in launch_cases(names).items()}
    rows = [{"case": n, "launches": c.launches, "syncs": c.syncs, "by_op": c.by_op} for n, c in counts.items()]
    goals = {}
    for name, (reference, extra) in LAUNCH_GOALS.items():
        if name in counts and reference in counts:
            allowed = counts[reference].launches + extra
            goals[name] = {"reference": reference, "allowed": allowed, "met": counts[name].launches <= allowed}
    lines = [
        "[launches of one training step on the CUDA path, counted on the CPU (autocast's casts not counted); "
        "quick preset's network]"
    ]
    for name, c in counts.items():
        verdict = ""
        if name in goals:
            g = goals[name]
            over = c.launches - g["allowed"]
            verdict = f"  goal <= {g['reference']} + {LAUNCH_GOALS[name][1]}: "
            verdict += "met" if g["met"] else f"{over} over"
        lines.append(f"  {name:28s} {c.launches:5d} launches, {c.syncs} host reads{verdict}")
    report = {"benchmark": "launches", "machine": machine_description("cpu"), "rows": rows, "goals": goals}
    return report, "\n".join(lines)
