"""Uniform, fork-free access to every detector family: features, losses, teacher losses, predictions.

The distiller and the engine never call ``model(images, targets)``; they run the pieces themselves so that the FPN
features are computed once and shared by the detection loss, the distillation terms and the teacher's instance
losses::

    images, targets = prepare_inputs(model, images, targets)   # model.transform + ignore boxes rescaled
    feats = extract_features(model, images)                     # OrderedDict of FPN levels, finest first
    losses = detection_losses(model, images, feats, targets)    # == torchvision's own training losses
    tl = teacher_losses(teacher, images, t_feats, targets)      # TeacherLosses(per_instance, per_level)
    dets = predict(model, images, feats)                        # boxes in input-tensor pixels

Each family (RetinaNet, FCOS, Faster R-CNN here; GFL in ``aidkd.models.gfl``) implements a ``DetectorOps``
subclass and is found by the model's class (``register_family(model_cls, ops)``; subclasses of a registered class
use its ops). No torchvision code is copied into or patched on the model.

Ignore regions (``target["ignore_boxes"]``, Float[M, 4] in input-tensor pixels): an anchor / location / RPN anchor /
RoI proposal that the detector's own matcher leaves as *background* and whose **centre lies inside an ignore box**
(borders included) becomes "ignored" (torchvision's ``BETWEEN_THRESHOLDS``, or label -1 for the samplers): it is
neither positive nor negative, so it adds no classification loss and is never sampled. Positives are never changed.
The centre rule was chosen over IoU because ignore regions (KITTI DontCare, crowds) are often much larger than the
anchors inside them, whose IoU with the region is then tiny.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

BELOW_LOW_THRESHOLD = -1  # background (torchvision Matcher)
BETWEEN_THRESHOLDS = -2  # ignored (torchvision Matcher)


def anchor_focal_terms(logits: Tensor, matched: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid focal loss per anchor / location (summed over classes), 0 where the matcher said "ignore".

    ``matched`` holds a ground-truth index for positives, -1 for background and ``BETWEEN_THRESHOLDS`` for ignored.
    Shared by the RetinaNet and FCOS ops, whose classification losses differ only in normalisation.
    """
    from torchvision.ops import sigmoid_focal_loss

    fg = matched >= 0
    gt = torch.zeros_like(logits)
    gt[fg, labels[matched[fg]]] = 1.0
    focal = sigmoid_focal_loss(logits, gt, reduction="none").sum(-1)
    return torch.where(matched != BETWEEN_THRESHOLDS, focal, torch.zeros_like(focal))


class TeacherLosses(NamedTuple):
    """The teacher's own detection loss, not reduced over instances.

    per_instance: one Tensor[N_i] per image, aligned with ``targets[i]["boxes"]`` (finite, >= 0).
    per_level: Tensor[L], the loss attributed to each FPN level for the whole batch (see each family's docs).
    """

    per_instance: list[Tensor]
    per_level: Tensor


class DetectorOps:
    """What every detector family provides. Subclasses implement the head-dependent methods.

    ``outputs`` (from ``head_outputs``) may be passed to ``detection_losses`` / ``teacher_losses`` / ``predict`` so
    that the head runs once; when omitted it is computed.
    """

    family = "base"

    def extract_features(self, model: nn.Module, images: ImageList) -> OrderedDict[str, Tensor]:
        feats = model.backbone(images.tensors)
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        return feats

    def feature_strides(self, images: ImageList, features: OrderedDict[str, Tensor]) -> list[int]:
        return feature_strides(images, features)

    def head_outputs(self, model: nn.Module, images: ImageList, features) -> dict[str, Any]:
        raise NotImplementedError

    def detection_losses(self, model: nn.Module, images: ImageList, features, targets: list[dict],
                         outputs: dict | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def teacher_losses(self, model: nn.Module, images: ImageList, features, targets: list[dict],
                       outputs: dict | None = None) -> TeacherLosses:
        raise NotImplementedError

    def teacher_loss_parts(self, model: nn.Module, images: ImageList, features, targets: list[dict],
                           outputs: dict | None = None) -> dict[str, list[Tensor]]:
        """Optional: ``per_instance`` of :meth:`teacher_losses` split into ``{"cls": [...], "box": [...]}``."""
        raise NotImplementedError(f"{type(self).__name__} does not split its teacher losses into cls / box parts")

    def predict(self, model: nn.Module, images: ImageList, features,
                outputs: dict | None = None) -> list[dict[str, Tensor]]:
        raise NotImplementedError


_REGISTRY: dict[type, DetectorOps] = {}
_BUILTINS_DONE = False


def register_family(model_cls: type, ops: DetectorOps) -> None:
    """Make ``ops`` the implementation for ``model_cls`` and its subclasses (a later call replaces an earlier one)."""
    if not isinstance(model_cls, type):
        raise TypeError(f"register_family expects a class, got {model_cls!r}")
    _REGISTRY[model_cls] = ops


def _ensure_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    from aidkd.models.fcos_ops import FCOSOps
    from aidkd.models.rcnn_ops import FasterRCNNOps
    from aidkd.models.retinanet_ops import RetinaNetOps

    _REGISTRY.setdefault(RetinaNet, RetinaNetOps())
    _REGISTRY.setdefault(FCOS, FCOSOps())
    _REGISTRY.setdefault(FasterRCNN, FasterRCNNOps())


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps in OptimizedModule (._orig_mod); DDP/DataParallel in .module
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None)
        if inner is None:
            return model
        model = inner
    return model


