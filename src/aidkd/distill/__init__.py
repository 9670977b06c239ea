"""Distillation methods (functional cores + thin modules) and the AID weighting that composes with any of them."""
from .aid import GRANULARITIES, AIDWeighting, AIDWeights, aid_weights, instance_pixel_weights
from .attention import AttentionDistill, attention_masks, attention_transfer_loss, masked_feature_loss
from .base import (
    DistillInputs,
    DistillMethod,
    box_cell_membership,
    box_cell_owner,
    make_adapter,
    weighted_batch_mean,
    weighted_norm,
)
from .fgd import (
    FGDDistill,
    GlobalContextBlock,
    fgd_attention_loss,
    fgd_feature_loss,
    fgd_global_loss,
    fgd_masks,
)
from .fitnet import FitNetDistill, fitnet_loss
from .nonlocal_kd import NonLocalBlock2d, NonLocalDistill, default_nonlocal_plan, nonlocal_loss
from .registry import METHODS, build_method, method_params, register_method

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "AIDWeighting",
    "AIDWeights",
    "AttentionDistill",
    "DistillInputs",
    "DistillMethod",
    "FGDDistill",
    "FitNetDistill",
    "GlobalContextBlock",
    "NonLocalBlock2d",
    "NonLocalDistill",
    "aid_weights",
    "attention_masks",
    "attention_transfer_loss",
    "box_cell_membership",
    "box_cell_owner",
    "build_method",
    "default_nonlocal_plan",
    "fgd_attention_loss",
    "fgd_feature_loss",
    "fgd_global_loss",
    "fgd_masks",
    "fitnet_loss",
    "instance_pixel_weights",
    "make_adapter",
    "masked_feature_loss",
    "method_params",
    "nonlocal_loss",
    "register_method",
    "weighted_batch_mean",
    "weighted_norm",
]
