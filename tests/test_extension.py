"""Loading the compiled extension, and the fallback to the references without it."""

import os
import warnings

import pytest
import torch

from itconv_fast import _extension, _reference, ops


@pytest.mark.skipif(os.environ.get("ITCONV_FAST_REQUIRE_EXTENSION") != "1", reason="set by CI, which builds it")
def test_extension_is_loaded_where_it_was_built():
    assert ops.extension_loaded(), _extension._reason
    info = torch.ops.itconv_fast._build_info()
    assert info.startswith(f"torch={torch.__version__.split('+')[0]}")


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_reason", "testing the fallback")
    monkeypatch.setattr(_extension, "_warned", False)
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
