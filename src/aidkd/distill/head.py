"""Head distillation: the student's head outputs imitate the teacher's, location by location (docs/method.md §6).

The distiller hands every head method a :class:`HeadInputs`: the student's head outputs, the teacher's head outputs
on the teacher's *own* features at the same anchors / locations (the pair shares strides, anchors and classes;
``Distiller`` refuses one that does not), and the student's own assignment of locations to ground-truth boxes (the
assigner it trains with). AID weights a location by the weight of the box it is assigned to, 1 on background
(``location_weights``), so a head term, unlike a global feature term, is selective per instance. With
``distill.aid.decoupled`` the classification terms take exp(-alpha D^T_cls) and the box terms exp(-alpha D^T_box).

Methods (``distill.methods`` names):

- ``logit_kd`` (every family): classification KD on all locations, the teacher's sigmoid scores as soft targets (the
  binary KL divergence per class; Faster R-CNN: the softmax KL of the RoI head on the student's proposals run
  through both RoI heads), and box KD on the positives (GIoU loss between the student's and the teacher's decoded
  boxes; FCOS adds the centre-ness binary KL). Each term is summed over locations and divided by the number of
  positive locations of the batch (Faster R-CNN: by the number of RoIs), as the detection losses are.
- ``ld`` (GFL): localization distillation (Zheng et al., CVPR 2022): the KL divergence between the teacher's and the
  student's box-edge distributions, softmax at temperature T (10), times T^2, averaged over the four edges, on the
  positives and the valuable localization region (``valuable_region``), / the number of positives, weight 0.25.
- ``cross_head`` (GFL, RetinaNet, FCOS): CrossKD's idea (Wang et al., CVPR 2024): the student's head-tower features
  run through the teacher's remaining head layers, and those predictions imitate the teacher's (``CrossHeadKD``).

AID weights enter linearly: a location (RoI) of weight w gets w times the gradient of the same location at weight 1.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, generalized_box_iou_loss

from aidkd.models.ops import decode_boxes

from .base import DistillInputs, DistillMethod, make_adapter


@dataclass
class HeadInputs:
    """What a head method sees for one batch (``DistillInputs.head``).

    student / teacher: the two detectors' head outputs (``aidkd.models.ops.head_outputs``); the teacher's on its own
    features, detached. matched: the student's assignment per image, Int64[A] (box index, -1 background, -2 ignored;
    ``None`` for Faster R-CNN, whose RoI head is matched on the proposals). cls_weights / box_weights: per image the
    (N_i,) AID weights of the instances for the classification / box terms (``None``: all 1);
    background_weights: (B,) weight of the locations of no instance (``None``: 1; AID image granularity sets it).
    """

    family: str
    student: dict
    teacher: dict
    matched: list[Tensor] | None
    targets: list[dict]
    student_model: nn.Module
    teacher_model: nn.Module
    images: ImageList
    student_features: OrderedDict
    teacher_features: OrderedDict
    cls_weights: list[Tensor] | None = None
    box_weights: list[Tensor] | None = None
    background_weights: Tensor | None = None


def location_weights(matched: list[Tensor], instance_weights: list[Tensor] | None,
                     background: Tensor | None = None) -> list[Tensor] | None:
    """Per image Float[A]: the weight of the instance each location is assigned to (``matched[b] >= 0``), the
    image's background weight (1 without ``background``) elsewhere; ``None`` when there are no weights at all."""
    if instance_weights is None and background is None:
        return None
    out = []
    for b, m in enumerate(matched):
        w = torch.ones(m.shape, dtype=torch.float32, device=m.device)
        if background is not None:
            w = w * background[b].detach().to(device=m.device, dtype=torch.float32)
        if instance_weights is not None and instance_weights[b].numel():
            iw = instance_weights[b].detach().to(device=m.device, dtype=torch.float32)
            w = torch.where(m >= 0, iw[m.clamp(min=0)], w)
        out.append(w)
    return out


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Elementwise KL(sigmoid(t / T) || sigmoid(s / T)) * T^2 of independent sigmoid outputs (the teacher detached):
    the soft-target BCE minus the teacher's own entropy, so 0 where the student matches."""
    t = teacher_logits.detach() / temperature
    s = student_logits / temperature
    p = t.sigmoid()
    kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
          - F.binary_cross_entropy_with_logits(t, p, reduction="none"))
    return kl * temperature ** 2


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) over the last dimension, times T^2 (the teacher detached)."""
    t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1) * temperature ** 2


def _weighted_sum(values: Tensor, weights: Tensor | None) -> Tensor:
    return values.sum() if weights is None else (values * weights).sum()


def valuable_region(anchors: Tensor, boxes: Tensor, matched: Tensor, fraction: float) -> Tensor:
    """Int64[A]: the positives' boxes (``matched``) plus the valuable localization region of one image: a location
    that is not positive belongs to box k when its anchor's IoU with k is at least ``fraction`` times the best IoU
    any anchor has with k (and > 0); of several such boxes, the one it overlaps most. -1 elsewhere."""
    if boxes.numel() == 0:
        return torch.where(matched >= 0, matched, torch.full_like(matched, -1))
    iou = box_iou(anchors, boxes.to(anchors.dtype))  # [A, N]
    best = iou.amax(dim=0)  # [N]
    eligible = (iou >= fraction * best[None, :]) & (iou > 0)
    value, owner = torch.where(eligible, iou, torch.full_like(iou, -1.0)).max(dim=1)
    region = torch.where(value >= 0, owner, torch.full_like(owner, -1))
    return torch.where(matched >= 0, matched, region)


def dense_head_kd(head: HeadInputs, predictions: dict[str, Tensor], decoder: nn.Module, *, temperature: float = 1.0,
                  edge_temperature: float | None = None) -> tuple[Tensor, Tensor]:
    """(L_cls, L_box) of one-stage ``predictions`` (the student's, or cross-head ones) against the teacher's outputs.

    L_cls: the binary KL to the teacher's scores, summed over classes and all locations; L_box, on the student's
    positives: the GIoU loss between the boxes ``decoder`` (a detector of the family) decodes from ``predictions``
    and the teacher's boxes (+ FCOS's centre-ness binary KL), or with ``edge_temperature`` (GFL) the edge-distribution
    KL (mean over the four edges). Both weighted per location (AID) and divided by the number of positives."""
    t = head.teacher
    matched = torch.stack(head.matched)  # [B, A]
    pos = matched >= 0
    num_pos = pos.sum().clamp(min=1).to(torch.float32)
    cls_w = location_weights(head.matched, head.cls_weights, head.background_weights)
    box_w = location_weights(head.matched, head.box_weights, head.background_weights)
    kl = binary_kl(predictions["cls_logits"].float(), t["cls_logits"].float(), temperature).sum(dim=-1)  # [B, A]
    cls = _weighted_sum(kl, None if cls_w is None else torch.stack(cls_w)) / num_pos
    if edge_temperature is not None:
        p_reg, t_reg = predictions["bbox_regression"][pos].float(), t["bbox_regression"][pos].float()
        box_terms = softmax_kl(p_reg.reshape(-1, 4, p_reg.shape[-1] // 4), t_reg.reshape(-1, 4, t_reg.shape[-1] // 4),
                               edge_temperature).mean(dim=-1)
    else:
        with torch.no_grad():
            teacher_boxes = decode_boxes(head.teacher_model, t)[pos]
        layout = {"anchors": head.student["anchors"], "num_per_level": head.student["num_per_level"]}
        box_terms = generalized_box_iou_loss(decode_boxes(decoder, {**predictions, **layout})[pos], teacher_boxes,
                                             reduction="none")
        if "bbox_ctrness" in predictions:  # FCOS: the centre-ness rates the box, so it is distilled with it
            box_terms = box_terms + binary_kl(predictions["bbox_ctrness"][pos][:, 0].float(),
                                              t["bbox_ctrness"][pos][:, 0].float())
    box = _weighted_sum(box_terms, None if box_w is None else torch.stack(box_w)[pos]) / num_pos
    return cls, box


class HeadDistillMethod(DistillMethod):
    """Base of the head methods: ``families`` lists the detector families it applies to (checked when the
    distiller is built); ``forward`` reads ``inputs.head``."""

    uses_head = True
    families: ClassVar[tuple[str, ...]] = ()

    def check_family(self, family: str) -> None:
        if family not in self.families:
            raise ValueError(f"distillation method {self.name!r} applies to {', '.join(self.families)} detectors; "
                             f"the student is a {family} detector")

    def check_pair(self, family: str, student: nn.Module, teacher: nn.Module) -> None:
        """Refuse a student / teacher pair this method cannot distil (called when the distiller is built)."""

    def _head(self, inputs: DistillInputs) -> HeadInputs:
        if inputs.head is None:
            raise ValueError(f"{self.name}: a head method needs the head outputs (DistillInputs.head), "
                             "which the Distiller provides")
        self.check_family(inputs.head.family)
        return inputs.head


class LogitKD(HeadDistillMethod):
    """``logit_kd``: ``{"cls": cls_weight * L_cls, "box": box_weight * L_box}`` (module docstring).

    Parameters
        cls_weight, box_weight: weights of the two terms (1, 1).
        temperature: of the classification KD (1: the teacher's own scores).
        num_rois: Faster R-CNN only: the student's top-scoring proposals per image distilled (512, torchvision's
            RoI batch per image).
    """

    name = "logit_kd"
    families = ("gfl", "retinanet", "fcos", "fasterrcnn")

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, *, cls_weight: float = 1.0,
                 box_weight: float = 1.0, temperature: float = 1.0, num_rois: int = 512) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        if not temperature > 0:
            raise ValueError(f"logit_kd: temperature must be > 0, got {temperature}")
        if int(num_rois) < 1:
            raise ValueError(f"logit_kd: num_rois must be >= 1, got {num_rois}")
        self.cls_weight, self.box_weight = float(cls_weight), float(box_weight)
        self.temperature, self.num_rois = float(temperature), int(num_rois)

    def extra_repr(self) -> str:
        return (f"cls_weight={self.cls_weight}, box_weight={self.box_weight}, temperature={self.temperature}, "
                f"num_rois={self.num_rois}")

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        head = self._head(inputs)
        cls, box = (self._roi_terms(head) if head.family == "fasterrcnn"
                    else dense_head_kd(head, head.student, head.student_model, temperature=self.temperature))
        return {"cls": self.cls_weight * cls, "box": self.box_weight * box}

    def _roi_terms(self, head: HeadInputs) -> tuple[Tensor, Tensor]:
        """Faster R-CNN: the student's top ``num_rois`` proposals per image through both RoI heads (each on its own
        features); softmax KL on every RoI, GIoU of the GT class's boxes on the RoIs the student's RoI matcher
        makes positive; both / the number of RoIs."""
        s_roi, t_roi = head.student_model.roi_heads, head.teacher_model.roi_heads
        proposals = [p.detach()[:self.num_rois] for p in head.student["proposals"]]
        sizes = head.images.image_sizes

        def run(roi, features):
            logits, regression = roi.box_predictor(roi.box_head(roi.box_roi_pool(features, proposals, sizes)))
            return logits.float(), regression.float().reshape(logits.shape[0], -1, 4)

        s_logits, s_reg = run(s_roi, head.student_features)
        with torch.no_grad():
            t_logits, t_reg = run(t_roi, head.teacher_features)
        matched, labels = [], []
        for p, target in zip(proposals, head.targets):
            if target["boxes"].numel() == 0:
                m = torch.full((p.shape[0],), -1, dtype=torch.int64, device=p.device)
            else:
                m = s_roi.proposal_matcher(box_iou(target["boxes"].to(p.dtype), p))
            matched.append(m)
            labels.append(torch.where(m >= 0, target["labels"][m.clamp(min=0)] if target["labels"].numel()
                                      else torch.zeros_like(m), torch.zeros_like(m)))
        all_matched, all_labels, all_props = torch.cat(matched), torch.cat(labels), torch.cat(proposals)
        num_rois = max(1, all_matched.numel())
        cls_w = location_weights(matched, head.cls_weights, head.background_weights)
        box_w = location_weights(matched, head.box_weights, head.background_weights)
        kl = softmax_kl(s_logits, t_logits, self.temperature)
        cls = _weighted_sum(kl, None if cls_w is None else torch.cat(cls_w)) / num_rois
        pos = torch.where(all_matched >= 0)[0]
        lab = all_labels[pos]
        s_boxes = s_roi.box_coder.decode_single(s_reg[pos, lab], all_props[pos])
        with torch.no_grad():
            t_boxes = t_roi.box_coder.decode_single(t_reg[pos, lab], all_props[pos])
        giou = generalized_box_iou_loss(s_boxes, t_boxes, reduction="none")
        box = _weighted_sum(giou, None if box_w is None else torch.cat(box_w)[pos]) / num_rois
        return cls, box


class LocalizationDistill(HeadDistillMethod):
    """``ld`` (GFL): ``{"ld": ld_weight * L_LD}`` (module docstring).

    Parameters
        ld_weight: 0.25 (the LD paper's GFL setting).
        temperature: of the edge-distribution softmax (10).
        vlr_fraction: a non-positive location is in box k's valuable localization region when its anchor's IoU with
            k is at least this fraction of the best IoU of any anchor with k (0.25).
    """

    name = "ld"
    families = ("gfl",)

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, *, ld_weight: float = 0.25,
                 temperature: float = 10.0, vlr_fraction: float = 0.25) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        if not temperature > 0:
            raise ValueError(f"ld: temperature must be > 0, got {temperature}")
        if not 0 < vlr_fraction <= 1:
            raise ValueError(f"ld: vlr_fraction must be in (0, 1], got {vlr_fraction}")
        self.ld_weight, self.temperature, self.vlr_fraction = float(ld_weight), float(temperature), float(vlr_fraction)

    def extra_repr(self) -> str:
        return f"ld_weight={self.ld_weight}, temperature={self.temperature}, vlr_fraction={self.vlr_fraction}"

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        head = self._head(inputs)
        s_reg, t_reg = head.student["bbox_regression"].float(), head.teacher["bbox_regression"].float()
        b, a, width = s_reg.shape
        edges = softmax_kl(s_reg.reshape(b, a, 4, width // 4), t_reg.reshape(b, a, 4, width // 4),
                           self.temperature).mean(dim=-1)  # [B, A]
        num_pos = sum(int((m >= 0).sum()) for m in head.matched)
        region = [valuable_region(anchors, target["boxes"], m, self.vlr_fraction)
                  for anchors, target, m in zip(head.student["anchors"], head.targets, head.matched)]
        weights = location_weights(region, head.box_weights, head.background_weights)
        inside = torch.stack(region) >= 0
        w = inside.to(edges.dtype) if weights is None else torch.stack(weights) * inside
        return {"ld": self.ld_weight * (edges * w).sum() / max(1, num_pos)}


# ---------------------------------------------------------------------------------------------------- cross-head
def _tower_blocks(tower: nn.Sequential) -> list[nn.Module]:
    """A head tower's conv blocks: each conv with the norm / activation after it (GFL and FCOS list them flat,
    torchvision's RetinaNet as ``Conv2dNormActivation`` blocks)."""
    blocks: list[list[nn.Module]] = []
    for module in tower:
        if isinstance(module, (nn.Conv2d, nn.Sequential)) or not blocks:
            blocks.append([module])
        else:
            blocks[-1].append(module)
    return [nn.Sequential(*b) if len(b) > 1 else b[0] for b in blocks]


def _head_branches(family: str, model: nn.Module) -> dict[str, tuple[list[nn.Module], object]]:
    """``{"cls": (tower blocks, predict), "box": (tower blocks, predict)}`` of a one-stage head: the tower's
    conv blocks in order, and ``predict(features, level) -> {output name: (B, C, H, W)}`` of the layers after it."""
    head = model.head
    if family == "gfl":
        return {"cls": (_tower_blocks(head.cls_convs), lambda x, level: {"cls_logits": head.cls_logits(x)}),
                "box": (_tower_blocks(head.reg_convs),
                        lambda x, level: {"bbox_regression": head.scales[level](head.bbox_reg(x))})}
    cls_head, reg_head = head.classification_head, head.regression_head
    if family == "retinanet":
        box = {"bbox_regression": lambda x: reg_head.bbox_reg(x)}
    elif family == "fcos":
        box = {"bbox_regression": lambda x: F.relu(reg_head.bbox_reg(x)), "bbox_ctrness": reg_head.bbox_ctrness}
    else:
        raise ValueError(f"cross_head: no head tower for the {family} family")
    return {"cls": (_tower_blocks(cls_head.conv), lambda x, level: {"cls_logits": cls_head.cls_logits(x)}),
            "box": (_tower_blocks(reg_head.conv), lambda x, level: {k: f(x) for k, f in box.items()})}


def _flatten_locations(maps: list[Tensor], per_location: int) -> Tensor:
    """Per level (B, A_l * per_location, H, W) -> (B, sum of H W A_l, per_location), torchvision's layout (anchor
    fastest, then x, then y), levels concatenated."""
    out = []
    for m in maps:
        b, _, h, w = m.shape
        out.append(m.view(b, -1, per_location, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, per_location))
    return torch.cat(out, dim=1)


class CrossHeadKD(HeadDistillMethod):
    """``cross_head`` (GFL, RetinaNet, FCOS): CrossKD's idea (Wang et al., CVPR 2024), written from the paper's
    description: the student's head-tower features after its first ``layer`` blocks go, through a 1x1 adapter when
    the widths differ, into the *teacher's* remaining tower blocks and predictors (frozen; the gradient flows through
    them to the student), and these cross-head predictions imitate the teacher's own:
    ``{"cls": cls_weight * L_cls, "box": box_weight * L_box}``; classification: the binary KL to the teacher's
    scores on all locations; boxes on the positives: the edge-distribution KL at ``box_temperature`` (GFL, as ``ld``)
    or the GIoU loss of the decoded boxes (+ centre-ness binary KL for FCOS). Both / the number of positives.

    Parameters
        layer: tower blocks of the student run before the teacher's take over (3 of GFL's / torchvision's 4).
        cls_weight, box_weight: 1, 1. box_temperature: GFL's edge distributions (10).
    """

    name = "cross_head"
    families = ("gfl", "retinanet", "fcos")

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, *, layer: int = 3,
                 cls_weight: float = 1.0, box_weight: float = 1.0, box_temperature: float = 10.0) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        if int(layer) < 0:
            raise ValueError(f"cross_head: layer must be >= 0, got {layer}")
        self.layer, self.cls_weight, self.box_weight = int(layer), float(cls_weight), float(box_weight)
        self.box_temperature = float(box_temperature)
        # the towers are as wide as the FPN: one adapter per branch, shared by the levels as the towers are
        self.adapters = nn.ModuleDict({branch: make_adapter(student_channels, teacher_channels)
                                       if student_channels != teacher_channels else nn.Identity()
                                       for branch in ("cls", "box")})

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", layer={self.layer}, cls_weight={self.cls_weight}, "
                f"box_weight={self.box_weight}, box_temperature={self.box_temperature}")

    def check_pair(self, family: str, student: nn.Module, teacher: nn.Module) -> None:
        for who, model in (("student", student), ("teacher", teacher)):
            for branch, (blocks, _) in _head_branches(family, model).items():
                if self.layer > len(blocks):
                    raise ValueError(f"cross_head: layer {self.layer} but the {who}'s {branch} tower has "
                                     f"{len(blocks)} blocks")

    def cross_outputs(self, head: HeadInputs) -> dict[str, Tensor]:
        """The cross-head predictions in the head's output layout (``cls_logits``, ``bbox_regression``, ...)."""
        s_branches = _head_branches(head.family, head.student_model)
        t_branches = _head_branches(head.family, head.teacher_model)
        feats = list(head.student_features.values())
        maps: dict[str, list[Tensor]] = {}
        for branch in ("cls", "box"):
            s_blocks, _ = s_branches[branch]
            t_blocks, predict = t_branches[branch]
            for level, x in enumerate(feats):
                for block in s_blocks[:self.layer]:
                    x = block(x)
                x = self.adapters[branch](x)
                for block in t_blocks[self.layer:]:
                    x = block(x)
                for key, value in predict(x, level).items():
                    maps.setdefault(key, []).append(value)
        width = {k: head.teacher[k].shape[-1] for k in maps}
        return {k: _flatten_locations(v, width[k]) for k, v in maps.items()}

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        head = self._head(inputs)
        cls, box = dense_head_kd(head, self.cross_outputs(head), head.teacher_model,
                                 edge_temperature=self.box_temperature if head.family == "gfl" else None)
        return {"cls": self.cls_weight * cls, "box": self.box_weight * box}
