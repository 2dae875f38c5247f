"""Loads the compiled extension once; records why it is unavailable when it is."""

from __future__ import annotations

import importlib
import warnings

import torch

_loaded = False
_reason = "not loaded yet"
_warned: set = set()  # the ops that have warned about their fallback (one warning per op)
_quiet = False  # the test suite's switch for the fallback warnings
soft_couple_groups = None  # the extension's unboxed call of torch.ops.itconv_fast.soft_couple_
_build: dict = {}  # the loaded extension's build record (torch=..., cuda=0/1, cuda_arch_list=...)


def _load() -> None:
    global _loaded, _reason, soft_couple_groups, _build
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
    _build = built
    soft_couple_groups = module.soft_couple_groups


_load()


def loaded() -> bool:
    return _loaded


def build_info() -> dict:
    """The extension's build record (torch version, cuda=0/1, cuda_arch_list), {} when not loaded."""
    return dict(_build) if _loaded else {}


def cpu_info() -> dict:
    """What the CPU kernels read from the machine (csrc/ops/cpu/cpu_features.h): L1 data cache size, ways,
    line and sets, where they came from, the vector clone in use and the coupling register-path limit."""
    if not _loaded:
        return {}
    info = dict(item.split("=", 1) for item in torch.ops.itconv_fast._cpu_info().split(";"))
    for key in ("l1d_bytes", "l1d_ways", "l1d_line", "l1d_sets", "register_limit"):
        info[key] = int(info[key])
    return info


def cuda_build_record() -> str:
    """What setup.py recorded about the CUDA kernels: "built", or "not built: <why>" (itconv_fast/_cuda_build.txt);
    "unknown" for a build from before the record existed."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_cuda_build.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def cuda_compiled() -> bool:
    """Whether the loaded extension carries CUDA kernels."""
    return _loaded and _build.get("cuda") == "1"  # read once at load: ops consult it per call


def has_kernels_for(device) -> bool:
    """Whether the loaded extension has compiled kernels for tensors on `device` (CPU always; CUDA only
    in a build with CUDA kernels)."""
    if not _loaded:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and cuda_compiled())


def fallback_reason(device=None) -> str:
    """Why an op on `device` runs its reference (for the warning)."""
    if not _loaded:
        return _reason
    return f"the compiled extension has no kernels for {torch.device(device).type} tensors (built without CUDA)"


def warn_fallback(op: str, device=None) -> None:
    """One warning per op and process when it falls back to its pure-PyTorch reference."""
    if _quiet or op in _warned:
        return
    _warned.add(op)
    warnings.warn(
        f"itconv_fast: {op} runs its pure-PyTorch reference because {fallback_reason(device)}.",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_loaded() -> bool:
    """True when the compiled extension `itconv_fast._C` is loaded (else the references serve)."""
    return loaded()