def _lookup(cls: type) -> DetectorOps | None:
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def get_ops(model: nn.Module) -> DetectorOps:
    """The ``DetectorOps`` registered for ``model``'s class (or the nearest registered base class)."""
    _ensure_builtins()
    cls = type(_unwrap(model))
    ops = _lookup(cls)
    if ops is None:
        try:  # GFL registers itself on import
            import aidkd.models.gfl  # noqa: F401
        except ImportError:
            pass
        ops = _lookup(cls)
    if ops is None:
        known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise TypeError(f"no detector ops registered for {cls.__name__}; known families: {known}. "
                        "Use aidkd.models.ops.register_family(model_cls, ops) to add one.")
    return ops


# ---------------------------------------------------------------------------------------------- public functions
def extract_features(model: nn.Module, images: ImageList) -> OrderedDict[str, Tensor]:
    """FPN features of ``images`` (an ``ImageList`` from ``model.transform``), finest level first."""
    return get_ops(model).extract_features(_unwrap(model), images)


def feature_strides(images: ImageList, features) -> list[int]:
    """Nominal stride (a power of two) of each feature level w.r.t. the input tensor.

    Equals the anchor generator's stride whenever the padded input size is divisible by the level's stride (always
    true up to P5 with torchvision's ``size_divisible=32``); for P6/P7 of inputs not divisible by 64/128, torchvision's
    anchors use ``size // feature_size`` instead, while the conv geometry is still the power of two returned here.
    """
    tensor = images.tensors if isinstance(images, ImageList) else images
    H, W = tensor.shape[-2:]
    out = []
    for f in (features.values() if isinstance(features, dict) else features):
        h, w = f.shape[-2:]
        ratio = max(H / max(h, 1), W / max(w, 1))
        out.append(int(2 ** round(math.log2(max(ratio, 1.0)))))
    return out


def head_outputs(model: nn.Module, images: ImageList, features) -> dict[str, Any]:
    """Run the detector's head(s) on precomputed features (family-specific dict; reusable by the calls below)."""
    ops = get_ops(model)
    if not hasattr(ops, "head_outputs"):
        raise NotImplementedError(f"{type(ops).__name__} does not expose head_outputs")
    return ops.head_outputs(_unwrap(model), images, features)


def _call(method, model, *args, outputs=None):
    # ``outputs`` is optional in the protocol: families that do not take it are called without it
    return method(model, *args) if outputs is None else method(model, *args, outputs)


def detection_losses(model: nn.Module, images: ImageList, features, targets: list[dict],
                     outputs: dict | None = None) -> dict[str, Tensor]:
    """The detector's training losses, equal to ``model(images, targets)`` in train mode (same keys and values)
    when no target has ``ignore_boxes``; with ignore boxes, background anchors/locations/proposals centred inside
    one are ignored. Faster R-CNN samples anchors and RoIs with torch's RNG, exactly as torchvision does."""
    check_targets(targets)
    return _call(get_ops(model).detection_losses, _unwrap(model), images, features, targets, outputs=outputs)


def teacher_losses(model: nn.Module, images: ImageList, features, targets: list[dict],
                   outputs: dict | None = None) -> TeacherLosses:
    """Per-instance and per-level teacher losses (method.md §3), computed under ``torch.no_grad()``."""
    check_targets(targets)
    with torch.no_grad():
        out = _call(get_ops(model).teacher_losses, _unwrap(model), images, features, targets, outputs=outputs)
    return out if isinstance(out, TeacherLosses) else TeacherLosses(list(out.per_instance), out.per_level)


