"""Models by name, as users of torchvision, timm and transformers name them:

    torchvision:resnet18    timm:vit_tiny_patch16_224    hf:gpt2 (or a local directory)    my_models.py:build

built by the library's own constructor (`torchvision.models.get_model`, `timm.create_model`, `transformers`'
`AutoModelForCausalLM`, or the script's function) with random weights, the library's pretrained weights when they
are already in its local cache (never a download: a missing file is a one-line error naming the cache), or a state
dict handed in (read with weights_only=True). `NamedModel` holds the network and its residual model (integrations.py)
in one module: its state_dict is the network's, under `network.`, and its `config` rebuilds it.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Optional

import torch
from torch import nn

from ..data.image_folder import ImagePreprocessing
from ..io.checkpoint import load_state_dict_file
from .integrations import SUPPORTED, residual_model
from .residual import check_residual_model

__all__ = [
    "LIBRARIES",
    "ModelNameError",
    "parse_model_name",
    "create_network",
    "NamedModel",
    "named_model",
    "image_preprocessing",
    "example_input",
    "load_tokenizer",
]

LIBRARIES = ("torchvision", "timm", "hf", "file")


class ModelNameError(ValueError):
    """A model name that cannot be built (unknown library or model, weights missing from the cache); one line."""


def parse_model_name(spec: str) -> tuple[str, str]:
    """(library, name): `torchvision:NAME`, `timm:NAME`, `hf:NAME_OR_PATH` or ("file", `path.py:FUNCTION`)."""
    library, sep, name = spec.partition(":")
    if sep and library in ("torchvision", "timm", "hf") and name:
        return library, name
    path, sep, function = spec.rpartition(":")
    if sep and path.endswith(".py") and function.isidentifier():
        return "file", spec
    raise ModelNameError(f"{spec!r}: expected torchvision:NAME, timm:NAME, hf:NAME_OR_PATH or path/to/file.py:FUNCTION")


def _import(library: str):
    module = {"torchvision": "torchvision.models", "timm": "timm", "hf": "transformers"}[library]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        pip = {"hf": "transformers"}.get(library, library)
        raise ModelNameError(f"{library}: models of this library need it installed (pip install {pip})") from None


def _torchvision(name: str, num_classes, kwargs: dict, pretrained: bool) -> nn.Module:
    models = _import("torchvision")
    if name not in models.list_models():
        raise ModelNameError(f"torchvision:{name}: no such model in torchvision {models.__name__} (list_models())")
    if not pretrained:
        return models.get_model(name, **kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
    weights = models.get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ModelNameError(
            f"torchvision:{name}: its pretrained weights are not in the local cache ({path}); "
            "fetch them once with torchvision, or pass --weights"
        )
    network = models.get_model(name, num_classes=len(weights.meta["categories"]), **kwargs)
    network.load_state_dict(load_state_dict_file(path))
    if num_classes is not None and num_classes != len(weights.meta["categories"]):
        if not isinstance(getattr(network, "fc", None), nn.Linear):
            raise ModelNameError(f"torchvision:{name}: cannot give it a new {num_classes}-class head (no `fc`)")
        network.fc = nn.Linear(network.fc.in_features, num_classes)
    return network


def _timm(name: str, num_classes, kwargs: dict, pretrained: bool) -> nn.Module:
    timm = _import("timm")
    if not timm.is_model(name):
        raise ModelNameError(f"timm:{name}: no such model in timm {timm.__version__} (timm.list_models())")
    network = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained:
        from huggingface_hub import constants, try_to_load_from_cache

        hub_id = network.pretrained_cfg.get("hf_hub_id")
        path = try_to_load_from_cache(hub_id, "model.safetensors", cache_dir=constants.HF_HUB_CACHE) if hub_id else None
        if not isinstance(path, str):
            raise ModelNameError(
                f"timm:{name}: its pretrained weights ({hub_id}) are not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); fetch them once with timm, or pass --weights"
            )
        network.load_state_dict(load_state_dict_file(path))
    if num_classes is not None and num_classes != network.num_classes:
        network.reset_classifier(num_classes)
    return network


def _hf(name: str, kwargs: dict, pretrained: bool) -> nn.Module:
    transformers = _import("hf")
    from huggingface_hub import constants

    try:
        if pretrained:
            return transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        return transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        where = name if os.path.isdir(name) else f"{name} (not a directory, nor in the cache {constants.HF_HUB_CACHE})"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNameError(f"hf:{where}: cannot load a causal language model: {first[:200]}") from None


def _file(spec: str, num_classes, kwargs: dict) -> nn.Module:
    import runpy

    path, _, function = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ModelNameError(f"{path}: no such file")
    try:
        namespace = runpy.run_path(path, run_name="__itconv_model__")
        build = namespace.get(function)
        if not callable(build):
            raise ModelNameError(f"{path} defines no function {function}()")
        accepts = inspect.signature(build).parameters
        extra = {"num_classes": num_classes} if num_classes is not None and "num_classes" in accepts else {}
        network = build(**kwargs, **extra)
    except ModelNameError:
        raise
    except Exception as exc:  # anything the user's code raised, as one line
        raise ModelNameError(f"{spec}: the script raised {type(exc).__name__}: {exc}") from None
    if not isinstance(network, nn.Module):
        raise ModelNameError(f"{spec}: returned a {type(network).__name__}, not an nn.Module")
    return network


def create_network(
    spec: str, *, num_classes: Optional[int] = None, kwargs: Optional[dict] = None, pretrained: bool = False
) -> nn.Module:
    """The library's network for a model name (parse_model_name). num_classes: the classifier's outputs (a new head
    on pretrained weights of another class count); kwargs: the constructor's keyword arguments (timm's
    `--model-kwargs`; a Hugging Face config's overrides). A script's FUNCTION runs as Python code: only the user's
    own. Raises ModelNameError, one line."""
    library, name = parse_model_name(spec)
    kwargs = dict(kwargs or {})
    try:
        if library == "torchvision":
            return _torchvision(name, num_classes, kwargs, pretrained)
        if library == "timm":
            return _timm(name, num_classes, kwargs, pretrained)
        if library == "hf":
            return _hf(name, kwargs, pretrained)
    except TypeError as exc:  # a keyword the constructor does not take
        raise ModelNameError(f"{spec}: {exc}") from None
    if pretrained:
        raise ModelNameError(f"{spec}: a script's model has no library weights; pass --weights")
    return _file(name, num_classes, kwargs)


class NamedModel(nn.Module):
    """A network and its residual model (the protocol of models/residual.py, which the measures, the coupler and
    the objectives read) in one module. The network is the only child, so state_dict(), parameters() and .to() are
    the network's; forward runs the residual model, which computes what the network computes."""

    def __init__(self, network: nn.Module, config: dict) -> None:
        super().__init__()
        self.network = network
        try:
            check_residual_model(network)
            stack = network
        except TypeError:
            try:
                stack = residual_model(network)
            except (TypeError, ValueError) as exc:
                raise ModelNameError(
                    f"{config.get('source', type(network).__name__)}: {type(network).__name__} cannot be wrapped as "
                    f"a residual model ({exc}). Supported: {SUPPORTED}, or a model with the residual-model protocol"
                ) from None
        object.__setattr__(self, "_stack", stack)  # not a child: its modules are the network's
        self.config = dict(config)

    stem = property(lambda self: self._stack.stem)
    stages = property(lambda self: self._stack.stages)
    transitions = property(lambda self: self._stack.transitions)
    head = property(lambda self: self._stack.head)

    def after_stage(self, z: torch.Tensor, s: int) -> torch.Tensor:
        return self._stack.after_stage(z, s)

    def coupling_groups(self) -> list:
        from ..nn.coupling import groups_from_blocks

        if hasattr(self._stack, "coupling_groups"):
            return self._stack.coupling_groups()
        return groups_from_blocks(*(stage.blocks for stage in self._stack.stages))

    def residual_layers(self) -> list:
        """(qualified name in this module, layer) of the layers inside the residual blocks (what --sn-mu bounds)."""
        inside = {id(m) for stage in self.stages for block in stage.blocks for m in block.modules()}
        return [(n, m) for n, m in self.named_modules() if id(m) in inside]

    def train(self, mode: bool = True):
        super().train(mode)
        self._stack.train(mode)  # the stack's own wrappers
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stack(x)


