"""Loads the compiled extension once; records why it is unavailable when it is."""

from __future__ import annotations

import importlib
import warnings

import torch

_loaded = False
_reason = "not loaded yet"
_warned = False
soft_couple_groups = None  # the extension's unboxed call of torch.ops.itconv_fast.soft_couple_


def _load() -> None:
    global _loaded, _reason, soft_couple_groups
    try:
        module = importlib.import_module("itconv_fast._C")
    except ImportError as exc:  # no build, or built against another torch (undefined symbols)
        _reason = f"the compiled extension itconv_fast._C could not be imported ({exc})"
        return
    built = dict(item.split("=", 1) for item in torch.ops.itconv_fast._build_info().split(";"))
    running = torch.__version__.split("+")[0]
    if built.get("torch") != running:
        _reason = (
            f"itconv_fast._C was built against torch {built.get('torch')} but torch {running} is running; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
        return
    _loaded = True
    _reason = ""
    soft_couple_groups = module.soft_couple_groups


_load()


def loaded() -> bool:
    return _loaded


def cuda_compiled() -> bool:
    """Whether the loaded extension carries CUDA kernels."""
    return _loaded and "cuda=1" in torch.ops.itconv_fast._build_info()


def warn_fallback(op: str) -> None:
    """One warning per process when an op falls back to its pure-PyTorch reference."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"itconv_fast: {op} runs its pure-PyTorch reference because {_reason}.",
            RuntimeWarning,
            stacklevel=3,
        )
