"""Detectors (torchvision RetinaNet / FCOS / Faster R-CNN and aidkd's GFL) and uniform access to their parts.

``build_detector`` builds one; ``aidkd.models.ops`` gives fork-free access to features, losses, per-instance teacher
losses and predictions for every family; ``aidkd.models.weights`` reads (once), checks, loads and writes weight files; ``load_detector``
rebuilds a trained detector from its file.
"""
from aidkd.models.backbones import BACKBONES, build_fpn_backbone
from aidkd.models.build import ARCHS, build_detector, load_detector
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
from aidkd.models.weights import (
    CheckpointError,
    NonFiniteCheckpointError,
    check_compatible,
    load_checkpoint,
    model_meta,
    read_weights,
    save_checkpoint,
    save_model_file,
)

__all__ = [
    "ARCHS", "BACKBONES", "CheckpointError", "DetectorOps", "NonFiniteCheckpointError", "TeacherLosses",
    "build_detector", "build_fpn_backbone", "check_compatible", "detection_losses", "extract_features",
    "feature_strides", "get_ops", "head_outputs", "load_checkpoint", "load_detector", "model_meta", "predict",
    "prepare_inputs", "read_weights", "register_family", "save_checkpoint", "save_model_file", "teacher_losses",
]
