"""When a training run is compiled (`--compile auto`, the default), how, and where Inductor keeps what it compiled.

torch.compile makes each step faster, or not, and costs a fixed compilation time in the first epoch, so it pays
only from some number of steps on. `auto` turns it on when the steps this session will run reach the break-even
measured on the device type (`itconv-fast bench train` prints it; benchmarks/NOTES.md "Compilation"):

    cpu   never: on a 2-core CPU a compiled step was at best a few percent faster than eager and often slower,
          so compilation never paid back within a run
    cuda  from 5,000 steps, compiled with CUDA graphs (mode="reduce-overhead"): the measured break-even was
          well below that; the margin covers what the full loop adds around the graphs

and never with objectives or under DDP (compiled runs not measured there). `auto` also lets TorchDynamo fall
back to eager code where compiling fails, so that a default run never fails for it.

Compiled code is cached on disk (Inductor's FX-graph and AOTAutograd caches). Every run uses one directory,
TORCHINDUCTOR_CACHE_DIR when the user set it, else `<cache dir>/inductor` (`ITCONV_FAST_CACHE`, default
~/.cache/itconv-fast); a sweep points all its trials at `<sweep dir>/compile-cache`, so trials after the first
load the compiled graphs instead of compiling them again (also across the machines of a cluster that share
the sweep directory: the cache keys hold the device and the compiler).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import torch

__all__ = [
    "BREAK_EVEN_STEPS",
    "COMPILE_MODES",
    "compile_mode",
    "decide_compile",
    "use_compile_cache",
    "compile_cache_dir",
    "sweep_compile_cache_dir",
]

# Steps from which compiling pays, per device type (None: never), and the mode it compiles with.
BREAK_EVEN_STEPS = {"cpu": None, "cuda": 5_000}
COMPILE_MODES = {"cpu": "default", "cuda": "reduce-overhead"}

# Set by the user before we set it (we only fill it in when it is missing).
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def decide_compile(
    setting: Union[bool, str],
    device: "torch.device",
    steps_left: int,
    *,
    objectives: bool = False,
    distributed: bool = False,
) -> tuple[bool, str]:
    """(compile or not, why) for a run's `compile` setting (True, False, "auto")."""
    if setting is True:
        return True, "on (asked for)"
    if setting is False:
        return False, "off (asked for)"
    if objectives:
        return False, "auto: off (objectives record stage activations with hooks; compiled runs not measured)"
    if distributed:
        return False, "auto: off (DistributedDataParallel: compiled runs not measured)"
    if device.type not in BREAK_EVEN_STEPS:
        return False, f"auto: off (no break-even measured on {device.type})"
    threshold = BREAK_EVEN_STEPS[device.type]
    if threshold is None:
        return False, f"auto: off (compiling does not pay on {device.type}: benchmarks/NOTES.md)"
    if steps_left >= threshold:
        return True, f"auto: on ({steps_left} steps >= {threshold}, the break-even on {device.type})"
    return False, f"auto: off ({steps_left} steps < {threshold}, the break-even on {device.type})"


def compile_mode(device: "torch.device") -> str:
    """torch.compile's mode on a device type: CUDA graphs on CUDA, Inductor's default elsewhere."""
    return COMPILE_MODES.get(device.type, "default")


def compile_cache_dir() -> str:
    """The directory Inductor uses in this process: the user's TORCHINDUCTOR_CACHE_DIR, else ours."""
    if _USER_CACHE_DIR:
        return os.path.abspath(_USER_CACHE_DIR)
    from ..data.datasets import default_cache_dir

    return os.path.join(default_cache_dir(), "inductor")


def sweep_compile_cache_dir(sweep_dir: str) -> str:
    """The directory every trial of a sweep compiles into: the user's TORCHINDUCTOR_CACHE_DIR, else
    <sweep dir>/compile-cache (on a cluster, shared by the machines that share the sweep directory)."""
    if _USER_CACHE_DIR:
        return os.path.abspath(_USER_CACHE_DIR)
    return os.path.join(os.path.abspath(sweep_dir), "compile-cache")


def use_compile_cache(directory: Optional[str] = None) -> str:
    """Points Inductor's on-disk caches at `directory` (default: the one this process already uses, e.g. a sweep's,
    else compile_cache_dir()) for this process and the processes it starts; returns the directory. Call it before
    the first compilation."""
    directory = os.path.abspath(directory or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or compile_cache_dir())
    os.makedirs(directory, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
        try:  # drop what Inductor memoised about the old directory (nothing when it has not run yet)
            from torch._inductor.utils import clear_caches

            clear_caches()
        except Exception:  # a torch without it: the variable alone applies from the next compilation
            pass
    return directory
