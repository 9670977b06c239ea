"""Uniform, fork-free access to every detector family: features, losses, teacher losses, predictions.

The distiller and the engine never call ``model(images, targets)``; they run the pieces themselves so that the FPN
features are computed once and shared by the detection loss, the distillation terms and the teacher's instance
losses::

    images, targets = prepare_inputs(model, images, targets)   # model.transform + ignore boxes rescaled
    feats = extract_features(model, images)                     # OrderedDict of FPN levels, finest first
    losses = detection_losses(model, images, feats, targets)    # == torchvision's own training losses
    tl = teacher_losses(teacher, images, t_feats, targets)      # TeacherLosses(per_instance, per_level)
    dets = predict(model, images, feats)                        # boxes in input-tensor pixels

Each family implements the ``DetectorOps`` contract (``base.py``) in its own module (``retinanet.py``, ``fcos.py``,
``rcnn.py``, ``gfl.py``) and is found by the model's class: the four are registered below, more with
``register_family(model_cls, ops)``; subclasses of a registered class use its ops. No torchvision code is copied
into or patched on the model. Target checks, ``prepare_inputs`` and the ignore rule come from
``aidkd.models.targets``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

from aidkd.models.gfl import GFL
from aidkd.models.ops.base import (
    DetectorOps,
    TeacherLosses,
    anchor_focal_terms,
    feature_strides,
    level_index,
    per_instance_mean,
)
from aidkd.models.ops.fcos import FCOSOps
from aidkd.models.ops.gfl import GFLOps
from aidkd.models.ops.rcnn import FasterRCNNOps
from aidkd.models.ops.retinanet import RetinaNetOps
from aidkd.models.targets import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    box_centres,
    centres_in_boxes,
    check_targets,
    ignore_background,
    ignore_boxes_of,
    prepare_inputs,
    unwrap_model,
)

__all__ = [
    "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "DetectorOps", "FCOSOps", "FasterRCNNOps", "GFLOps", "RetinaNetOps",
    "TeacherLosses", "anchor_focal_terms", "assign_batch", "assign_locations", "box_centres", "centres_in_boxes", "check_targets",
    "decode_boxes", "detection_losses", "extract_features", "feature_strides", "get_ops", "head_outputs",
    "ignore_background", "ignore_boxes_of", "level_index", "per_instance_mean", "predict", "prepare_inputs",
    "register_family", "same_assignment", "teacher_loss_parts", "teacher_losses", "unwrap_model",
]

_REGISTRY: dict[type, DetectorOps] = {}


def register_family(model_cls: type, ops: DetectorOps) -> None:
    """Make ``ops`` the implementation for ``model_cls`` and its subclasses (a later call replaces an earlier one)."""
    if not isinstance(model_cls, type):
        raise TypeError(f"register_family expects a class, got {model_cls!r}")
    _REGISTRY[model_cls] = ops


register_family(RetinaNet, RetinaNetOps())
register_family(FCOS, FCOSOps())
register_family(FasterRCNN, FasterRCNNOps())
register_family(GFL, GFLOps())


def _lookup(cls: type) -> DetectorOps | None:
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def get_ops(model: nn.Module) -> DetectorOps:
    """The ``DetectorOps`` registered for ``model``'s class (or the nearest registered base class)."""
    cls = type(unwrap_model(model))
    ops = _lookup(cls)
    if ops is None:
        known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise TypeError(f"no detector ops registered for {cls.__name__}; known families: {known}. "
                        "Use aidkd.models.ops.register_family(model_cls, ops) to add one.")
    return ops


def extract_features(model: nn.Module, images: ImageList) -> OrderedDict[str, Tensor]:
    """FPN features of ``images`` (an ``ImageList`` from ``model.transform``), finest level first."""
    return get_ops(model).extract_features(unwrap_model(model), images)


def head_outputs(model: nn.Module, images: ImageList, features) -> dict[str, Any]:
    """Run the detector's head(s) on precomputed features (family-specific dict; reusable by the calls below)."""
    return get_ops(model).head_outputs(unwrap_model(model), images, features)


