"""Files that are safe to share: atomic writes (a kill leaves the old file or the new one) and checkpoints read
with `torch.load(weights_only=True)`. The bottom layer beside ops and data: it imports nothing from the package."""

from .checkpoint import (
    CheckpointError,
    atomic_file,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint_state,
    load_state_dict_file,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

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
]
