"""compute_indices on residual models other than ResNets: the cached evaluator against the reference one, for
the two worked examples' models (a pre-norm ViT through transformer_encoder_adapter, and the looped 1-D conv
network of the running-parity task as a ResidualStack). Speed does not depend on training, so the models are
freshly initialised.

    pytest benchmarks/test_bench_residual.py                   # pytest-benchmark
    python benchmarks/test_bench_residual.py --out benchmarks/results/residual-cpu.json   # interleaved ratios
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import pytest
import torch

from itconv_fast.measures.indices import compute_indices
from itconv_fast.models.residual import sequence_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(examples: int = 256, extra: int = 8):
    """name -> (model, data, error_fn, K)."""
    vit_module, parity_module = _example("vit_digitclutter"), _example("looped_parity")
    torch.manual_seed(0)
    vit = vit_module.ViT(layers=4, width=64).eval()
    x = torch.randn(examples, 1, 32, 32)
    y = vit(x).argmax(1).detach()
    y[: examples // 4] = (y[: examples // 4] + 1) % 10
    parity = parity_module.build(64, 12, 1.0, 0).eval()
    bits, target = parity_module.parity_data(examples, 16, torch.Generator().manual_seed(0))
    return {
        "vit-4x64 (Digitclutter size)": (vit.residual_model(), (x, y), None, extra),
        "looped conv T=12, length 16": (parity, (bits, target), sequence_error, extra),
    }


@pytest.mark.parametrize("method", ["cached", "reference"])
@pytest.mark.parametrize("case", ["vit", "parity"])
def test_indices_on_residual_models(benchmark, case, method):
    built = cases(examples=64)
    model, data, error_fn, K = next(v for k, v in built.items() if k.startswith("vit" if case == "vit" else "looped"))
    benchmark.pedantic(
        compute_indices,
        args=(model, data),
        kwargs=dict(extra_iterations=K, method=method, error_fn=error_fn),
        rounds=2,
        iterations=1,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="cached against reference evaluator on residual models")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--extra", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from itconv_fast.bench import machine_description

    report = {
        "benchmark": "residual-models",
        "machine": machine_description("cpu"),
        "examples": args.examples,
        "extra_iterations": args.extra,
        "method": "cases interleaved round by round; medians",
        "rows": [],
    }
    for name, (model, data, error_fn, K) in cases(args.examples, args.extra).items():
        times = {"cached": [], "reference": []}
        for _ in range(args.rounds):
            for method in times:
                start = time.perf_counter()
                compute_indices(model, data, extra_iterations=K, method=method, error_fn=error_fn)
                times[method].append(time.perf_counter() - start)
        cached, reference = statistics.median(times["cached"]), statistics.median(times["reference"])
        report["rows"].append(
            {"model": name, "cached_s": cached, "reference_s": reference, "speedup": reference / cached}
        )
        print(f"{name}: cached {cached:.2f} s, reference {reference:.2f} s, {reference / cached:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
