"""FCOS: per-location loss terms from which both the training loss and the teacher's instance losses derive.

torchvision's loss (``FCOS.compute_loss`` + ``FCOSHead.compute_loss``) normalises by the number of foreground
locations in the whole *batch* (not per image):
  classification = sum over locations and classes of the sigmoid focal loss / max(1, num_fg)
  bbox_regression = sum over positive locations of the GIoU loss / max(1, num_fg)
  bbox_ctrness = sum over positive locations of the centre-ness BCE / max(1, num_fg)
``loss_terms`` keeps the per-location values; the matching is torchvision's (centre sampling radius, scale ranges,
smallest box wins), re-implemented here because torchvision inlines it in ``FCOS.compute_loss``.

Teacher: box k's loss is the mean over the locations assigned to k of (focal + GIoU + centre-ness BCE). FCOS does
not guarantee every box a location (boxes smaller than the stride, or whose size falls between scale ranges); such a
box gets the loss at the location nearest its centre on the level whose scale range fits it, treated as assigned to
it (centre-ness target clamped at 0 if that location lies outside the box). ``per_level`` is the loss of each
level's *positive* locations (focal + GIoU + centre-ness), normalised like the detector (by the batch's foreground
count); negatives are left out so that it measures how well the teacher fits the objects. ``teacher_loss_parts``
splits box k's loss into cls (focal) and box (GIoU + centre-ness BCE: centre-ness rates the location's place in the
box, a localisation term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

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


@dataclass
class FCOSTerms:
    matched_idxs: list[Tensor]  # Int64[A]: >= 0 assigned box, -1 background, -2 ignored
    cls: list[Tensor]  # Float[A]: focal loss summed over classes; 0 for ignored locations
    box: list[Tensor]  # Float[A]: GIoU loss; 0 off the positives
    ctrness: list[Tensor]  # Float[A]: centre-ness BCE; 0 off the positives
    num_per_level: list[int]


def centerness_target(ltrb: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)), each ratio clamped at 0 (matches torchvision for positives)."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    a = (lr.min(dim=-1).values / lr.max(dim=-1).values).clamp(min=0)
    b = (tb.min(dim=-1).values / tb.max(dim=-1).values).clamp(min=0)
    return torch.sqrt(a * b)


class FCOSOps(DetectorOps):
    family = "fcos"

    def head_outputs(self, model, images, features) -> dict:
        feats = list(features.values())
        out = model.head(feats)
        anchors = model.anchor_generator(images, feats)
        return {"cls_logits": out["cls_logits"], "bbox_regression": out["bbox_regression"],
                "bbox_ctrness": out["bbox_ctrness"], "anchors": anchors,
                "num_per_level": [f.shape[-2] * f.shape[-1] for f in feats]}

    def match(self, model, anchors: list[Tensor], targets: list[dict], num_per_level: list[int]) -> list[Tensor]:
        matched = []
        for anchors_i, t in zip(anchors, targets):
            gt_boxes = t["boxes"]
            if gt_boxes.numel() == 0:
                m = torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device)
            else:
                m = self._match_image(model, anchors_i, gt_boxes, num_per_level)
            matched.append(ignore_background(m, anchors_i, ignore_boxes_of(t)))
        return matched

    def assign(self, model, outputs: dict, targets) -> list[Tensor]:
        return self.match(model, outputs["anchors"], targets, outputs["num_per_level"])

    def decode_boxes(self, model, outputs: dict) -> Tensor:
        return model.head.box_coder.decode(outputs["bbox_regression"].float(), torch.stack(outputs["anchors"]))

    @staticmethod
    def _match_image(model, anchors: Tensor, gt_boxes: Tensor, num_per_level: list[int]) -> Tensor:
        # Same arithmetic as torchvision.models.detection.FCOS.compute_loss.
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        anchor_sizes = anchors[:, 2] - anchors[:, 0]
        pairwise_match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(
            dim=2).values < model.center_sampling_radius * anchor_sizes[:, None]
        x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
        x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
        pairwise_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
        pairwise_match &= pairwise_dist.min(dim=2).values > 0
        lower_bound = anchor_sizes * 4
        lower_bound[: num_per_level[0]] = 0
        upper_bound = anchor_sizes * 8
        upper_bound[-num_per_level[-1]:] = float("inf")
        pairwise_dist = pairwise_dist.max(dim=2).values
        pairwise_match &= (pairwise_dist > lower_bound[:, None]) & (pairwise_dist < upper_bound[:, None])
        gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        pairwise_match = pairwise_match.to(torch.float32) * (1e8 - gt_areas[None, :])
        min_values, matched_idx = pairwise_match.max(dim=1)
        matched_idx[min_values < 1e-5] = -1
        return matched_idx

    def _location_terms(self, model, outputs, i, idx: Tensor, gt_boxes: Tensor):
        """(GIoU loss, centre-ness BCE) of image i's locations ``idx`` against ``gt_boxes`` (one row each)."""
        coder = model.head.box_coder
        anchors = outputs["anchors"][i][idx]
        pred = coder.decode(outputs["bbox_regression"][i][idx].float(), anchors)
        giou = generalized_box_iou_loss(pred, gt_boxes, reduction="none")
        ctr_t = centerness_target(coder.encode(anchors, gt_boxes))
        ctr = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"][i][idx, 0].float(), ctr_t, reduction="none")
        return giou, ctr

    def loss_terms(self, model, images, features, targets, outputs=None) -> tuple[FCOSTerms, dict]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        matched = self.match(model, outputs["anchors"], targets, outputs["num_per_level"])
        cls_terms, box_terms, ctr_terms = [], [], []
        for i, (t, m) in enumerate(zip(targets, matched)):
            logits = outputs["cls_logits"][i].float()
            cls_terms.append(anchor_focal_terms(logits, m, t["labels"]))
            pos = torch.where(m >= 0)[0]
            giou, ctr = self._location_terms(model, outputs, i, pos, t["boxes"][m[pos]].float())
            zeros = logits.new_zeros(m.shape[0])
            box_terms.append(zeros.scatter(0, pos, giou))
            ctr_terms.append(zeros.scatter(0, pos, ctr))
        return FCOSTerms(matched, cls_terms, box_terms, ctr_terms, outputs["num_per_level"]), outputs

    @staticmethod
    def reduce(terms: FCOSTerms) -> dict[str, Tensor]:
        nfg = max(1, int(sum(int((m >= 0).sum()) for m in terms.matched_idxs)))
        return {"classification": torch.stack([c.sum() for c in terms.cls]).sum() / nfg,
                "bbox_regression": torch.stack([b.sum() for b in terms.box]).sum() / nfg,
                "bbox_ctrness": torch.stack([c.sum() for c in terms.ctrness]).sum() / nfg}

    def detection_losses(self, model, images, features, targets, outputs=None) -> dict[str, Tensor]:
        terms, _ = self.loss_terms(model, images, features, targets, outputs)
        return self.reduce(terms)

    def teacher_losses(self, model, images, features, targets, outputs=None) -> TeacherLosses:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        nfg = max(1, int(sum(int((m >= 0).sum()) for m in terms.matched_idxs)))
        L = len(terms.num_per_level)
        per_instance = per_instance_totals(*self._instance_terms(model, terms, outputs, targets))
        per_level = None
        for i, m in enumerate(terms.matched_idxs):
            total = terms.cls[i] + terms.box[i] + terms.ctrness[i]
            lvl = level_index(terms.num_per_level, total.device)
            pos = m >= 0
            pl = total.new_zeros(L).index_add(0, lvl[pos], total[pos])
            per_level = pl if per_level is None else per_level + pl
        return TeacherLosses(per_instance, per_level / nfg)

    def teacher_loss_parts(self, model, images, features, targets, outputs=None) -> dict[str, list[Tensor]]:
        """cls: the focal loss; box: GIoU + centre-ness BCE (centre-ness scores how well the location sits in the
        box, a localisation term, like GFL's DFL); same locations and fallback as :meth:`teacher_losses`."""
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        return per_instance_parts(*self._instance_terms(model, terms, outputs, targets))

    def _instance_terms(self, model, terms: FCOSTerms, outputs, targets):
        """The arguments of ``per_instance_totals`` / ``per_instance_parts``: per-location terms (in the order
        D^T adds them), matches, fallback."""
        per_location = [{"cls": c, "box": b, "ctrness": r} for c, b, r in zip(terms.cls, terms.box, terms.ctrness)]
        return per_location, terms.matched_idxs, targets, lambda i, which: self._fallback_terms(
            model, outputs, i, targets[i], which)

    def _fallback_terms(self, model, outputs, i, target, which: Tensor) -> dict[str, Tensor]:
        """Focal, GIoU and centre-ness loss at the location nearest each box's centre on the level whose FCOS scale
        range fits the box."""
        anchors = outputs["anchors"][i]
        num = outputs["num_per_level"]
        boxes = target["boxes"][which].float()
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = ((boxes[:, 2:] - boxes[:, :2]) / 2).max(dim=1).values  # max(l,t,r,b) at the centre
        starts = [0]
        for n in num[:-1]:
            starts.append(starts[-1] + n)
        sizes = torch.stack([anchors[s, 2] - anchors[s, 0] for s in starts])  # anchor size == stride per level
        upper = sizes * 8
        upper[-1] = float("inf")
        level = torch.clamp((half[:, None] >= upper[None, :]).sum(dim=1), max=len(num) - 1)
        idx = []
        a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
        for c, lv in zip(centres, level.tolist()):
            s, n = starts[lv], num[lv]
            d = (a_ctr[s:s + n] - c).abs().max(dim=1).values
            idx.append(s + int(d.argmin()))
        idx = torch.as_tensor(idx, device=anchors.device)
        focal = positive_focal_terms(outputs["cls_logits"][i][idx].float(), target["labels"][which])
        giou, ctr = self._location_terms(model, outputs, i, idx, boxes)
        return {"cls": focal, "box": giou, "ctrness": ctr}

    def predict(self, model, images, features, outputs=None) -> list[dict[str, Tensor]]:
        return self._postprocess_by_level(model, images, features, outputs, ("cls_logits", "bbox_regression", "bbox_ctrness"))
