"""``build_detector``: torchvision RetinaNet / FCOS / Faster R-CNN (and aidkd's GFL) on a configurable FPN backbone."""
from __future__ import annotations

import inspect
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

from aidkd.models.backbones import BACKBONES, MOBILENETS, build_fpn_backbone
from aidkd.models.weights import (
    check_compatible,
    check_enum,
    enum_state,
    frozen_bn_in,
    is_local,
    load_state,
    read_model_file,
    read_weights,
)

log = logging.getLogger(__name__)

ARCHS = ("retinanet", "fcos", "fasterrcnn", "gfl")
_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "fasterrcnn": FasterRCNN}
# keyword arguments GeneralizedRCNNTransform takes (the detectors forward unknown kwargs to it, which would
# otherwise swallow typos silently)
_TRANSFORM_KWARGS = {"size_divisible", "fixed_size", "_skip_resize"}
# torchvision weights trained with BatchNorm eps 0 (torchvision's builders call overwrite_eps(model, 0.0) for them)
_EPS0_WEIGHTS = {"RetinaNet_ResNet50_FPN_Weights.COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"}


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    trainable_backbone_layers: int = 3,
    new_classes: bool = False,
    **detector_kwargs: Any,
) -> nn.Module:
    """Build a detector.

    Args:
        arch: ``retinanet`` | ``fcos`` | ``fasterrcnn`` | ``gfl``.
        backbone: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101`` | ``mobilenet_v3_large`` |
            ``mobilenet_v3_small``. RetinaNet, FCOS and GFL use FPN levels P3-P7; Faster R-CNN uses P2-P6.
        num_classes: number of classes *including* background (``len(classes) + 1``).
        min_size, max_size: the model transform's resize (the aidkd datasets resize to the same, so it is a no-op).
        fpn_channels: FPN (and head) width.
        weights: a local detector checkpoint (a state dict, or a dict with ``state_dict`` — an aidkd model file or a
            Lightning checkpoint; ``distiller.student.``/``model.``/... prefixes are stripped), or a torchvision
            weight enum name for the whole detector, e.g. ``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"`` (downloads;
            only when arch, backbone, ``fpn_channels=256`` and ``num_classes`` match it).
        backbone_weights: ImageNet weights for the trunk (local file or enum name, see ``build_fpn_backbone``).
        trainable_backbone_layers: trunk stages left trainable (ResNet 0-5; MobileNetV3 0-6).
        new_classes: ``weights`` come from a detector of another class set (fine-tuning, e.g. COCO weights for
            KITTI): every tensor whose shape fits is loaded and the class-dependent output layers whose shapes
            differ keep their fresh initialisation (named in a warning). Off: any mismatch is an error.
        **detector_kwargs: passed to the torchvision detector constructor (e.g. ``score_thresh``,
            ``detections_per_img``, ``fg_iou_thresh``, ``rpn_batch_size_per_image``) or to ``build_gfl``; plus
            ``frozen_bn`` (bool; default: frozen BatchNorm when ``backbone_weights`` or ``weights`` are given,
            trainable BatchNorm otherwise — torchvision's rule) and, for RetinaNet, ``bbox_loss``
            (``l1`` default, ``smooth_l1``, ``giou``, ``diou``, ``ciou``).

    The returned model carries ``model.aidkd_meta = {arch, backbone, num_classes, fpn_channels, frozen_bn}``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background + at least one class), got {num_classes!r}")
    if not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"fpn_channels must be a positive int, got {fpn_channels!r}")
    kwargs = dict(detector_kwargs)
    frozen_bn = kwargs.pop("frozen_bn", None)
    bbox_loss = kwargs.pop("bbox_loss", None)
    if bbox_loss is not None and arch != "retinanet":
        raise ValueError(f"bbox_loss is a RetinaNet option; {arch} has a fixed box loss")

    local = enum_name = None
    if weights is not None:
        if is_local(weights):
            local = read_weights(weights)
        else:
            enum_name = str(weights)
            check_enum(enum_name, arch, backbone, None if new_classes else num_classes, fpn_channels)
    if local is not None and local.meta is not None:  # refused before anything is built
        expected = {"arch": arch, "backbone": backbone, "fpn_channels": fpn_channels}
        check_compatible(local.meta, expected if new_classes else {**expected, "num_classes": num_classes},
                         None, None, source=f"weights {local.source}")
    if frozen_bn is None:
        if local is not None:  # follow the checkpoint
            frozen_bn = frozen_bn_in(local.state)
        else:
            frozen_bn = backbone_weights is not None or enum_name is not None
    max_layers = 6 if backbone in MOBILENETS else 5
    if not 0 <= trainable_backbone_layers <= max_layers:
        raise ValueError(f"trainable_backbone_layers must be in [0, {max_layers}] for {backbone}, "
                         f"got {trainable_backbone_layers}")

    if arch == "gfl":
        from aidkd.models.gfl import build_gfl

        _check_kwargs(build_gfl, kwargs, arch, extra=set())
        model = build_gfl(backbone=backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                          fpn_channels=fpn_channels, backbone_weights=backbone_weights,
                          trainable_backbone_layers=trainable_backbone_layers, frozen_bn=frozen_bn, **kwargs)
    else:
        cls = _CLASSES[arch]
        anchor_size = kwargs.pop("anchor_size", None)
        if anchor_size is not None:
            kwargs.update(_anchor_generator(arch, float(anchor_size)))
        _check_kwargs(cls.__init__, kwargs, arch, extra=_TRANSFORM_KWARGS)
        levels = "p2p6" if arch == "fasterrcnn" else "p3p7"
        body = build_fpn_backbone(backbone, levels=levels, out_channels=fpn_channels, weights=backbone_weights,
                                  trainable_layers=trainable_backbone_layers, frozen_bn=frozen_bn)
        if arch == "retinanet":
            if bbox_loss is not None and "head" not in kwargs:
                if bbox_loss not in {"l1", "smooth_l1", "giou", "diou", "ciou"}:
                    raise ValueError(f"unknown bbox_loss {bbox_loss!r}; choose l1, smooth_l1, giou, diou or ciou")
                anchor_gen = kwargs.setdefault("anchor_generator", _default_anchorgen())
                head = RetinaNetHead(fpn_channels, anchor_gen.num_anchors_per_location()[0], num_classes)
                head.regression_head._loss_type = bbox_loss
                kwargs["head"] = head
        elif arch == "fcos" and fpn_channels % 32 and "head" not in kwargs:
            kwargs["head"] = _fcos_head(fpn_channels, num_classes)
        model = cls(body, num_classes, min_size=min_size, max_size=max_size, **kwargs)

    if local is not None:
        load_state(model, local.state, local.source, new_classes)
    elif enum_name is not None:
        load_state(model, enum_state(enum_name), enum_name, new_classes)
        if enum_name in _EPS0_WEIGHTS:
            overwrite_eps(model, 0.0)
    model.aidkd_meta = {"arch": arch, "backbone": backbone, "num_classes": num_classes,
                        "fpn_channels": fpn_channels, "frozen_bn": bool(frozen_bn)}
    return model


# ---------------------------------------------------------------------------------------------- helpers
def _anchor_generator(arch: str, size: float) -> dict:
    """Anchors whose finest level has side ``size`` px, doubling per level (torchvision's defaults use 32).

    Small inputs (e.g. 96-px-high driving crops) need smaller anchors than torchvision's COCO defaults.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    bases = [size * 2 ** i for i in range(5)]
    if arch == "retinanet":
        sizes = tuple(tuple(round(b * 2 ** (k / 3)) for k in range(3)) for b in bases)
        return {"anchor_generator": AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)}
    if arch == "fasterrcnn":
        return {"rpn_anchor_generator": AnchorGenerator(tuple((int(b),) for b in bases), ((0.5, 1.0, 2.0),) * 5)}
    if arch == "fcos":
        return {"anchor_generator": AnchorGenerator(tuple((int(b),) for b in bases), ((1.0,),) * 5)}
    raise ValueError(f"anchor_size is not supported for {arch}")