def named_model(
    spec: str,
    *,
    num_classes=None,
    kwargs=None,
    pretrained=False,
    weights: Optional[str] = None,
    sn=None,
    seed: Optional[int] = None,
) -> NamedModel:
    """create_network wrapped as a NamedModel; weights: a state dict file (load_state_dict_file: a network's state
    dict, or a NamedModel's / an itconv-fast checkpoint's, whose `network.` prefix is taken off); sn: {"mu", "mode"}
    of BatchedSpectralNorm on the layers inside the residual blocks, applied before the weights are loaded; seed:
    the random weights drawn from it, whoever calls (the global generator left as it was), else from the global
    generator."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return named_model(
                spec, num_classes=num_classes, kwargs=kwargs, pretrained=pretrained, weights=weights, sn=sn
            )
    network = create_network(spec, num_classes=num_classes, kwargs=kwargs, pretrained=pretrained)
    config = {"source": spec, "num_classes": num_classes, "kwargs": dict(kwargs or {}), "sn": sn}
    model = NamedModel(network, config)
    state = _weights_state(weights) if weights is not None else None
    normalised = state is not None and any(".parametrizations." in k for k in state)
    if normalised and sn is None:
        raise ValueError(
            f"{weights}: its weights are spectrally normalised (a run with --sn-mu): give the same "
            "--sn-mu, or measure the run's directory"
        )
    if state is not None and not normalised:  # plain weights: loaded, then normalised from there
        _load_state(model, state, weights)
    if sn is not None:
        apply_spectral_norm(model, sn["mu"], sn["mode"])
    if normalised:
        _load_state(model, state, weights)
    return model


def apply_spectral_norm(model: NamedModel, mu: float, mode: str):
    """BatchedSpectralNorm (drop-in, per layer) on every Linear / Conv layer inside the residual blocks."""
    from ..nn.batched import BatchedSpectralNorm

    names = {n for n, _ in model.residual_layers()}
    return BatchedSpectralNorm(model, mu=mu, mode=mode, include=lambda n, m: n in names)


def _weights_state(path: str) -> dict:
    """A state dict file (load_state_dict_file) as a network's: a NamedModel's `network.` prefix taken off."""
    state = load_state_dict_file(path)
    prefix = "network."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_state(model: NamedModel, state: dict, path: str) -> None:
    try:
        model.network.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])[:300]
        raise ValueError(f"{path}: its weights do not fit {model.config['source']} ({first})") from None


def image_preprocessing(model: NamedModel) -> ImagePreprocessing:
    """The eval transform the library gives the network: timm's data config (input size, crop_pct, interpolation,
    mean, std), torchvision's weights' transforms (their sizes and statistics; ImageNet's when the model has no
    weights), and ImageNet's 224 / 256 for a script's model."""
    library, name = parse_model_name(model.config["source"])
    if library == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model.network)
        fixed = getattr(getattr(model.network, "patch_embed", None), "img_size", None)  # a ViT built for its size
        size = fixed[-1] if fixed else cfg["input_size"][-1]
        return ImagePreprocessing(
            size,
            math.floor(size / cfg["crop_pct"]),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg["interpolation"] if cfg["interpolation"] in ("bicubic", "nearest") else "bilinear",
        )
    if library == "torchvision":
        from torchvision.models import get_model_weights

        try:
            t = get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError):  # a model without weights
            return ImagePreprocessing(224, 256)
        return ImagePreprocessing(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value)
    return ImagePreprocessing(224, 256)


def example_input(model: NamedModel, image_size: Optional[int] = None, seq_len: Optional[int] = None) -> torch.Tensor:
    """One input of the network, zeros (what `itconv-fast lipschitz` runs to find each layer's input size): token
    ids [1, seq_len (default 64)] for an `hf:` model; otherwise an image [1, C, S, S], C the first convolution's input
    channels (3 without one), S image_size or the crop of the model's preprocessing."""
    if parse_model_name(model.config["source"])[0] == "hf":
        return torch.zeros(1, seq_len or 64, dtype=torch.long)
    first = next((m for m in model.network.modules() if isinstance(m, nn.Conv2d)), None)
    side = image_size or image_preprocessing(model).size
    return torch.zeros(1, first.in_channels if first is not None else 3, side, side)


def load_tokenizer(model: NamedModel):
    """The tokenizer of an `hf:` model, from its directory or the local cache (ModelNameError when there is none)."""
    library, name = parse_model_name(model.config["source"])
    if library != "hf":
        raise ModelNameError(f"{model.config['source']}: text data needs a Hugging Face model (hf:NAME_OR_PATH)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNameError(f"hf:{name}: no tokenizer found beside the model ({first[:200]})") from None


def named_model_from_state(state: dict, where: str) -> NamedModel:
    """The NamedModel of a checkpoint already read (its model_config names the model), in eval mode. A script's
    model is not rebuilt from a checkpoint, which may come from elsewhere and would name the code to run: measure it
    with --model FILE.py:FUNCTION --weights CHECKPOINT."""
    from ..io.checkpoint import CheckpointError

    config = state["model_config"]
    source = config.get("source")
    try:
        library, _ = parse_model_name(source if isinstance(source, str) else "")
        if library == "file":
            raise CheckpointError(
                f"{where}: its model comes from a script ({source}), which a checkpoint does not run; measure it with "
                f"--model {source} --weights {where}"
            )
        model = named_model(
            source, num_classes=config.get("num_classes"), kwargs=config.get("kwargs"), sn=config.get("sn")
        )
        model.load_state_dict(state["model"])
    except (ModelNameError, TypeError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: its model cannot be rebuilt ({reason})") from None
    return model.eval()
