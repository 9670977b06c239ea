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
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss

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
from aidkd.models.targets import (
    batched_box_iou,
    ignore_background,
    ignore_background_batch,
    ignore_boxes_of,
    match_batch,
    pad_per_image,
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
    if loss_type == "giou":  # torchvision's arithmetic, without its host syncs
        return giou_loss(pred, gt_boxes, eps=eps)
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
        anchors = shared_anchors(model.anchor_generator, images, feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        a = out["cls_logits"].shape[1] // sum(hw)
        return {"cls_logits": out["cls_logits"], "bbox_regression": out["bbox_regression"], "anchors": anchors,
                "num_per_level": [n * a for n in hw]}

    def match(self, model, anchors: list[Tensor], targets: list[dict]) -> list[Tensor]:
        return list(self._match_batch(model, anchors, targets).unbind(0))

    def _match_batch(self, model, anchors: list[Tensor], targets: list[dict]) -> Tensor:
        """:meth:`match` as one ``Int64[B, A]`` tensor: batched over images (padded boxes) for torchvision's
        ``Matcher``, per image for another matcher."""
        matcher = model.proposal_matcher
        if type(matcher) is det_utils.Matcher and len({a.shape for a in anchors}) == 1:
            anchors_t = torch.stack(anchors)
            boxes, valid = pad_per_image([t["boxes"].to(anchors_t) for t in targets])
            matched = match_batch(matcher, batched_box_iou(boxes, anchors_t), valid)
            return ignore_background_batch(matched, anchors_t, targets)
        matched = []
        for anchors_i, t in zip(anchors, targets):
            if t["boxes"].numel() == 0:
                m = torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device)
            else:
                m = matcher(box_ops.box_iou(t["boxes"], anchors_i))
            matched.append(ignore_background(m, anchors_i, ignore_boxes_of(t)))
        return torch.stack(matched)

    def assign_batch(self, model, outputs: dict, targets) -> Tensor:
        return outputs["matched"] if "matched" in outputs else self._match_batch(model, outputs["anchors"], targets)

    def assignment_config(self, model) -> tuple | None:
        m = model.proposal_matcher
        if type(m) is not det_utils.Matcher:
            return None
        return ("retinanet", anchor_config(model.anchor_generator), m.high_threshold, m.low_threshold,
                m.allow_low_quality_matches)

    def decode_boxes(self, model, outputs: dict) -> Tensor:
        regression = outputs["bbox_regression"].float()
        anchors = torch.stack(outputs["anchors"]).to(regression.dtype)
        coder = model.head.regression_head.box_coder
        return coder.decode_single(regression.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(regression.shape)

    # ------------------------------------------------------------------ per-anchor terms
    def loss_terms(self, model, images, features, targets, outputs=None) -> tuple[RetinaNetTerms, dict]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        anchors = torch.stack(outputs["anchors"])  # [B, A, 4]
        matched = outputs["matched"] if "matched" in outputs else self._match_batch(model, outputs["anchors"], targets)
        reg_head = model.head.regression_head
        loss_type = getattr(reg_head, "_loss_type", "l1")
        # every anchor's box and class from the padded targets: no loop over images, no boolean indexing
        boxes, _ = pad_per_image([t["boxes"] for t in targets])
        labels, _ = pad_per_image([t["labels"] for t in targets])
        index = matched.clamp(min=0)
        pos = matched >= 0
        cls = focal_terms(outputs["cls_logits"].float(), matched, labels.gather(1, index))
        # the box loss of every anchor, the non-positives' then zeroed (their target is the anchor itself, so
        # that their discarded values and gradients stay finite)
        gt_boxes = torch.where(pos[..., None], boxes.gather(1, index[..., None].expand(-1, -1, 4)).to(anchors),
                               anchors)
        per = box_loss_per_element(loss_type, reg_head.box_coder, anchors.flatten(0, 1), gt_boxes.flatten(0, 1),
                                   outputs["bbox_regression"].float().flatten(0, 1)).view_as(matched)
        box = torch.where(pos, per, 0.0)
        return RetinaNetTerms(list(matched.unbind(0)), list(cls.unbind(0)), list(box.unbind(0)),
                              outputs["num_per_level"]), outputs

    @staticmethod
    def reduce(terms: RetinaNetTerms) -> dict[str, Tensor]:
        m, c, b = (torch.stack(v) for v in (terms.matched_idxs, terms.cls, terms.box))
        nfg = (m >= 0).sum(dim=1).clamp(min=1).to(c.dtype)  # per image
        n = max(1, m.shape[0])
        return {"classification": (c.sum(dim=1) / nfg).sum() / n, "bbox_regression": (b.sum(dim=1) / nfg).sum() / n}

    # ------------------------------------------------------------------ public ops
    def detection_losses(self, model, images, features, targets, outputs=None) -> dict[str, Tensor]:
        terms, _ = self.loss_terms(model, images, features, targets, outputs)
        return self.reduce(terms)

    def teacher_losses(self, model, images, features, targets, outputs=None) -> TeacherLosses:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        per_instance = self._instance_reduction(model, terms, outputs, targets, summed_terms)["total"]
        m = torch.stack(terms.matched_idxs)
        total = torch.stack(terms.cls) + torch.stack(terms.box)
        batch, num_levels = m.shape[0], len(terms.num_per_level)
        # each image's positives summed per level, over its foreground count; then averaged over images
        slot = (torch.arange(batch, device=m.device)[:, None] * num_levels
                + level_index(terms.num_per_level, m.device)).flatten()
        per_image = total.new_zeros(batch * num_levels).index_add_(0, slot, torch.where(m >= 0, total, 0.0).flatten())
        nfg = (m >= 0).sum(dim=1).clamp(min=1).to(total.dtype)
        per_level = (per_image.view(batch, num_levels) / nfg[:, None]).sum(dim=0)
        return TeacherLosses(per_instance, per_level / max(1, len(targets)))

    def teacher_loss_parts(self, model, images, features, targets, outputs=None) -> dict[str, list[Tensor]]:
        """cls: the focal loss, box: the box loss, of the same anchors (and fallback) as :meth:`teacher_losses`."""
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        return self._instance_reduction(model, terms, outputs, targets, cls_box_split)

    def _instance_reduction(self, model, terms: RetinaNetTerms, outputs, targets, view) -> dict[str, list[Tensor]]:
        """Per box, the mean of its anchors' terms (``view``: their total or cls / box split), or the fallback
        where no anchor was matched to it; batched over images."""
        per_anchor = {"cls": torch.stack(terms.cls), "box": torch.stack(terms.box)}
        return batched_instance_terms(per_anchor, torch.stack(terms.matched_idxs), targets, lambda boxes, labels:
                                      self._fallback_terms_batch(model, outputs, boxes, labels), view)

    def _fallback_terms(self, model, outputs, i, target, which: Tensor) -> dict[str, Tensor]:
        """Focal and box loss of boxes ``which`` at their best-IoU anchors, taken as matched to them."""
        anchors = outputs["anchors"][i]
        boxes = target["boxes"][which]
        best = box_ops.box_iou(boxes, anchors).argmax(dim=1)
        return self._terms_at(model, outputs["cls_logits"][i][best], outputs["bbox_regression"][i][best],
                              anchors[best], boxes, target["labels"][which])

    def _fallback_terms_batch(self, model, outputs, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """:meth:`_fallback_terms` of every box of the padded batch (``[B, M, 4]``): ``{name: [B, M]}``."""
        anchors = torch.stack(outputs["anchors"])  # [B, A, 4]
        batch, num = boxes.shape[:2]
        best = batched_box_iou(boxes.to(anchors), anchors).argmax(dim=2)  # [B, M]
        rows = (best + anchors.shape[1] * torch.arange(batch, device=best.device)[:, None]).flatten()
        terms = self._terms_at(model, outputs["cls_logits"].flatten(0, 1)[rows],
                               outputs["bbox_regression"].flatten(0, 1)[rows], anchors.flatten(0, 1)[rows],
                               boxes.flatten(0, 1).to(anchors), labels.flatten())
        return {k: v.view(batch, num) for k, v in terms.items()}

    @staticmethod
    def _terms_at(model, cls_logits: Tensor, regression: Tensor, anchors: Tensor, boxes: Tensor, labels: Tensor
                  ) -> dict[str, Tensor]:
        """Focal and box loss of anchors (their outputs) each taken as a positive of one of ``boxes``."""
        focal = positive_focal_terms(cls_logits.float(), labels)
        reg_head = model.head.regression_head
        box = box_loss_per_element(getattr(reg_head, "_loss_type", "l1"), reg_head.box_coder, anchors, boxes,
                                   regression.float())
        return {"cls": focal, "box": box}

    def predict(self, model, images, features, outputs=None) -> list[dict[str, Tensor]]:
        return self._postprocess_by_level(model, images, features, outputs, ("cls_logits", "bbox_regression"))
