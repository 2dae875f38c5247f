"""Residual networks: the paper's `IterResNet` (ordinary, ICR, PCR) with its stage-wise spectral normalization,
the residual-model protocol that the measures read (`ResidualStack`, the transformer adapter), and the zoo of
torchvision-like ResNets used by benchmarks and examples. Builds on ops, nn and io.
"""

from . import zoo
from .integrations import (
    hf_decoder_adapter,
    residual_model,
    timm_resnet_adapter,
    timm_vit_adapter,
    torchvision_resnet_adapter,
)
from .iter_resnet import INITS, Block, IterResNet, Stage, Transition, load_checkpoint, model_from_state
from .named import ModelNameError, NamedModel, create_network, named_model, parse_model_name
from .residual import (
    LayerResidual,
    ResidualStack,
    check_residual_model,
    sequence_error,
    sequence_loss,
    transformer_encoder_adapter,
)
from .stage_spectral_norm import StageSpectralNorm, bn_scale, check_mu, fold_batchnorm

__all__ = [
    "IterResNet",
    "Stage",
    "Block",
    "Transition",
    "load_checkpoint",
    "model_from_state",
    "INITS",
    "StageSpectralNorm",
    "fold_batchnorm",
    "bn_scale",
    "check_mu",
    "ResidualStack",
    "LayerResidual",
    "transformer_encoder_adapter",
    "check_residual_model",
    "sequence_error",
    "sequence_loss",
    "zoo",
    "residual_model",
    "torchvision_resnet_adapter",
    "timm_vit_adapter",
    "timm_resnet_adapter",
    "NamedModel",
    "named_model",
    "create_network",
    "parse_model_name",
    "ModelNameError",
    "hf_decoder_adapter",
]
