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

from aidkd.models.gfl_losses import giou_loss
from aidkd.models.ops.base import (
    DetectorOps,
    TeacherLosses,
    anchor_config,
    batched_instance_terms,
    cls_box_split,
    focal_terms,
    level_index,
    positive_focal_terms,
    shared_anchors,
    summed_terms,
)
from aidkd.models.targets import ignore_background_batch, pad_per_image


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
        anchors = shared_anchors(model.anchor_generator, images, feats)
        return {"cls_logits": out["cls_logits"], "bbox_regression": out["bbox_regression"],
                "bbox_ctrness": out["bbox_ctrness"], "anchors": anchors,
                "num_per_level": [f.shape[-2] * f.shape[-1] for f in feats]}

    def match(self, model, anchors: list[Tensor], targets: list[dict], num_per_level: list[int]) -> list[Tensor]:
        return list(self._match_batch(model, anchors, targets, num_per_level).unbind(0))

    def _match_batch(self, model, anchors: list[Tensor], targets: list[dict], num_per_level: list[int]) -> Tensor:
        """:meth:`match` as one ``Int64[B, A]`` tensor, all images at once (boxes padded, a mask beside)."""
        anchors_t = torch.stack(anchors)  # [B, A, 4]
        boxes, valid = pad_per_image([t["boxes"].to(anchors_t) for t in targets])
        matched = self._match_padded(model, anchors_t, boxes, valid, num_per_level)
        return ignore_background_batch(matched, anchors_t, targets)

    def assign_batch(self, model, outputs: dict, targets) -> Tensor:
        if "matched" in outputs:
            return outputs["matched"]
        return self._match_batch(model, outputs["anchors"], targets, outputs["num_per_level"])

    def assignment_config(self, model) -> tuple | None:
        return ("fcos", anchor_config(model.anchor_generator), float(model.center_sampling_radius))

    def decode_boxes(self, model, outputs: dict) -> Tensor:
        return model.head.box_coder.decode(outputs["bbox_regression"].float(), torch.stack(outputs["anchors"]))

    @staticmethod
    def _match_image(model, anchors: Tensor, gt_boxes: Tensor, num_per_level: list[int]) -> Tensor:
        """One image's matches (``Int64[A]``; :meth:`_match_padded` with a batch of one)."""
        valid = torch.ones((1, gt_boxes.shape[0]), dtype=torch.bool, device=gt_boxes.device)
        return FCOSOps._match_padded(model, anchors[None], gt_boxes[None], valid, num_per_level)[0]

    @staticmethod
    def _match_padded(model, anchors: Tensor, gt_boxes: Tensor, valid: Tensor, num_per_level: list[int]) -> Tensor:
        # Same arithmetic as torchvision.models.detection.FCOS.compute_loss, with a batch dimension in front.
        gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
        anchor_centers = (anchors[..., :2] + anchors[..., 2:]) / 2  # [B, A, 2]
        anchor_sizes = anchors[..., 2] - anchors[..., 0]  # [B, A]
        pairwise_match = (anchor_centers[:, :, None, :] - gt_centers[:, None, :, :]).abs_().max(
            dim=3).values < model.center_sampling_radius * anchor_sizes[..., None]
        x, y = anchor_centers.unsqueeze(dim=3).unbind(dim=2)  # [B, A, 1]
        x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=1).unbind(dim=3)  # [B, 1, M]
        pairwise_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)
        pairwise_match &= pairwise_dist.min(dim=3).values > 0
        lower_bound = anchor_sizes * 4
        lower_bound[:, : num_per_level[0]] = 0
        upper_bound = anchor_sizes * 8
        upper_bound[:, -num_per_level[-1]:] = float("inf")
        pairwise_dist = pairwise_dist.max(dim=3).values
        pairwise_match &= (pairwise_dist > lower_bound[..., None]) & (pairwise_dist < upper_bound[..., None])
        pairwise_match &= valid[:, None, :]
        gt_areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
        pairwise_match = pairwise_match.to(torch.float32) * (1e8 - gt_areas[:, None, :])
        min_values, matched_idx = pairwise_match.max(dim=2)
        return torch.where(min_values < 1e-5, -1, matched_idx)

    def _location_terms(self, model, anchors: Tensor, regression: Tensor, ctrness: Tensor, gt_boxes: Tensor):
        """(GIoU loss, centre-ness BCE) of locations (their anchors and outputs) against ``gt_boxes``, one row each."""
        coder = model.head.box_coder
        pred = coder.decode(regression.float(), anchors)
        giou = giou_loss(pred, gt_boxes)
        ctr_t = centerness_target(coder.encode(anchors, gt_boxes))
        ctr = F.binary_cross_entropy_with_logits(ctrness.float(), ctr_t, reduction="none")
        return giou, ctr

    def loss_terms(self, model, images, features, targets, outputs=None) -> tuple[FCOSTerms, dict]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        matched = self.assign_batch(model, outputs, targets)  # [B, A]
        anchors = torch.stack(outputs["anchors"])
        boxes, _ = pad_per_image([t["boxes"] for t in targets])
        labels, _ = pad_per_image([t["labels"] for t in targets])
        index = matched.clamp(min=0)
        pos = matched >= 0
        cls = focal_terms(outputs["cls_logits"].float(), matched, labels.gather(1, index))
        # every location's GIoU and centre-ness, the non-positives' then zeroed (their target is their anchor, so
        # that the discarded values and gradients stay finite)
        gt_boxes = torch.where(pos[..., None], boxes.gather(1, index[..., None].expand(-1, -1, 4)).float(), anchors)
        giou, ctr = self._location_terms(model, anchors.flatten(0, 1), outputs["bbox_regression"].flatten(0, 1),
                                         outputs["bbox_ctrness"][..., 0].flatten(), gt_boxes.flatten(0, 1))
        box, ctr = (torch.where(pos, v.view_as(matched), 0.0) for v in (giou, ctr))
        return FCOSTerms(list(matched.unbind(0)), list(cls.unbind(0)), list(box.unbind(0)), list(ctr.unbind(0)),
                         outputs["num_per_level"]), outputs

    @staticmethod
    def reduce(terms: FCOSTerms) -> dict[str, Tensor]:
        nfg = (torch.stack(terms.matched_idxs) >= 0).sum().clamp(min=1)  # the batch's foreground count
        return {"classification": torch.stack(terms.cls).sum() / nfg,
                "bbox_regression": torch.stack(terms.box).sum() / nfg,
                "bbox_ctrness": torch.stack(terms.ctrness).sum() / nfg}

    def detection_losses(self, model, images, features, targets, outputs=None) -> dict[str, Tensor]:
        terms, _ = self.loss_terms(model, images, features, targets, outputs)
        return self.reduce(terms)

    def teacher_losses(self, model, images, features, targets, outputs=None) -> TeacherLosses:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        m = torch.stack(terms.matched_idxs)
        nfg = (m >= 0).sum().clamp(min=1)
        per_instance = self._instance_reduction(model, terms, outputs, targets, summed_terms)["total"]
        total = torch.stack(terms.cls) + torch.stack(terms.box) + torch.stack(terms.ctrness)
        lvl = level_index(terms.num_per_level, m.device)
        per_level = total.new_zeros(len(terms.num_per_level)).index_add_(
            0, lvl.repeat(m.shape[0]), torch.where(m >= 0, total, 0.0).flatten())
        return TeacherLosses(per_instance, per_level / nfg)

    def teacher_loss_parts(self, model, images, features, targets, outputs=None) -> dict[str, list[Tensor]]:
        """cls: the focal loss; box: GIoU + centre-ness BCE (centre-ness scores how well the location sits in the
        box, a localisation term, like GFL's DFL); same locations and fallback as :meth:`teacher_losses`."""
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        return self._instance_reduction(model, terms, outputs, targets, cls_box_split)

    def _instance_reduction(self, model, terms: FCOSTerms, outputs, targets, view) -> dict[str, list[Tensor]]:
        """Per box, the mean of its locations' terms (in the order D^T adds them; ``view``: their total or cls /
        box split), or the fallback where no location was assigned to it; batched over images."""
        per_location = {"cls": torch.stack(terms.cls), "box": torch.stack(terms.box),
                        "ctrness": torch.stack(terms.ctrness)}
        return batched_instance_terms(per_location, torch.stack(terms.matched_idxs), targets, lambda boxes, labels:
                                      self._fallback_terms_batch(model, outputs, boxes, labels), view)

    def _fallback_terms_batch(self, model, outputs, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Focal, GIoU and centre-ness loss of every box of the padded batch (``[B, M, 4]``) at the location nearest
        its centre on the level whose FCOS scale range fits the box: ``{name: [B, M]}``."""
        anchors = torch.stack(outputs["anchors"])  # [B, A, 4]
        num = outputs["num_per_level"]
        batch, count = boxes.shape[:2]
        boxes = boxes.float()
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
        half = ((boxes[..., 2:] - boxes[..., :2]) / 2).max(dim=-1).values  # max(l,t,r,b) at the centre
        starts = [sum(num[:lv]) for lv in range(len(num))]
        sizes = anchors[0, starts, 2] - anchors[0, starts, 0]  # anchor size == stride per level
        upper = torch.cat([sizes[:-1] * 8, torch.full_like(sizes[-1:], float("inf"))])
        level = torch.clamp((half[..., None] >= upper).sum(dim=-1), max=len(num) - 1)  # [B, M]
        # the nearest location of the box's level: other levels' distances set to infinity
        location_level = level_index(num, anchors.device)  # [A]
        a_ctr = (anchors[..., :2] + anchors[..., 2:]) / 2  # [B, A, 2]
        d = (a_ctr[:, None, :, :] - centres[:, :, None, :]).abs().max(dim=-1).values  # [B, M, A]
        d = torch.where(location_level == level[..., None], d, float("inf"))
        best = d.argmin(dim=-1)  # [B, M]
        rows = (best + anchors.shape[1] * torch.arange(batch, device=best.device)[:, None]).flatten()
        focal = positive_focal_terms(outputs["cls_logits"].flatten(0, 1)[rows].float(), labels.flatten())
        giou, ctr = self._location_terms(model, anchors.flatten(0, 1)[rows],
                                         outputs["bbox_regression"].flatten(0, 1)[rows],
                                         outputs["bbox_ctrness"][..., 0].flatten()[rows], boxes.flatten(0, 1))
        return {k: v.view(batch, count) for k, v in (("cls", focal), ("box", giou), ("ctrness", ctr))}

    def predict(self, model, images, features, outputs=None) -> list[dict[str, Tensor]]:
        return self._postprocess_by_level(model, images, features, outputs, ("cls_logits", "bbox_regression", "bbox_ctrness"))
