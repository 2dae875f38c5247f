"""When a training run is compiled (`--compile auto`, the default), and where Inductor keeps what it compiled.

torch.compile makes each step faster but costs a fixed compilation time in the first epoch, so it pays only
from some number of steps on. `auto` turns it on when the steps this session will run reach the break-even
measured on the device (`itconv-fast bench train` prints it; benchmarks/NOTES.md has the measurements):

    on  when  steps_left >= BREAK_EVEN_STEPS[device type]   (and no objectives, no DDP: not yet measured there)

The rule is a step count, not a time, because both the compilation time and the saving per step grow with
the network; the counts are the largest break-even measured on each device type, so `auto` never turns
compilation on where it was measured to lose.

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

__all__ = ["BREAK_EVEN_STEPS", "decide_compile", "use_compile_cache", "compile_cache_dir", "sweep_compile_cache_dir"]

# Steps from which compiling pays, per device type (measured 2026-11-29, benchmarks/NOTES.md "Compilation"):
# cpu: quick preset 2 cores ~ 900 steps cold-cache, ResNet-101-16 ~ 600; cuda (H200, torch 2.11): quick preset
# ~ 9,300 steps, ResNet-101-16 ~ 33,000 (a GPU step is mostly cuDNN time that compiling does not shorten).
BREAK_EVEN_STEPS = {"cpu": 1_000, "cuda": 35_000}

# Set by the user before we set it (we only fill it in when it is missing).
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def decide_compile(setting: Union[bool, str], device: "torch.device", steps_left: int, *, objectives: bool = False,
                   distributed: bool = False) -> tuple[bool, str]:
    """(compile or not, why) for a run's `compile` setting (True, False, "auto")."""
    if setting is True:
        return True, "on (asked for)"
    if setting is False:
        return False, "off (asked for)"
    if objectives:
        return False, "auto: off (objectives record stage activations with hooks; compiled runs not measured)"
    if distributed:
        return False, "auto: off (DistributedDataParallel: compiled runs not measured)"
    threshold = BREAK_EVEN_STEPS.get(device.type)
    if threshold is None:
        return False, f"auto: off (no break-even measured on {device.type})"
    if steps_left >= threshold:
        return True, f"auto: on ({steps_left} steps >= {threshold}, the break-even on {device.type})"
    return False, f"auto: off ({steps_left} steps < {threshold}, the break-even on {device.type})"


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
    """Points Inductor's on-disk caches at `directory` (default: compile_cache_dir()) for this process and the
    processes it starts; returns the directory. Call it before the first compilation."""
    directory = os.path.abspath(directory or compile_cache_dir())
    os.makedirs(directory, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
        try:  # drop what Inductor memoised about the old directory (nothing when it has not run yet)
            from torch._inductor.utils import clear_caches

            clear_caches()
        except Exception:  # a torch without it: the variable alone applies from the next compilation
            pass
    return directory
