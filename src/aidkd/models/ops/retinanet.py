"""RetinaNet: per-anchor loss terms from which both the training loss and the teacher's instance losses derive.

torchvision's loss (``RetinaNetHead.compute_loss``) per image i:
  classification_i = sum over non-ignored anchors and all classes of the sigmoid focal loss / max(1, num_fg_i)
  bbox_regression_i = sum over positive anchors of the box loss (the head's ``_loss_type``) / max(1, num_fg_i)
and the batch loss is the mean over images. ``loss_terms`` keeps the per-anchor values (focal loss summed over
classes; box loss), so that

* ``detection_losses`` reduces them exactly like torchvision;
* the teacher's loss of box k is the mean over the anchors matched to k of (focal + box loss) (docs/method.md §3); a box
  with no matched anchor (possible only when its best anchor is taken by another box that overlaps it more) gets
  the loss of its best-IoU anchor treated as matched to it;
* the per-level loss is the loss of each level's *positive* anchors (focal + box), normalised like the detector (by
  the image's foreground count, then averaged over images); negatives are left out so that it measures how well the
  teacher fits the objects, like the per-instance loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from aidkd.models.ops.base import (
    DetectorOps,
    TeacherLosses,
    anchor_focal_terms,
    level_index,
    per_instance_parts,
    per_instance_totals,
    positive_focal_terms,
)
from aidkd.models.targets import (
    ignore_background,
    ignore_boxes_of,
)


def box_loss_per_element(loss_type: str, box_coder, anchors: Tensor, gt_boxes: Tensor, regression: Tensor,
                         beta: float = 1.0, eps: float = 1e-7) -> Tensor:
    """torchvision's ``_box_loss`` without the final sum: Float[P] (one value per positive anchor)."""
    if loss_type == "l1":
        target = box_coder.encode_single(gt_boxes, anchors)
        return F.l1_loss(regression, target, reduction="none").sum(-1)
    if loss_type == "smooth_l1":
        target = box_coder.encode_single(gt_boxes, anchors)
        return F.smooth_l1_loss(regression, target, reduction="none", beta=beta).sum(-1)
    pred = box_coder.decode_single(regression, anchors)
    if loss_type == "giou":
        return generalized_box_iou_loss(pred, gt_boxes, reduction="none", eps=eps)
    if loss_type == "ciou":
        return complete_box_iou_loss(pred, gt_boxes, reduction="none", eps=eps)
    if loss_type == "diou":
        return distance_box_iou_loss(pred, gt_boxes, reduction="none", eps=eps)
    raise ValueError(f"unsupported box loss {loss_type!r}")


@dataclass
class RetinaNetTerms:
    """Per-image, per-anchor loss terms (index i = image)."""

    matched_idxs: list[Tensor]  # Int64[A]: >= 0 matched box, -1 background, -2 ignored
    cls: list[Tensor]  # Float[A]: focal loss summed over classes; 0 for ignored anchors
    box: list[Tensor]  # Float[A]: box loss; 0 for non-positive anchors
    num_per_level: list[int]  # anchors per level (A = sum)


