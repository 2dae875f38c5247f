"""pytest-benchmark: one power step for all 96 block convolutions of ResNet-101 (cases: itconv_fast.bench)."""

import pytest

from itconv_fast import bench

CASES = ["batched operator", "per-layer operator loop", "batched matrix", "per-layer torch spectral_norm (matrix)"]
_cache = {}


@pytest.mark.parametrize("width", [16, 64])
@pytest.mark.parametrize("case", CASES)
def test_power_step(benchmark, width, case):
    if width not in _cache:
        _cache[width] = bench.spectral_cases(bench.resnet_block_convs(width=width))
    benchmark.group = f"spectral power step ResNet-101 width {width}"
    benchmark(_cache[width][case])
