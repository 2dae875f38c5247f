"""Drop-in spectral normalization (`itconv_fast.nn`) on torchvision-like ResNets against torch's, as training-step
overheads."""

from __future__ import annotations

import torch

from .runner import interleaved_step_times, label_backend, machine_description

# Drop-in spectral normalization on torchvision-like ResNets (itconv_fast.nn)

LIPSCHITZ_CASES = (
    "plain",
    "(a) torch spectral_norm per layer (matrix)",
    "(b) itconv_fast.nn.spectral_norm per layer (matrix)",
    "(c) BatchedSpectralNorm (matrix)",
    "(b) itconv_fast.nn.spectral_norm per layer (operator)",
    "(c) BatchedSpectralNorm (operator)",
)


def lipschitz_step_cases(arch="resnet18", batch=8, size=128, device="cpu", cases=LIPSCHITZ_CASES):
    """One SGD step (forward, backward, step) of a torchvision-like ResNet with every spectral-norm variant
    on all its Conv2d and Linear layers: {case: step function}."""
    from .. import nn as inn
    from ..models import zoo

    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def make(case):
        torch.manual_seed(0)
        model = getattr(zoo, arch)().to(device).train()
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        mode = "operator" if "operator" in case else "matrix"
        if case.startswith("(a)"):
            for _, m in layers:
                torch.nn.utils.parametrizations.spectral_norm(m)
        elif case.startswith("(b)"):
            for n, m in layers:
                inn.spectral_norm(m, mode=mode, name=n)
        elif case.startswith("(c)"):
            inn.BatchedSpectralNorm(model, mode=mode)
        if case != "plain":  # operator mode learns the input sizes here; the groups form after it
            model.eval()
            with torch.no_grad():
                model(x[:1])
            model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return {case: make(case) for case in cases}


def run_lipschitz_benchmark(
    archs=("resnet18", "resnet50"), batch=8, size=128, device="cpu", min_run_time=5.0, cases=LIPSCHITZ_CASES
):
    """Step times of every case per architecture, interleaved round by round; the overhead of each variant
    over the plain step, and its ratio to torch's per-layer overhead."""
    import statistics

    rows, tables, ratios = [], [], {}
    for arch in archs:
        fns = lipschitz_step_cases(arch, batch, size, device, cases)
        times, rounds = interleaved_step_times(fns, device, min_run_time)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        # Overheads paired round by round (case - plain of the same round), then the median: the drift of a
        # shared machine between rounds cancels, which a difference of two medians would keep.
        paired = {name: statistics.median(t - p for t, p in zip(ts, times["plain"])) for name, ts in times.items()}
        torch_overhead = paired.get(LIPSCHITZ_CASES[1], float("nan"))
        setting = f"{arch}, batch {batch}, {size}x{size}"
        ratios[setting] = {}
        lines = [f"[one training step, {setting}, interleaved, {rounds} rounds]"]
        for name, m in med.items():
            overhead = paired[name]
            rel = overhead / torch_overhead if name != "plain" else float("nan")
            rows.append(
                {
                    "setting": setting,
                    "case": name,
                    "median_s": m,
                    "overhead_s": overhead,
                    "overhead_vs_torch": rel,
                    "rounds": rounds,
                    "min_s": min(times[name]),
                    "max_s": max(times[name]),
                }
            )
            if name != "plain":
                ratios[setting][name] = rel
            lines.append(
                f"  {name:55s} {m * 1e3:9.1f} ms  overhead {overhead * 1e3:8.1f} ms"
                + (f"  ({rel:.2f}x torch's)" if name != "plain" else "")
            )
        tables.append("\n".join(lines))
    report = {
        "benchmark": "lipschitz",
        "machine": machine_description(device),
        "rows": rows,
        "overhead_vs_torch": ratios,
        "method": "cases interleaved round by round; medians; overhead = median over rounds of (case - plain)",
    }
    return report, label_backend("\n".join(tables))
