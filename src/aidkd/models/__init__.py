"""Detectors (torchvision RetinaNet / FCOS / Faster R-CNN and aidkd's GFL) and uniform access to their parts.

``build_detector`` builds one; ``aidkd.models.ops`` gives fork-free access to features, losses, per-instance teacher
losses and predictions for every family; ``aidkd.models.checkpoint`` reads and writes checkpoint files safely.
"""
from aidkd.models.backbones import BACKBONES, build_fpn_backbone
from aidkd.models.build import ARCHS, build_detector
from aidkd.models.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from aidkd.models.ops import (
    DetectorOps,
    TeacherLosses,
    detection_losses,
    extract_features,
    feature_strides,
    get_ops,
    head_outputs,
    predict,
    prepare_inputs,
    register_family,
    teacher_losses,
)

__all__ = [
    "ARCHS", "BACKBONES", "CheckpointError", "DetectorOps", "NonFiniteCheckpointError", "TeacherLosses",
    "build_detector", "build_fpn_backbone", "check_compatible", "detection_losses", "extract_features",
    "feature_strides", "get_ops", "head_outputs", "load_checkpoint", "predict", "prepare_inputs",
    "register_family", "save_checkpoint", "teacher_losses",
]
