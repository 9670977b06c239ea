"""Distillation methods (functional cores + thin modules) and the AID weighting that composes with any of them."""
from .aid import GRANULARITIES, AIDWeighting, AIDWeights, aid_weights, instance_pixel_weights
from .attention import AttentionDistill, attention_masks, attention_transfer_loss, masked_feature_loss
from .base import (
    REDUCTIONS,
    REFERENCE_BATCH,
    REFERENCE_CHANNELS,
    REFERENCE_INPUT,
    DistillInputs,
    DistillMethod,
    box_cell_membership,
    box_cell_owner,
    make_adapter,
    reference_cells,
    root_sum_squares,
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
from .pkd import PKDDistill, channel_standardise, pkd_loss
from .registry import METHODS, build_method, method_params, register_method

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "REDUCTIONS",
    "REFERENCE_BATCH",
    "REFERENCE_CHANNELS",
    "REFERENCE_INPUT",
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
    "PKDDistill",
    "aid_weights",
    "attention_masks",
    "attention_transfer_loss",
    "box_cell_membership",
    "box_cell_owner",
    "build_method",
    "channel_standardise",
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
    "pkd_loss",
    "reference_cells",
    "register_method",
    "root_sum_squares",
    "weighted_batch_mean",
    "weighted_norm",
]