def _fcos_head(channels: int, num_classes: int) -> FCOSHead:
    """FCOS head for a width not divisible by 32: GroupNorm with gcd(32, channels) groups."""
    norm = partial(nn.GroupNorm, math.gcd(32, channels))
    head = FCOSHead(32, 1, num_classes, num_convs=0)  # box coder etc.; both branches are replaced below
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)
    return head


def _check_kwargs(fn, kwargs: dict, arch: str, extra: set[str]) -> None:
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    named -= {"self", "backbone", "num_classes", "min_size", "max_size", "fpn_channels", "backbone_weights",
              "trainable_backbone_layers", "frozen_bn"}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()) or extra:
        unknown = sorted(set(kwargs) - named - extra)
        if unknown:
            raise ValueError(f"unknown {arch} option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(named | extra | {'frozen_bn'}))}")


def load_detector(path: str | Path, classes: list[str] | None = None, arch: str | None = None,
                  backbone: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild and load a trained detector from an aidkd model file or Lightning checkpoint (read once), refusing
    it when its classes / arch / backbone differ from the ones asked for (``None``: not checked).

    Returns ``(model, meta)``; ``meta`` is the file's (see ``aidkd.models.weights.model_meta``).
    """
    weights = read_model_file(path)
    meta = weights.meta
    asked = {k: v for k, v in (("arch", arch), ("backbone", backbone)) if v is not None}
    check_compatible(meta, asked, meta["classes"], classes, source=path)
    # built from the file's own metadata, so the only check is the one above; then its tensors are loaded
    frozen_bn = meta.get("frozen_bn")
    model = build_detector(meta["arch"], meta["backbone"], meta["num_classes"], min_size=meta["min_size"],
                           max_size=meta["max_size"], fpn_channels=meta["fpn_channels"],
                           frozen_bn=frozen_bn_in(weights.state) if frozen_bn is None else frozen_bn,
                           **meta.get("kwargs", {}))
    load_state(model, weights.state, weights.source)
    return model, meta
