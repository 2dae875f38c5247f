"""The models people use, as residual models in one call: a torchvision or timm ResNet, a timm VisionTransformer, and
a Hugging Face decoder (GPT-2, Llama-style). Each adapter wraps the model's own modules (not copies), so that
`compute_indices`, `analyze`, `GradientCoupler` and the objectives work on them, and reproduces the model's own
outputs (tested against the real libraries, with random weights).

    stack = residual_model(torchvision.models.resnet18())      # or timm / transformers models
    compute_indices(stack, (x, y)); GradientCoupler(stack, 0.5)

None of torchvision, timm or transformers is imported here: the adapters read the models' attributes.
"""

from __future__ import annotations

import torch
from torch import nn

from .residual import ResidualStack

__all__ = [
    "residual_model", "torchvision_resnet_adapter", "timm_resnet_adapter", "timm_vit_adapter", "hf_decoder_adapter",
    "SUPPORTED",
]  # fmt: skip

SUPPORTED = "torchvision and timm ResNets, timm VisionTransformers, Hugging Face GPT-2 and Llama-style decoders"


class _Call(nn.Module):
    """A module that calls a function of the wrapped model (for stems and heads made of several of its parts)."""

    def __init__(self, model: nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, x):
        return self._fn(self.model, x)


# ---------------------------------------------------------------------------------------------------------
# torchvision ResNet


