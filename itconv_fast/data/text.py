"""A text file as next-token examples for a language model: the file's tokens (from the model's tokenizer, handed in
by the caller) cut into consecutive windows of seq_len + 1 tokens; each window's first seq_len tokens are the input
and its last seq_len the targets (the next token at every position)."""

from __future__ import annotations

from typing import Callable

import torch

from .vision import DatasetFilesError

__all__ = ["read_text", "token_windows"]


def read_text(path: str) -> str:
    """The file's text (UTF-8). Raises DatasetFilesError naming the file when it is unreadable, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DatasetFilesError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DatasetFilesError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not text.strip():
        raise DatasetFilesError(f"{path}: the file is empty")
    return text


def token_windows(path: str, encode: Callable[[str], list], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), int64 [N, seq_len] each: the file's tokens in N = (tokens - 1) // seq_len consecutive
    windows (the tail that fills no window is left out). Raises DatasetFilesError when the file has fewer than
    seq_len + 1 tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = torch.as_tensor(list(encode(read_text(path))), dtype=torch.int64)
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise DatasetFilesError(f"{path}: {ids.numel()} tokens, fewer than one window of {seq_len} + 1")
    inputs = ids[: n * seq_len].view(n, seq_len)
    targets = ids[1 : n * seq_len + 1].view(n, seq_len)
    return inputs, targets
