"""`itconv-fast info`: versions, devices and the kernel backend in use."""

from __future__ import annotations

import json
import platform

import click
import torch


@click.command()
def info() -> None:
    """Versions, devices and the kernel backend in use."""
    from itconv_fast import ops
    from itconv_fast.ops import _extension

    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": ops.extension_loaded(),
        "extension_cuda_kernels": _extension.cuda_compiled(),
        "cuda_build": _extension.cuda_build_record(),
        "cuda_arch_list": _extension.build_info().get("cuda_arch_list"),
        "threads": torch.get_num_threads(),
    }
    if ops.extension_loaded():
        # What the CPU kernels tuned to on this machine: L1 geometry, vector clone, register-path limit.
        report["cpu_kernels"] = _extension.cpu_info()
    else:
        report["fallback_reason"] = _extension._reason
    click.echo(json.dumps(report, indent=2))