def torchvision_resnet_adapter(model: nn.Module) -> ResidualStack:
    """A torchvision ResNet (18/34: BasicBlock, 50/101/152: Bottleneck) as 4 stages. Each block computes
    relu(z + F(z)); as a residual function f(z) = block(z) - z, so z + f(z) is the block exactly. A block that
    changes the shape (its `downsample`) cannot be a step of a stage: it is the transition into its stage (or the
    end of the stem for layer1 of the Bottleneck models), so stage s holds layer_s's same-shape blocks."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        if not hasattr(model, name):
            raise TypeError(f"torchvision_resnet_adapter: expected a torchvision ResNet (no {name!r})")
    stages, firsts = _resnet_stages([model.layer1, model.layer2, model.layer3, model.layer4])
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *([firsts[0]] if firsts[0] else []))
    transitions = [first if first is not None else nn.Identity() for first in firsts[1:]]
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return ResidualStack.from_layers(stem, stages, head, transitions)


def _resnet_stages(layers):
    """(stages of same-shape blocks, the shape-changing first block of each layer or None)."""

    def split(layer):
        first = layer[0] if getattr(layer[0], "downsample", None) is not None else None
        return first, [b for b in layer if b is not first]

    firsts, stages = zip(*(split(layer) for layer in layers))
    if any(not blocks for blocks in stages):
        raise ValueError("resnet adapter: every stage needs a block that keeps its shape")
    return [list(blocks) for blocks in stages], list(firsts)


def _timm_resnet_stem(resnet, x):
    return resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(x))))


def _timm_head(model, z):
    return model.forward_head(z)


def timm_resnet_adapter(model: nn.Module) -> ResidualStack:
    """A timm ResNet (`conv1`, `bn1`, `act1`, `maxpool`, `layer1..4`, `forward_head`) as 4 stages, split as
    torchvision_resnet_adapter splits torchvision's: each block computes act(z + F(z)), f(z) = block(z) - z; a block
    with a `downsample` is the transition into its stage."""
    for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4", "forward_head"):
        if not hasattr(model, name):
            raise TypeError(f"timm_resnet_adapter: expected a timm ResNet (no {name!r})")
    stages, firsts = _resnet_stages([model.layer1, model.layer2, model.layer3, model.layer4])
    stem = nn.Sequential(_Call(model, _timm_resnet_stem), *([firsts[0]] if firsts[0] else []))
    transitions = [first if first is not None else nn.Identity() for first in firsts[1:]]
    return ResidualStack.from_layers(stem, stages, _Call(model, _timm_head), transitions)


# ---------------------------------------------------------------------------------------------------------
# timm VisionTransformer


def _vit_stem(vit, x):
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _vit_head(vit, z):
    return vit.forward_head(vit.norm(z))


def timm_vit_adapter(model: nn.Module) -> ResidualStack:
    """A timm VisionTransformer as one stage of its blocks (each computes z + attention + MLP branches with its
    layer scales and drop paths; f(z) = block(z) - z). Stem: patch embedding, position embedding, pre-norm;
    head: the final norm, pooling and classifier (`forward_head`)."""
    for name in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"):
        if not hasattr(model, name):
            raise TypeError(f"timm_vit_adapter: expected a timm VisionTransformer (no {name!r})")
    return ResidualStack.from_layers(_Call(model, _vit_stem), [list(model.blocks)], _Call(model, _vit_head))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face decoders


class _DecoderLayer(nn.Module):
    """One Hugging Face decoder layer as z -> layer(z): the causal mask and (for rotary models) the position
    embeddings are made from z's sequence length, as the model's own forward makes them (no cache, no padding
    mask)."""

    def __init__(self, layer: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self._backbone = [backbone]  # not a submodule: the stack owns the backbone's parts once

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        backbone = self._backbone[0]
        positions = torch.arange(z.shape[1], device=z.device)[None]
        kwargs = {
            "attention_mask": create_causal_mask(
                config=backbone.config, inputs_embeds=z, attention_mask=None, cache=None, position_ids=positions
            ),
            "position_ids": positions,
        }
        if hasattr(backbone, "rotary_emb"):
            kwargs["position_embeddings"] = backbone.rotary_emb(z, position_ids=positions)
        out = self.layer(z, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _gpt2_stem(backbone, ids):
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    return backbone.drop(backbone.wte(ids) + backbone.wpe(positions))


def hf_decoder_adapter(model: nn.Module) -> ResidualStack:
    """A Hugging Face causal language model as one stage of its decoder layers: GPT-2 (`transformer.h`, token and
    position embeddings, `ln_f`) and Llama-style models (`model.layers`, token embeddings, rotary position
    embeddings, `norm`). Input: token ids [N, L]; output: the model's logits [N, L, vocabulary]."""
    head_layer = getattr(model, "lm_head", None)
    if head_layer is None:
        raise TypeError("hf_decoder_adapter: expected a Hugging Face causal language model (no lm_head)")
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
        backbone = model.transformer
        stem, layers, norm = _Call(backbone, _gpt2_stem), backbone.h, backbone.ln_f
    elif hasattr(model, "model") and hasattr(model.model, "layers"):  # Llama, Mistral, Qwen2, ...
        backbone = model.model
        stem, layers, norm = backbone.embed_tokens, backbone.layers, backbone.norm
    else:
        raise TypeError(
            f"hf_decoder_adapter: {type(model).__name__} is neither GPT-2-like (transformer.h) nor "
            "Llama-like (model.layers)"
        )
    return ResidualStack.from_layers(
        stem, [[_DecoderLayer(layer, backbone) for layer in layers]], nn.Sequential(norm, head_layer)
    )


def residual_model(model: nn.Module) -> ResidualStack:
    """The residual model of a torchvision or timm ResNet, a timm VisionTransformer or a Hugging Face decoder, in the
    model's train / eval mode (so that a measure that restores the stack's mode leaves the model's as it was)."""
    if hasattr(model, "layer4") and hasattr(model, "act1") and hasattr(model, "forward_head"):
        return timm_resnet_adapter(model).train(model.training)
    if hasattr(model, "layer4") and hasattr(model, "fc"):
        return torchvision_resnet_adapter(model).train(model.training)
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return timm_vit_adapter(model).train(model.training)
    if hasattr(model, "lm_head"):
        return hf_decoder_adapter(model).train(model.training)
    raise TypeError(
        f"residual_model: no adapter for {type(model).__name__} (supported: {SUPPORTED}); wrap it with ResidualStack"
    )
