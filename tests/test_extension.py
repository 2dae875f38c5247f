"""Loading the compiled extension, and the fallback to the references without it."""

import os
import warnings

import pytest
import torch

from itconv_fast import ops
from itconv_fast.ops import _extension, _reference


@pytest.mark.skipif(os.environ.get("ITCONV_FAST_REQUIRE_EXTENSION") != "1", reason="set by CI, which builds it")
def test_extension_is_loaded_where_it_was_built():
    assert ops.extension_loaded(), _extension._reason
    info = torch.ops.itconv_fast._build_info()
    assert info.startswith(f"torch={torch.__version__.split('+')[0]}")


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_reason", "testing the fallback")
    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.setattr(_extension, "_quiet", False)
    groups = [[torch.randn(4, 4) for _ in range(3)]]
    expected = [[t.clone() for t in groups[0]]]
    with pytest.warns(RuntimeWarning, match="testing the fallback"):
        ops.soft_couple_(groups, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        ops.soft_couple_(groups, 0.5)
    _reference.soft_couple_(expected, 0.5)
    _reference.soft_couple_(expected, 0.5)
    for a, b in zip(groups[0], expected[0]):
        assert torch.equal(a, b)
    assert not ops.extension_loaded()


def test_each_op_warns_once_about_its_own_fallback(monkeypatch):
    """One warning per op: the first op's warning does not silence the second's."""
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_reason", "testing the fallback")
    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.setattr(_extension, "_quiet", False)
    with pytest.warns(RuntimeWarning, match="soft_couple_ runs its pure-PyTorch reference"):
        ops.soft_couple_([[torch.randn(3) for _ in range(2)]], 0.5)
    w = torch.randn(2, 3, 3, 3, 3)
    with pytest.warns(RuntimeWarning, match="batched_spectral_norm runs its pure-PyTorch reference"):
        ops.batched_spectral_norm(w, mode="matrix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.batched_spectral_norm(w, mode="matrix")
        ops.soft_couple_([[torch.randn(3) for _ in range(2)]], 0.5)


def test_devices_without_compiled_kernels_run_the_reference(monkeypatch):
    """A build without CUDA kernels serves CUDA tensors by the reference (checked here with the CPU
    standing in for a device the build lacks: has_kernels_for is what the ops consult)."""
    if not ops.extension_loaded():
        pytest.skip("compiled extension not built")
    monkeypatch.setattr(_extension, "has_kernels_for", lambda device: False)
    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.setattr(_extension, "_quiet", False)
    groups = [[torch.randn(5) for _ in range(3)]]
    expected = [[t.clone() for t in groups[0]]]
    with pytest.warns(RuntimeWarning, match="soft_couple_ runs its pure-PyTorch reference"):
        ops.soft_couple_(groups, 0.5)
    _reference.soft_couple_(expected, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(groups[0], expected[0]))
    w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64)
    u = _reference._normalize_rows(torch.randn(2, 3, dtype=torch.float64))
    u_ref = u.clone()
    with pytest.warns(RuntimeWarning, match="batched_spectral_norm runs its pure-PyTorch reference"):
        sigma = ops.batched_spectral_norm(w, u, mode="matrix", n_iter=3)
    _, sigma_ref = _reference.power_iteration_matrix_(w, u_ref, 3)
    torch.testing.assert_close(sigma, sigma_ref)


def test_fallback_reason_names_a_build_without_cuda(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", True)
    monkeypatch.setattr(_extension, "cuda_compiled", lambda: False)
    assert not _extension.has_kernels_for("cuda")
    assert _extension.has_kernels_for("cpu")
    assert "built without CUDA" in _extension.fallback_reason("cuda")
