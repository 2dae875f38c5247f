import os
import socket

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test TEST_WORKERS=N`) the workers share the cores: each runs torch, and the
    # processes it starts (CLI runs, DDP workers), with its share of them. Each torch using every core would
    # oversubscribe them, and OpenMP's spinning workers make that far slower than one process
    # (benchmarks/NOTES.md, "make test in parallel").
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))


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
