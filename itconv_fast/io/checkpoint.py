"""Checkpoints that are safe to share: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain Python values (dicts, lists, tuples, numbers, strings, None):
model and optimizer state dicts, the scheduler's state, the run's configuration as a dict, and the RNG
states converted to tensors. Loading never unpickles arbitrary objects, so a checkpoint downloaded from
somewhere cannot run code; a truncated, foreign or malicious file raises `CheckpointError`, a one-line
`ValueError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint_state",
    "load_state_dict_file",
    "rng_state",
    "set_rng_state",
    "atomic_file",
    "atomic_save",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (truncated, not ours, or holding a foreign object)."""


@contextlib.contextmanager
def atomic_file(path: str, mode: str):
    """Write to a temporary file beside `path`, fsync, then rename over it: a kill at any moment leaves
    either the old file or the new one, never a partial one. A write that fails (a full disk: ENOSPC) leaves
    the old file as it was and raises OSError naming `path` (also when torch.save reports it as a RuntimeError)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing, like open() makes
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write it ({cause.strerror or cause})", path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _os_error_in(exc: BaseException):
    """The OSError that exc is or that it was raised from (torch.save wraps its file's errors), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(value):
    """value with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples: JSON has
    no NaN, and a file with one is not JSON to other readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [json_safe(x) for x in value]
    if isinstance(value, dict):
        return {k: json_safe(x) for k, x in value.items()}
    return value


def atomic_write_json(path: str, obj) -> None:
    """obj as JSON (non-finite floats written as null), atomically."""
    with atomic_file(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_save(obj, path: str) -> None:
    """torch.save, atomically (see atomic_file)."""
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(state: dict, path: str) -> None:
    """Saves `state` atomically. It must hold only what `load_checkpoint_state` admits (tensors and plain
    values); anything else would be refused on loading, so it is refused here already."""
    _check_plain(state, "checkpoint")
    atomic_save(state, path)


def _check_plain(value, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: checkpoints hold only tensors and plain values")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _load_untrusted(path: str, map_location, what: str):
    """A file a user hands us: a .safetensors file, or a torch file read with weights_only=True. Any failure is
    one CheckpointError line naming the file and `what` it should have been."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted file is the same one-line error
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds objects other than tensors and plain values (refused: loading them could run code)"
        else:
            reason = _one_line(exc)
        raise CheckpointError(f"{path}: not a readable {what}: {reason}") from None


def load_checkpoint_state(path: str, map_location="cpu", required=("model", "model_config")) -> dict:
    """The state dict of a checkpoint (a file, or a run directory holding checkpoint.pt), read with
    weights_only=True. Raises FileNotFoundError if it is missing and CheckpointError if it is not a
    readable itconv-fast checkpoint (truncated, another program's file, an object that is not plain data,
    or a dict without the `required` entries)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = _load_untrusted(path, map_location, "itconv-fast checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an itconv-fast checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not an itconv-fast checkpoint (missing {', '.join(missing)})")
    return state


def load_state_dict_file(path: str, map_location="cpu") -> dict:
    """A model's state dict from a file a user hands us: a .safetensors file, or a torch file (read with
    weights_only=True) holding a state dict, a dict with one under "state_dict" or "model" (an itconv-fast
    checkpoint among them). Raises FileNotFoundError or CheckpointError, one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    state = _load_untrusted(path, map_location, "state dict")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the training loop draws from, as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
