"""Overhead of coupling, spectral normalization and the objectives on a training step of the paper's ResNet."""

from __future__ import annotations

import torch

from .runner import interleaved_step_times, label_backend, machine_description

OBJECTIVE_CASE = "objective: {} (weight 1)"


def train_step_cases(
    width=16, blocks=16, batch=128, device="cpu", lam=0.5, sn_mu=0.95, sn_mode="operator", objectives=False
):
    """One SGD step of ResNet-101-16 (forward, backward, coupling, step) with and without the regularisers;
    with objectives=True also one case per objective (itconv_fast.objectives, weight 1, default options), each
    through the training loop's own step (experiments.step.TrainStep) on the plain network."""
    from ..experiments.step import TrainStep
    from ..models import IterResNet
    from ..nn.coupling import GradientCoupler
    from ..objectives import OBJECTIVES, make_objective

    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def make(coupled, normalised):
        torch.manual_seed(0)
        model = (
            IterResNet(
                10,
                3,
                width=width,
                blocks=blocks,
                stages=3,
                sn_mu=sn_mu if normalised else None,
                sn_mode=sn_mode,
                init="recurrent" if coupled else "nonrecurrent",
            )
            .to(device)
            .train()
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        coupler = GradientCoupler(model, lam) if coupled else None

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if coupler is not None:
                coupler()
            opt.step()

        return step

    def make_objective_step(name):
        torch.manual_seed(0)
        model = IterResNet(10, 3, width=width, blocks=blocks, stages=3).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

        class Task:
            loss = staticmethod(torch.nn.functional.cross_entropy)

        step = TrainStep(
            model,
            Task(),
            opt,
            scheduler,
            GradientCoupler(model, 0.0),
            device=torch.device(device),
            objectives=[make_objective(name, 1.0)],
        )
        return lambda: step(x, y, 0)

    cases = {
        "plain": make(False, False),
        f"coupling (lam {lam})": make(True, False),
        f"spectral norm ({sn_mode}, 1 power step)": make(False, True),
        "coupling + spectral norm": make(True, True),
    }
    if objectives:
        cases.update({OBJECTIVE_CASE.format(name): make_objective_step(name) for name in OBJECTIVES})
    return cases


def run_train_step_benchmark(
    width=16, blocks=16, batch=128, device="cpu", min_run_time=10.0, sn_mode="operator", objectives=True
):
    """Step times of every case, interleaved round by round (plain, coupled, normalised, both, the objectives,
    plain, ...) so that drift of a shared machine hits all cases alike; medians over the rounds."""
    import statistics

    cases = train_step_cases(width, blocks, batch, device, sn_mode=sn_mode, objectives=objectives)
    times, rounds = interleaved_step_times(cases, device, min_run_time)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    label = f"one training step, ResNet-{6 * blocks + 5}-{width}, batch {batch}"
    rows = [
        {
            "width": width,
            "case": name,
            "median_s": m,
            "rounds": rounds,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
        }
        for name, m in medians.items()
    ]
    report = {
        "benchmark": "train-step",
        "machine": machine_description(device),
        "rows": rows,
        "ratios": {f"width {width}": {n: m / medians["plain"] for n, m in medians.items() if n != "plain"}},
    }
    table = "\n".join(
        [f"[{label}, interleaved, {rounds} rounds]"]
        + [
            f"  {name:44s} median {m * 1e3:9.1f} ms  (min {min(times[name]) * 1e3:.1f}, max "
            f"{max(times[name]) * 1e3:.1f})"
            for name, m in medians.items()
        ]
    )
    return report, label_backend(table)
