"""The contract every detector family implements (``DetectorOps``), and the family-independent pieces they share.

Imports no family (like torchvision's ``detection/_utils.py``): ``aidkd.models.ops`` registers the families, the
family modules import this. Target checks, input preparation and the ignore rule live in ``aidkd.models.targets``
(the model files need them too).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from aidkd.models.anchor_cache import cached_anchors
from aidkd.models.targets import BETWEEN_THRESHOLDS, pad_per_image, per_level_values, unpad_per_image


def anchor_focal_terms(logits: Tensor, matched: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid focal loss per anchor / location (summed over classes), 0 where the matcher said "ignore".

    ``matched`` holds a ground-truth index for positives, -1 for background and ``BETWEEN_THRESHOLDS`` for ignored.
    Shared by the RetinaNet and FCOS ops, whose classification losses differ only in normalisation.
    """
    gt_classes = labels[matched.clamp(min=0)] if labels.numel() else torch.zeros_like(matched)
    return focal_terms(logits, matched, gt_classes)


def focal_terms(logits: Tensor, matched: Tensor, gt_classes: Tensor) -> Tensor:
    """:func:`anchor_focal_terms` with each element's class given (``gt_classes``, read where ``matched >= 0``);
    any leading shape (``[..., K]`` logits), e.g. a whole batch: one-hot targets by comparison, no host sync."""
    from torchvision.ops import sigmoid_focal_loss

    fg = matched >= 0
    classes = torch.arange(logits.shape[-1], device=logits.device)
    gt = ((gt_classes[..., None] == classes) & fg[..., None]).to(logits.dtype)
    focal = sigmoid_focal_loss(logits, gt, reduction="none").sum(-1)
    return torch.where(matched != BETWEEN_THRESHOLDS, focal, torch.zeros_like(focal))