def teacher_loss_parts(model: nn.Module, images: ImageList, features, targets: list[dict],
                       outputs: dict | None = None) -> dict[str, list[Tensor]]:
    """The per-instance teacher losses split into their classification and box parts: ``{"cls": [Tensor[N_i]],
    "box": [Tensor[N_i]]}`` with ``cls + box == teacher_losses(...).per_instance`` (for analysis; GFL and
    RetinaNet). Raises ``NotImplementedError`` for a family that does not provide the split."""
    check_targets(targets)
    with torch.no_grad():
        return _call(get_ops(model).teacher_loss_parts, _unwrap(model), images, features, targets, outputs=outputs)


def predict(model: nn.Module, images: ImageList, features, outputs: dict | None = None) -> list[dict[str, Tensor]]:
    """Post-processed detections (boxes xyxy in input-tensor pixels, scores, labels); no ``transform.postprocess``."""
    return _call(get_ops(model).predict, _unwrap(model), images, features, outputs=outputs)


def prepare_inputs(model: nn.Module, images: list[Tensor], targets: list[dict] | None = None
                   ) -> tuple[ImageList, list[dict] | None]:
    """``model.transform(images, targets)``, plus ``ignore_boxes`` rescaled like ``boxes``.

    torchvision's transform resizes ``boxes`` only; when the dataset already resized the image (the aidkd
    convention) the scale is 1 and this changes nothing, otherwise the ignore boxes would be in the wrong pixels.
    """
    model = _unwrap(model)
    sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, out = model.transform(images, targets)
    if out is not None:
        for t, old, new in zip(out, sizes, image_list.image_sizes):
            ign = t.get("ignore_boxes")
            if isinstance(ign, Tensor) and ign.numel() and tuple(old) != tuple(new):
                t["ignore_boxes"] = resize_boxes(ign.reshape(-1, 4).float(), old, new)
    return image_list, out


# ---------------------------------------------------------------------------------------------- shared helpers
def check_targets(targets: list[dict]) -> None:
    """Shape/consistency checks (torchvision's forward makes the same ones); raises ValueError."""
    if targets is None:
        raise ValueError("targets are required to compute losses")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a Float[N, 4] tensor, got "
                             f"{getattr(boxes, 'shape', type(boxes))}")
        labels = t.get("labels")
        if not isinstance(labels, Tensor) or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"target {i}: 'labels' must be an Int64[N] tensor with N = {boxes.shape[0]}")
        if boxes.numel():
            bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bool(bad.any()):
                j = int(torch.where(bad)[0][0])
                raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has no positive width and height")


def ignore_boxes_of(target: dict) -> Tensor | None:
    ign = target.get("ignore_boxes")
    if not isinstance(ign, Tensor) or ign.numel() == 0:
        return None
    return ign.reshape(-1, 4)


def centres_in_boxes(points: Tensor, boxes: Tensor, chunk: int = 65536) -> Tensor:
    """Bool[A]: whether each point (Float[A, 2], x y) lies inside any of ``boxes`` (Float[M, 4], borders count)."""
    out = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    if boxes.numel() == 0 or points.numel() == 0:
        return out
    boxes = boxes.to(points)
    for s in range(0, points.shape[0], chunk):
        p = points[s:s + chunk]
        x, y = p[:, 0:1], p[:, 1:2]
        inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])
        out[s:s + chunk] = inside.any(dim=1)
    return out


def box_centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def ignore_background(matched_idxs: Tensor, anchors: Tensor, ignore_boxes: Tensor | None) -> Tensor:
    """Matched indices with background (``-1``) entries centred inside an ignore box set to ``-2`` (ignored)."""
    if ignore_boxes is None:
        return matched_idxs
    inside = centres_in_boxes(box_centres(anchors), ignore_boxes)
    return torch.where((matched_idxs == BELOW_LOW_THRESHOLD) & inside,
                       torch.full_like(matched_idxs, BETWEEN_THRESHOLDS), matched_idxs)


def level_index(num_per_level: list[int], device) -> Tensor:
    """Int64[sum(num_per_level)]: the FPN level of each flattened anchor/location."""
    return torch.repeat_interleave(torch.arange(len(num_per_level), device=device),
                                   torch.as_tensor(num_per_level, device=device))


def per_instance_mean(values: Tensor, matched_idxs: Tensor, num_instances: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over the elements matched to each instance; returns (means Float[N], counts Int64[N])."""
    pos = matched_idxs >= 0
    idx = matched_idxs[pos]
    sums = values.new_zeros(num_instances).index_add(0, idx, values[pos])
    counts = torch.bincount(idx, minlength=num_instances)[:num_instances]
    return sums / counts.clamp(min=1).to(values.dtype), counts
