"""The model and example input that `itconv-fast lipschitz` measures, from a user's script, a training run directory
(the paper's network or a model fine-tuned by name) or a model by name: the file reading kept out of measures/, which
computes on models it is handed."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["ModelScriptError", "load_model_source", "load_named_source"]


class ModelScriptError(RuntimeError):
    """A model script given to `load_model_source` raised; the message names the file."""


def load_model_source(source: str):
    """(model, example input) for `itconv-fast lipschitz`: from a Python script defining `model` (or
    `build_model()`) and `example_input` (a tensor, or a function returning one), or from a training
    checkpoint (run directory or checkpoint.pt, read with weights_only=True; the example input is zeros of
    the run's image size). A script runs as Python code: only the user's own.

    Raises ModelScriptError when the script raises, ValueError (CheckpointError for a bad checkpoint) when
    the source is not usable; both one line naming the file.
    """
    if source.endswith(".py") and os.path.isfile(source):
        import runpy

        try:
            namespace = runpy.run_path(source, run_name="__itconv_lipschitz__")
            model = namespace.get("model")
            if model is None and callable(namespace.get("build_model")):
                model = namespace["build_model"]()
            example = namespace.get("example_input")
            if callable(example):
                example = example()
        except Exception as exc:  # anything the user's code raised, as one line
            raise ModelScriptError(f"{source}: the script raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"{source} defines neither `model` (an nn.Module) nor `build_model()`")
        if not isinstance(example, (torch.Tensor, tuple, list)):
            raise ValueError(f"{source} defines no `example_input` (a tensor, or a function returning one)")
        return model, example
    from ..io.checkpoint import load_checkpoint_state
    from ..models.iter_resnet import model_from_state
    from ..models.named import NamedModel, example_input

    path = os.path.join(source, "checkpoint.pt") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint.pt in {source}")
    state = load_checkpoint_state(path)
    model = model_from_state(state, path)
    if isinstance(model, NamedModel):  # fine-tuned by `train --model`: its network, at the run's input size
        run = state.get("config") if isinstance(state.get("config"), dict) else {}
        return model.network, example_input(model, run.get("image_size"), run.get("seq_len"))
    cfg = model.config
    return model, torch.zeros(1, cfg["in_channels"], cfg["input_size"], cfg["input_size"])


def load_named_source(
    spec: str,
    *,
    kwargs: Optional[dict] = None,
    weights: Optional[str] = None,
    pretrained: bool = False,
    image_size: Optional[int] = None,
    seq_len: Optional[int] = None,
):
    """(network, example input) of a model by name (models.named: `torchvision:resnet18`, `timm:...`, `hf:...`,
    `file.py:FUNCTION`) with the weights given (random ones drawn from seed 0 otherwise, the global generator left as
    it was); raises ModelNameError, CheckpointError or ValueError, one line."""
    from ..models.named import example_input, named_model

    model = named_model(spec, kwargs=kwargs, weights=weights, pretrained=pretrained, seed=0)
    return model.network.eval(), example_input(model, image_size, seq_len)