def _call(method, model, *args, outputs=None):
    # ``outputs`` is optional in the protocol: families that do not take it are called without it
    return method(model, *args) if outputs is None else method(model, *args, outputs)


def detection_losses(model: nn.Module, images: ImageList, features, targets: list[dict],
                     outputs: dict | None = None) -> dict[str, Tensor]:
    """The detector's training losses, equal to ``model(images, targets)`` in train mode (same keys and values)
    when no target has ``ignore_boxes``; with ignore boxes, background anchors/locations/proposals centred inside
    one are ignored. Faster R-CNN samples anchors and RoIs with torch's RNG, exactly as torchvision does."""
    check_targets(targets)
    return _call(get_ops(model).detection_losses, unwrap_model(model), images, features, targets, outputs=outputs)


def teacher_losses(model: nn.Module, images: ImageList, features, targets: list[dict],
                   outputs: dict | None = None) -> TeacherLosses:
    """Per-instance and per-level teacher losses (docs/method.md §3), computed under ``torch.no_grad()``."""
    check_targets(targets)
    with torch.no_grad():
        out = _call(get_ops(model).teacher_losses, unwrap_model(model), images, features, targets, outputs=outputs)
    return out if isinstance(out, TeacherLosses) else TeacherLosses(list(out.per_instance), out.per_level)


def teacher_loss_parts(model: nn.Module, images: ImageList, features, targets: list[dict],
                       outputs: dict | None = None) -> dict[str, list[Tensor]]:
    """The per-instance teacher losses split into their classification and box parts: ``{"cls": [Tensor[N_i]],
    "box": [Tensor[N_i]]}`` with ``cls + box == teacher_losses(...).per_instance`` up to rounding (for analysis;
    all four built-in families, see each family's ``teacher_loss_parts``). Raises ``NotImplementedError`` for a
    registered family that does not provide the split."""
    check_targets(targets)
    with torch.no_grad():
        return _call(get_ops(model).teacher_loss_parts, unwrap_model(model), images, features, targets, outputs=outputs)


def assign_locations(model: nn.Module, outputs: dict, targets: list[dict]) -> list[Tensor]:
    """The model's own assignment of its anchors / locations (``outputs`` from :func:`head_outputs`) to the boxes
    of ``targets``: per image Int64[A], box index, -1 background, -2 ignored (one-stage families)."""
    check_targets(targets)
    with torch.no_grad():
        return get_ops(model).assign(unwrap_model(model), outputs, targets)


def same_assignment(a: nn.Module, b: nn.Module) -> bool:
    """Whether two detectors assign the same anchors / locations to the same boxes whenever their feature sizes
    agree (same family, anchor settings and assigner): then one assignment per step serves both (put it in
    ``outputs["matched"]``, see :meth:`DetectorOps.assign_batch`)."""
    ops_a, ops_b = get_ops(a), get_ops(b)
    config = ops_a.assignment_config(unwrap_model(a))
    return ops_a is ops_b and config is not None and config == ops_b.assignment_config(unwrap_model(b))


def assign_batch(model: nn.Module, outputs: dict, targets: list[dict]) -> Tensor:
    """:func:`assign_locations` as one Int64[B, A] tensor (no gradient; ``targets`` as :func:`detection_losses`
    checks them)."""
    with torch.no_grad():
        return get_ops(model).assign_batch(unwrap_model(model), outputs, targets)


def decode_boxes(model: nn.Module, outputs: dict) -> Tensor:
    """[B, A, 4] xyxy input-tensor pixels: the box predicted at every anchor / location (one-stage families)."""
    return get_ops(model).decode_boxes(unwrap_model(model), outputs)


def predict(model: nn.Module, images: ImageList, features, outputs: dict | None = None) -> list[dict[str, Tensor]]:
    """Post-processed detections (boxes xyxy in input-tensor pixels, scores, labels); no ``transform.postprocess``."""
    return _call(get_ops(model).predict, unwrap_model(model), images, features, outputs=outputs)
