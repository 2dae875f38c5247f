import socket

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a `cuda`-marked parameter (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=["extension", "reference"])
def path(request, monkeypatch):
    """Run a test through the compiled ops (their C++ checks) and through the pure-PyTorch fallback."""
    from itconv_fast import ops
    from itconv_fast.ops import _extension

    if request.param == "extension":
        if not ops.extension_loaded():
            pytest.skip("compiled extension not built")
    else:
        monkeypatch.setattr(_extension, "_loaded", False)
        monkeypatch.setattr(_extension, "_quiet", True)
    return request.param


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the DDP tests' process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