def positive_focal_terms(logits: Tensor, labels: Tensor) -> Tensor:
    """:func:`anchor_focal_terms` of anchors / locations ``logits[k]`` each taken as a positive of class
    ``labels[k]`` (the teacher-loss fallback of a box nothing was assigned to)."""
    return anchor_focal_terms(logits, torch.arange(len(labels), device=logits.device), labels)


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

    # Head distillation (``aidkd.distill.head``): the one-stage families provide both; Faster R-CNN's RoI head is
    # distilled on proposals, not on a dense layout.
    def assign(self, model: nn.Module, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """The model's own assignment of its anchors / locations to the boxes of ``targets`` (the one its training
        loss uses): per image Int64[A], the box index, -1 background, -2 ignored background."""
        return list(self.assign_batch(model, outputs, targets).unbind(0))

    def assign_batch(self, model: nn.Module, outputs: dict, targets: list[dict]) -> Tensor:
        """:meth:`assign` as one Int64[B, A] tensor. ``outputs["matched"]``, when set (an assignment computed once
        per step and shared: :func:`aidkd.models.ops.same_assignment`), is used instead by every loss of the
        one-stage families."""
        raise NotImplementedError(f"{type(self).__name__} has no dense assignment of locations to boxes")

    def assignment_config(self, model: nn.Module) -> tuple | None:
        """Everything besides the input that :meth:`assign` depends on (anchor settings, assigner and its
        parameters), hashable; two models with equal configs assign the same locations to the same boxes at the same
        feature sizes. ``None`` (the default, and for an assigner or matcher this package does not know): never
        shared."""
        return None

    def decode_boxes(self, model: nn.Module, outputs: dict) -> Tensor:
        """[B, A, 4]: the box (xyxy, input-tensor pixels) the head predicts at every anchor / location."""
        raise NotImplementedError(f"{type(self).__name__} has no dense box predictions")

    def _postprocess_by_level(self, model: nn.Module, images: ImageList, features, outputs: dict | None,
                              keys: tuple[str, ...]) -> list[dict[str, Tensor]]:
        """``model.postprocess_detections`` on head outputs ``keys`` and anchors split per level (torchvision's
        RetinaNet / FCOS layout, which GFL follows)."""
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        split = outputs["num_per_level"]
        head = {k: list(outputs[k].split(split, dim=1)) for k in keys}
        anchors = [list(a.split(split)) for a in outputs["anchors"]]
        return model.postprocess_detections(head, anchors, images.image_sizes)

    # A box that no anchor / location was assigned to still needs a finite teacher loss: each family's
    # ``_fallback_terms(model, outputs, i, target, which, ...)`` (GFL: ``_fallback_parts``) scores boxes ``which`` of
    # image ``i`` at the anchor / location that would have been assigned (see the family module's docstring).


# ---------------------------------------------------------------------------------------------- shared helpers
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


def shared_anchors(anchor_generator, images: ImageList, features: list[Tensor]) -> list[Tensor]:
    """torchvision's ``AnchorGenerator(images, features)``, whose anchors depend only on the padded batch size and
    the feature sizes: built once and shared by every image (the same tensor), not once per image."""
    key = (tuple(images.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features), features[0].dtype,
           features[0].device)
    one = cached_anchors(anchor_generator, key, lambda: anchor_generator(
        ImageList(images.tensors, list(images.image_sizes[:1])), features)[0])
    return [one] * len(images.image_sizes)


def anchor_config(anchor_generator) -> tuple:
    """What torchvision's ``AnchorGenerator`` builds its anchors from (besides the feature and input sizes)."""
    return (type(anchor_generator).__name__, tuple(map(tuple, anchor_generator.sizes)),
            tuple(map(tuple, anchor_generator.aspect_ratios)))


def level_index(num_per_level: list[int], device) -> Tensor:
    """Int64[sum(num_per_level)]: the FPN level of each flattened anchor/location."""
    return per_level_values(range(len(num_per_level)), num_per_level, device, torch.int64)


def cls_box_split(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"cls": terms["cls"], "box": the sum of every other term}`` (FCOS's centre-ness counts as box)."""
    rest = [v for k, v in terms.items() if k != "cls"]
    return {"cls": terms["cls"], "box": sum(rest[1:], rest[0])}


def summed_terms(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"total": the terms summed in their order}`` (the order each family always added them in, so D^T keeps
    its bits)."""
    values = list(terms.values())
    return {"total": sum(values[1:], values[0])}


Fallback = Callable[[int, Tensor], dict[str, Tensor]]  # (image i, instances without elements) -> their terms


def per_instance_totals(per_element: list[dict[str, Tensor]], matched_idxs: list[Tensor], targets: list[dict],
                        fallback: Fallback | None) -> list[Tensor]:
    """Per image, Tensor[N_i]: each instance's mean over the elements (anchors / locations / RoIs) matched to it
    (``matched_idxs[i]`` >= 0) of the sum of its loss terms ``per_element[i]`` (a dict of Float[E_i], summed in
    order); an instance no element is matched to gets the sum of ``fallback(i, missing)`` (the same terms at the
    element that would have been its best). ``None``: every instance always has an element."""
    return _instance_term_means(per_element, matched_idxs, targets, fallback, summed_terms).get("total", [])


def per_instance_parts(per_element: list[dict[str, Tensor]], matched_idxs: list[Tensor], targets: list[dict],
                       fallback: Fallback | None) -> dict[str, list[Tensor]]:
    """:func:`per_instance_totals` split into ``{"cls": [...], "box": [...]}``: the same elements and fallback, the
    ``"cls"`` term as cls and every other term as box (:func:`cls_box_split`); ``cls + box`` equals the total up to
    rounding."""
    return {"cls": [], "box": [], **_instance_term_means(per_element, matched_idxs, targets, fallback, cls_box_split)}


def _instance_term_means(per_element, matched_idxs, targets, fallback: Fallback | None,
                         view: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> dict[str, list[Tensor]]:
    out: dict[str, list[Tensor]] = {}
    for i, (terms, matched, target) in enumerate(zip(per_element, matched_idxs, targets)):
        means, counts = {}, None
        for name, values in view(terms).items():
            means[name], counts = per_instance_mean(values, matched, target["boxes"].shape[0])
        missing = torch.where(counts == 0)[0]
        if missing.numel():
            if fallback is None:
                raise RuntimeError(f"image {i}: instances {missing.tolist()} have no matched element and no fallback")
            for name, values in view(fallback(i, missing)).items():
                means[name][missing] = values
        for name, values in means.items():
            out.setdefault(name, []).append(values)
    return out


BatchFallback = Callable[[Tensor, Tensor], dict[str, Tensor]]  # (boxes [B, M, 4], labels [B, M]) -> terms [B, M]


def batched_instance_terms(per_element: dict[str, Tensor], matched_idxs: Tensor, targets: list[dict],
                           fallback: BatchFallback, view: Callable[[dict[str, Tensor]], dict[str, Tensor]]
                           = summed_terms) -> dict[str, list[Tensor]]:
    """:func:`per_instance_totals` (``view=summed_terms``) / :func:`per_instance_parts` (``view=cls_box_split``)
    for families whose images share their elements: ``per_element`` ``{name: [B, E]}``, ``matched_idxs``
    ``[B, E]``; ``fallback`` scores every box of the padded batch (``[B, M, 4]`` boxes and ``[B, M]`` labels) at
    the element that would have been its best, and is used where a box has no matched element. The same numbers
    as the per-image helpers, in a fixed number of ops whatever the batch size, without host syncs."""
    sizes = [t["boxes"].shape[0] for t in targets]
    batch = matched_idxs.shape[0]
    boxes, _ = pad_per_image([t["boxes"] for t in targets])
    labels, _ = pad_per_image([t["labels"] for t in targets])
    num = boxes.shape[1]
    valid = matched_idxs >= 0
    slot = (matched_idxs.clamp(min=0) + num * torch.arange(batch, device=matched_idxs.device)[:, None]).flatten()
    terms = view(per_element)
    ref = next(iter(terms.values()))
    counts = ref.new_zeros(batch * num).index_add_(0, slot, valid.flatten().to(ref.dtype)).view(batch, num)
    fallback_terms = view(fallback(boxes, labels))
    out = {}
    for name, values in terms.items():
        sums = values.new_zeros(batch * num).index_add_(0, slot, torch.where(valid, values, 0.0).flatten())
        means = sums.view(batch, num) / counts.clamp(min=1)
        out[name] = unpad_per_image(torch.where(counts == 0, fallback_terms[name].to(means.dtype), means), sizes)
    return out


def per_instance_mean(values: Tensor, matched_idxs: Tensor, num_instances: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over the elements matched to each instance; returns (means Float[N], counts Int64[N])."""
    pos = matched_idxs >= 0
    idx = matched_idxs[pos]
    sums = values.new_zeros(num_instances).index_add(0, idx, values[pos])
    counts = torch.bincount(idx, minlength=num_instances)[:num_instances]
    return sums / counts.clamp(min=1).to(values.dtype), counts
