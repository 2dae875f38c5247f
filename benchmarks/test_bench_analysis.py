"""pytest-benchmark: analyze(all measures) vs compute_indices alone (cases: itconv_fast.measures.analysis / indices).
A small network here; `itconv-fast bench analysis` measures ResNet-101-16 on 1,000 examples."""

import pytest
import torch

from itconv_fast.measures.analysis import analyze
from itconv_fast.measures.indices import compute_indices
from itconv_fast.models import IterResNet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = IterResNet(10, 3, width=8, blocks=4, stages=3, input_size=32).eval()
    x = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:32] = (y[:32] + 1) % 10
    return model, (x, y)


@pytest.mark.parametrize("case", ["indices alone", "all measures"])
def test_analysis_cost(benchmark, setup, case):
    model, data = setup
    benchmark.group = "analysis vs indices, width 8, 3 x 4 blocks, 128 examples"
    if case == "indices alone":
        benchmark(lambda: compute_indices(model, data, extra_iterations=16))
    else:
        benchmark(lambda: analyze(model, data, measures="all", extra_iterations=16))
