"""pytest-benchmark suite: one soft-coupling step on the paper's ResNet-101 gradient set.

    pytest benchmarks/test_bench_coupling.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Each group times the fused op beside the pure-PyTorch alternatives on the same tensors
(itconv_fast.bench defines the cases, shared with `itconv-fast bench coupling`).
"""

import pytest
import torch

from itconv_fast import bench

WIDTHS = [16, 64]
CASES = [
    "fused soft_couple_",
    "(a) per-slot loop",
    "(b) _foreach",
    "(c) torch.compile(reference)",
    "(d) copy (memory floor)",
]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

_cache = {}


def _cases(width, device):
    key = (width, device)
    if key not in _cache:
        _cache[key] = bench.coupling_cases(bench.resnet_gradient_groups(width=width, device=device))
    return _cache[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", CASES)
def test_coupling_step(benchmark, device, width, case):
    fn = _cases(width, device)[case]
    fn()  # warm-up (compiles (c))
    benchmark.group = f"coupling ResNet-101 width {width} {device}"
    if device == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark(run)
    else:
        benchmark(fn)
