"""The cached index evaluator and `analyze` against one forward per perturbation."""

from __future__ import annotations

import torch

from .runner import label_backend, run_comparison

# Indices of iterative convergence


def run_indices_benchmark(configs=((16, 4, 16, 256),), extra_iterations=16, device="cpu", min_run_time=1.0):
    """cached vs reference compute_indices on random-label data; configs: (width, blocks, input side, n).

    Each row also records the block-evaluation counts of both methods (indices.index_flops).
    """
    from ..measures.indices import compute_indices, index_flops
    from ..models import IterResNet

    cases, flops = {}, {}
    for width, blocks, side, n in configs:
        torch.manual_seed(0)
        model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, input_size=side).to(device).eval()
        x = torch.randn(n, 3, side, side, device=device)
        with torch.no_grad():
            y = model(x).argmax(1)
        y[: n // 4] = (y[: n // 4] + 1) % 10  # an error well below chance, so the indices are defined
        key = f"{width}x{blocks}@{side}px,n={n}"
        cases[key] = {
            method: (
                lambda m=method, mod=model, data=(x, y), batch=n: compute_indices(
                    mod, data, extra_iterations=extra_iterations, method=m, batch_size=batch
                )
            )
            for method in ("cached", "reference")
        }
        flops[key] = index_flops(model, extra_iterations)
    report, table = run_comparison(
        cases,
        label="compute_indices (S=3, K=16)",
        reference="cached",
        device=device,
        min_run_time=min_run_time,
        name="indices",
        warmup=1,
    )
    report["block_evaluations"] = flops
    return report, label_backend(table)


def run_analysis_benchmark(
    width=16,
    blocks=16,
    side=32,
    n=1000,
    extra_iterations=16,
    device="cpu",
    min_run_time=0.0,
    min_rounds=1,
    batch_size=500,
):
    """analyze(all measures) against compute_indices alone on ResNet-101-16 (random weights, random-label data):
    the cost of the refinement measures, anytime curves and traces on top of the indices. Each round runs
    each case once (a round of ResNet-101-16 on 1,000 examples takes minutes on a CPU)."""
    from ..measures.analysis import analyze
    from ..measures.indices import compute_indices
    from ..models import IterResNet

    torch.manual_seed(0)
    model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, input_size=side).to(device).eval()
    x = torch.randn(n, 3, side, side, device=device)
    with torch.no_grad():
        y = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    y[: n // 4] = (y[: n // 4] + 1) % 10
    key = f"{width}x{blocks}@{side}px,n={n}"
    cases = {
        key: {
            "indices alone": lambda: compute_indices(
                model, (x, y), extra_iterations=extra_iterations, batch_size=batch_size
            ),
            "all measures": lambda: analyze(
                model, (x, y), measures="all", extra_iterations=extra_iterations, batch_size=batch_size
            ),
        }
    }
    return run_comparison(
        cases,
        label="analyze vs compute_indices (S=3, K=16)",
        reference="indices alone",
        device=device,
        min_run_time=min_run_time,
        name="analysis",
        warmup=0,
        block_time=0.0,
        min_rounds=min_rounds,
    )
