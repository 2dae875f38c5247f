"""ptxas resource usage of every CUDA kernel for sm_80 and sm_90 (benchmarks/ptxas_usage.py): no stack frame
and no local-memory spills. Compiles the CUDA sources' device code (about half a minute each); skipped only
without nvcc."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
_spec = importlib.util.spec_from_file_location("ptxas_usage", os.path.join(ROOT, "benchmarks", "ptxas_usage.py"))
ptxas_usage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas_usage)

SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    256 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_parser_reads_every_field():
    rows = ptxas_usage.parse(SAMPLE, "x.cu")
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90"]
    assert rows[0] == {
        "source": "x.cu",
        "kernel": rows[0]["kernel"],
        "arch": "sm_80",
        "stack_bytes": 256,
        "spill_store_bytes": 8,
        "spill_load_bytes": 12,
        "registers": 40,
        "smem_bytes": 128,
    }
    assert rows[0]["kernel"].startswith("kernel")  # demangled when c++filt is there
    assert rows[1]["registers"] == 38 and rows[1]["smem_bytes"] == 0 and rows[1]["stack_bytes"] == 0


@pytest.mark.slow
@pytest.mark.skipif(ptxas_usage.nvcc_path() is None, reason="nvcc not found")
def test_no_kernel_spills_or_uses_a_stack_frame():
    rows = ptxas_usage.usage(("80", "90"))
    expected = ("soft_couple_kernel", "power_iteration_matrix_kernel", "bn_partial_sums_kernel", "bn_grad_input_kernel")
    for kernel in expected:  # in mangled or demangled names
        assert any(kernel in r["kernel"] for r in rows), [r["kernel"] for r in rows]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["stack_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