class RetinaNetOps(DetectorOps):
    family = "retinanet"

    # ------------------------------------------------------------------ head
    def head_outputs(self, model, images, features) -> dict:
        feats = list(features.values())
        out = model.head(feats)
        anchors = model.anchor_generator(images, feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        a = out["cls_logits"].shape[1] // sum(hw)
        return {"cls_logits": out["cls_logits"], "bbox_regression": out["bbox_regression"], "anchors": anchors,
                "num_per_level": [n * a for n in hw]}

    def match(self, model, anchors: list[Tensor], targets: list[dict]) -> list[Tensor]:
        matched = []
        for anchors_i, t in zip(anchors, targets):
            if t["boxes"].numel() == 0:
                m = torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device)
            else:
                m = model.proposal_matcher(box_ops.box_iou(t["boxes"], anchors_i))
            matched.append(ignore_background(m, anchors_i, ignore_boxes_of(t)))
        return matched

    def assign(self, model, outputs: dict, targets) -> list[Tensor]:
        return self.match(model, outputs["anchors"], targets)

    def decode_boxes(self, model, outputs: dict) -> Tensor:
        regression = outputs["bbox_regression"].float()
        anchors = torch.stack(outputs["anchors"]).to(regression.dtype)
        coder = model.head.regression_head.box_coder
        return coder.decode_single(regression.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(regression.shape)

    # ------------------------------------------------------------------ per-anchor terms
    def loss_terms(self, model, images, features, targets, outputs=None) -> tuple[RetinaNetTerms, dict]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        anchors = outputs["anchors"]
        matched = self.match(model, anchors, targets)
        reg_head = model.head.regression_head
        loss_type = getattr(reg_head, "_loss_type", "l1")
        cls_terms, box_terms = [], []
        for i, (t, m) in enumerate(zip(targets, matched)):
            logits = outputs["cls_logits"][i].float()
            cls_terms.append(anchor_focal_terms(logits, m, t["labels"]))
            pos = torch.where(m >= 0)[0]
            per = box_loss_per_element(loss_type, reg_head.box_coder, anchors[i][pos], t["boxes"][m[pos]],
                                       outputs["bbox_regression"][i][pos].float())
            box_terms.append(logits.new_zeros(m.shape[0]).scatter(0, pos, per))
        return RetinaNetTerms(matched, cls_terms, box_terms, outputs["num_per_level"]), outputs

    @staticmethod
    def reduce(terms: RetinaNetTerms) -> dict[str, Tensor]:
        cls, box = [], []
        for m, c, b in zip(terms.matched_idxs, terms.cls, terms.box):
            nfg = (m >= 0).sum().clamp(min=1).to(c.dtype)
            cls.append(c.sum() / nfg)
            box.append(b.sum() / nfg)
        n = max(1, len(cls))
        return {"classification": torch.stack(cls).sum() / n, "bbox_regression": torch.stack(box).sum() / n}

    # ------------------------------------------------------------------ public ops
    def detection_losses(self, model, images, features, targets, outputs=None) -> dict[str, Tensor]:
        terms, _ = self.loss_terms(model, images, features, targets, outputs)
        return self.reduce(terms)

    def teacher_losses(self, model, images, features, targets, outputs=None) -> TeacherLosses:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        per_instance = per_instance_totals(*self._instance_terms(model, terms, outputs, targets))
        L = len(terms.num_per_level)
        per_level = None
        for m, c, b in zip(terms.matched_idxs, terms.cls, terms.box):
            total = c + b
            lvl = level_index(terms.num_per_level, total.device)
            nfg = (m >= 0).sum().clamp(min=1).to(total.dtype)
            pos = m >= 0
            pl = total.new_zeros(L).index_add(0, lvl[pos], total[pos]) / nfg
            per_level = pl if per_level is None else per_level + pl
        return TeacherLosses(per_instance, per_level / max(1, len(targets)))

    def teacher_loss_parts(self, model, images, features, targets, outputs=None) -> dict[str, list[Tensor]]:
        """cls: the focal loss, box: the box loss, of the same anchors (and fallback) as :meth:`teacher_losses`."""
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        return per_instance_parts(*self._instance_terms(model, terms, outputs, targets))

    def _instance_terms(self, model, terms: RetinaNetTerms, outputs, targets):
        """The arguments of ``per_instance_totals`` / ``per_instance_parts``: per-anchor terms, matches, fallback."""
        per_anchor = [{"cls": c, "box": b} for c, b in zip(terms.cls, terms.box)]
        return per_anchor, terms.matched_idxs, targets, lambda i, which: self._fallback_terms(
            model, outputs, i, targets[i], which)

    def _fallback_terms(self, model, outputs, i, target, which: Tensor) -> dict[str, Tensor]:
        """Focal and box loss of boxes ``which`` at their best-IoU anchors, taken as matched to them."""
        anchors = outputs["anchors"][i]
        boxes = target["boxes"][which]
        best = box_ops.box_iou(boxes, anchors).argmax(dim=1)
        focal = positive_focal_terms(outputs["cls_logits"][i][best].float(), target["labels"][which])
        reg_head = model.head.regression_head
        box = box_loss_per_element(getattr(reg_head, "_loss_type", "l1"), reg_head.box_coder, anchors[best], boxes,
                                   outputs["bbox_regression"][i][best].float())
        return {"cls": focal, "box": box}

    def predict(self, model, images, features, outputs=None) -> list[dict[str, Tensor]]:
        return self._postprocess_by_level(model, images, features, outputs, ("cls_logits", "bbox_regression"))
