"""pytest-benchmark: Digitclutter generation rate (target: >= 5,000 images/s on 2 CPU cores)."""

import pytest

from itconv_fast.data import digitclutter

N = 5000


@pytest.mark.parametrize("n_digits", [3, 5])
def test_generate(benchmark, n_digits):
    digitclutter.glyph_masks()  # rendered once per process, outside the timing
    benchmark.group = "digitclutter generation (5000 images)"
    benchmark.extra_info["images"] = N
    images, _ = benchmark(digitclutter.generate, N, n_digits, 0)
    assert images.shape[0] == N
