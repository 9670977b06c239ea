"""Faster R-CNN: per-anchor (RPN) and per-RoI (box head) loss terms for training and teacher losses.

torchvision (``RegionProposalNetwork.compute_loss``, ``RoIHeads.select_training_samples`` + ``fastrcnn_loss``):
  loss_objectness  = mean BCE over the sampled anchors of the batch (256 per image, up to half positive)
  loss_rpn_box_reg = sum of smooth-L1 (beta 1/9) over the sampled positive anchors / number of sampled anchors
  loss_classifier  = mean cross-entropy over the sampled RoIs of the batch (512 per image, up to 25 % positive;
                     the ground-truth boxes are appended to the proposals first)
  loss_box_reg     = sum of smooth-L1 (beta 1/9) of the true class's deltas over sampled positive RoIs / sampled RoIs
Sampling uses torch's RNG in the same order as torchvision (transform, RPN sampler, RoI sampler), so under the same
seed ``detection_losses`` equals ``model(images, targets)``.

Teacher (no sampling at all, so teacher losses are deterministic and use no RNG):
  D_k = mean over *all* RPN anchors matched to k of (objectness BCE + smooth-L1)
      + mean over *all* positive RoIs matched to k (proposals + appended ground truth) of (CE + smooth-L1).
  A box with no matched anchor (its best anchor taken by a box that overlaps it more) uses its best-IoU anchor; a box
  with no matched RoI (only possible for duplicated boxes) uses its own ground-truth box as the proposal.
  per_level[l] = sum over the positive RPN anchors on level l of (BCE + smooth-L1) / number of positive RPN anchors in
  the batch, plus the RoI-head loss mean (mean over all positive RoIs of CE + smooth-L1) on every level. Like the
  one-stage families, only positives count, so per_level measures how well the teacher fits the objects.
  ``teacher_loss_parts``: cls = the objectness BCE mean + the CE mean, box = the two smooth-L1 means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from aidkd.models.ops.base import (
    DetectorOps,
    TeacherLosses,
    batched_instance_terms,
    cls_box_split,
    level_index,
    per_instance_parts,
    per_instance_totals,
    shared_anchors,
    summed_terms,
)
from aidkd.models.targets import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    batched_box_iou,
    box_centres,
    centres_in_boxes,
    ignore_background_batch,
    ignore_boxes_of,
    match_batch,
    pad_per_image,
)

SMOOTH_L1_BETA = 1 / 9  # torchvision's RPN and RoI box losses



def _sampled_means(sampled: list[Tensor], *per_image_terms: list[Tensor]) -> list[Tensor]:
    """Each term summed over the sampled anchors / RoIs of every image, divided by their total count (torchvision's
    RPN and RoI-head reduction)."""
    n = torch.stack([s.sum() for s in sampled]).sum().clamp(min=1)  # a tensor: no host sync
    return [torch.stack([(t * s).sum() for t, s in zip(terms, sampled)]).sum() / n for terms in per_image_terms]

@dataclass
class RPNTerms:
    matched_idxs: list[Tensor]  # Int64[A]: >= 0 matched box, -1 background, -2 ignored (between thresholds or ignore box)
    labels: list[Tensor]  # Float[A]: 1 positive, 0 negative, -1 ignored (torchvision's RPN labels)
    objectness: list[Tensor]  # Float[A]: BCE with logits against max(label, 0)
    box: list[Tensor]  # Float[A]: smooth-L1 summed over the 4 deltas; 0 off the positives
    sampled: list[Tensor] | None  # Bool[A]: chosen by the RPN's fg/bg sampler (None when not sampling)
    num_per_level: list[int]


@dataclass
class RoITerms:
    proposals: list[Tensor]  # Float[R_i, 4]: the RoIs the box head ran on
    matched_idxs: list[Tensor]  # Int64[R_i]: matched box (valid where labels > 0)
    labels: list[Tensor]  # Int64[R_i]: class (> 0), 0 background, -1 ignored
    cls: list[Tensor]  # Float[R_i]: cross-entropy
    box: list[Tensor]  # Float[R_i]: smooth-L1 of the true class's deltas; 0 off the positives
    sampled: list[Tensor]  # Bool[R_i]: False only for the fallback ground-truth RoIs of the teacher path


class FasterRCNNOps(DetectorOps):
    family = "fasterrcnn"

    # ------------------------------------------------------------------ RPN
    def head_outputs(self, model, images, features) -> dict:
        rpn = model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = shared_anchors(rpn.anchor_generator, images, feats)
        num_images = len(anchors)
        num_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)
        return {"objectness": objectness.view(num_images, -1), "rpn_deltas": deltas.view(num_images, -1, 4),
                "anchors": anchors, "num_per_level": num_per_level, "proposals": boxes, "proposal_scores": scores}

    def rpn_terms(self, model, outputs, targets, *, sample: bool = True) -> RPNTerms:
        rpn = model.rpn
        anchors = torch.stack(outputs["anchors"])  # [B, A, 4]: the images share their anchors
        m = self._rpn_match(rpn, outputs["anchors"], anchors, targets)  # [B, A]
        pos = m >= 0
        lab = torch.where(pos, 1.0, torch.where(m == BETWEEN_THRESHOLDS, -1.0, 0.0))  # torchvision's RPN labels
        obj = outputs["objectness"].float()
        obj_terms = F.binary_cross_entropy_with_logits(obj, lab.clamp(min=0), reduction="none")
        # every anchor's box loss, the non-positives' then zeroed (their target is the anchor itself, so that the
        # discarded values and gradients stay finite); no loop over images, no boolean indexing
        boxes, _ = pad_per_image([t["boxes"] for t in targets])
        gt = boxes.gather(1, m.clamp(min=0)[..., None].expand(-1, -1, 4)).to(anchors.dtype)
        gt = torch.where(pos[..., None], gt, anchors)
        target = rpn.box_coder.encode_single(gt.flatten(0, 1), anchors.flatten(0, 1))
        per = F.smooth_l1_loss(outputs["rpn_deltas"].float().flatten(0, 1), target, beta=SMOOTH_L1_BETA,
                               reduction="none").sum(-1).view_as(m)
        box_terms = torch.where(pos, per, 0.0)
        matched, labels = list(m.unbind(0)), list(lab.unbind(0))
        obj_terms, box_terms = list(obj_terms.unbind(0)), list(box_terms.unbind(0))
        sampled = None
        if sample:
            pos_masks, neg_masks = rpn.fg_bg_sampler(labels)  # same RNG use as torchvision's RPN.compute_loss
            sampled = [(p | n).bool() for p, n in zip(pos_masks, neg_masks)]
        return RPNTerms(matched, labels, obj_terms, box_terms, sampled, outputs["num_per_level"])

    @staticmethod
    def _rpn_match(rpn, anchors: list[Tensor], stacked: Tensor, targets) -> Tensor:
        """``Int64[B, A]`` RPN matches with the ignore rule: batched for torchvision's ``Matcher`` on IoU, per image
        for another matcher or similarity."""
        if type(rpn.proposal_matcher) is det_utils.Matcher and rpn.box_similarity is box_ops.box_iou:
            boxes, valid = pad_per_image([t["boxes"].to(stacked) for t in targets])
            matched = match_batch(rpn.proposal_matcher, batched_box_iou(boxes, stacked), valid)
            return ignore_background_batch(matched, stacked, targets)
        out = []
        for anchors_i, t in zip(anchors, targets):
            gt = t["boxes"]
            if gt.numel() == 0:
                m = torch.full((anchors_i.shape[0],), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors_i.device)
            else:
                m = rpn.proposal_matcher(rpn.box_similarity(gt, anchors_i))
            ign = ignore_boxes_of(t)
            if ign is not None:
                inside = centres_in_boxes(box_centres(anchors_i), ign)
                m = torch.where((m == BELOW_LOW_THRESHOLD) & inside, torch.full_like(m, BETWEEN_THRESHOLDS), m)
            out.append(m)
        return torch.stack(out)

    @staticmethod
    def reduce_rpn(terms: RPNTerms) -> dict[str, Tensor]:
        obj, box = _sampled_means(terms.sampled, terms.objectness, terms.box)
        return {"loss_objectness": obj, "loss_rpn_box_reg": box}

    # ------------------------------------------------------------------ RoI head
    def roi_terms(self, model, images, features, proposals: list[Tensor], targets, *, sample: bool) -> RoITerms:
        """Assign RoIs like ``RoIHeads.select_training_samples``; run the box head on the sampled RoIs (``sample``,
        the training loss) or on every positive RoI plus a ground-truth RoI for each box left without one."""
        roi = model.roi_heads
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        props = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched, labels = [], []
        for p, g, t in zip(props, gt_boxes, targets):
            if g.numel() == 0:
                m = torch.zeros((p.shape[0],), dtype=torch.int64, device=p.device)
                lab = torch.zeros((p.shape[0],), dtype=torch.int64, device=p.device)
            else:
                raw = roi.proposal_matcher(box_ops.box_iou(g, p))
                m = raw.clamp(min=0)
                lab = t["labels"][m].to(torch.int64)
                lab[raw == BELOW_LOW_THRESHOLD] = 0
                lab[raw == BETWEEN_THRESHOLDS] = -1
            ign = ignore_boxes_of(t)
            if ign is not None:
                inside = centres_in_boxes(box_centres(p), ign)
                lab = torch.where((lab == 0) & inside, torch.full_like(lab, -1), lab)
            matched.append(m)
            labels.append(lab)
        if sample:  # same RNG use as torchvision's RoIHeads.subsample
            pos_masks, neg_masks = roi.fg_bg_sampler(labels)
            keeps = [(pm | nm).bool() for pm, nm in zip(pos_masks, neg_masks)]
        else:
            keeps = [lab > 0 for lab in labels]
        sel_props, sel_matched, sel_labels, sel_sampled = [], [], [], []
        for i, (p, m, lab, keep) in enumerate(zip(props, matched, labels, keeps)):
            idx = torch.where(keep)[0]
            p, m, lab = p[idx], m[idx], lab[idx]
            s = torch.ones_like(lab, dtype=torch.bool)
            if not sample and gt_boxes[i].numel():
                n = gt_boxes[i].shape[0]
                counts = torch.bincount(m[lab > 0], minlength=n)[:n]
                missing = torch.where(counts == 0)[0]
                if missing.numel():
                    p = torch.cat((p, gt_boxes[i][missing]))
                    m = torch.cat((m, missing))
                    lab = torch.cat((lab, targets[i]["labels"][missing].to(torch.int64)))
                    s = torch.cat((s, torch.zeros_like(missing, dtype=torch.bool)))
            sel_props.append(p)
            sel_matched.append(m)
            sel_labels.append(lab)
            sel_sampled.append(s)
        box_features = roi.box_roi_pool(features, sel_props, images.image_sizes)
        box_features = roi.box_head(box_features)
        class_logits, box_regression = roi.box_predictor(box_features)
        class_logits = class_logits.float()
        box_regression = box_regression.float().reshape(class_logits.shape[0], box_regression.shape[-1] // 4, 4)
        sizes = [p.shape[0] for p in sel_props]
        cls_terms, box_terms = [], []
        for i, (logits, reg, p, m, lab) in enumerate(zip(class_logits.split(sizes), box_regression.split(sizes),
                                                          sel_props, sel_matched, sel_labels)):
            cls_terms.append(F.cross_entropy(logits, lab.clamp(min=0), reduction="none"))
            pos = torch.where(lab > 0)[0]
            target = roi.box_coder.encode_single(gt_boxes[i][m[pos]], p[pos])
            per = F.smooth_l1_loss(reg[pos, lab[pos]], target, beta=SMOOTH_L1_BETA, reduction="none").sum(-1)
            box_terms.append(logits.new_zeros(p.shape[0]).scatter(0, pos, per))
        return RoITerms(sel_props, sel_matched, sel_labels, cls_terms, box_terms, sel_sampled)

    @staticmethod
    def reduce_roi(terms: RoITerms) -> dict[str, Tensor]:
        cls, box = _sampled_means(terms.sampled, terms.cls, terms.box)
        return {"loss_classifier": cls, "loss_box_reg": box}

    # ------------------------------------------------------------------ public ops
    def detection_losses(self, model, images, features, targets, outputs=None) -> dict[str, Tensor]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        rpn = self.rpn_terms(model, outputs, targets, sample=True)
        roi = self.roi_terms(model, images, features, outputs["proposals"], targets, sample=True)
        losses = self.reduce_roi(roi)
        losses.update(self.reduce_rpn(rpn))
        return losses

    def teacher_losses(self, model, images, features, targets, outputs=None) -> TeacherLosses:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        rpn, roi = self._teacher_terms(model, images, features, targets, outputs)
        rpn_means = self._rpn_instance_means(model, rpn, outputs, targets, summed_terms)["total"]
        roi_means = per_instance_totals(*self._roi_instance_terms(roi, targets))
        per_instance = [a + b for a, b in zip(rpn_means, roi_means)]
        # per level: positive RPN anchors of each level / all positive RPN anchors, + the positive-RoI loss mean
        L = len(rpn.num_per_level)
        m = torch.stack(rpn.matched_idxs)  # images share their anchors
        total = torch.where(m >= 0, torch.stack(rpn.objectness) + torch.stack(rpn.box), 0.0)
        lvl = level_index(rpn.num_per_level, m.device)
        per_level = total.new_zeros(L).index_add_(0, lvl.repeat(m.shape[0]), total.flatten())
        n_pos = (m >= 0).sum().clamp(min=1)
        roi_sum = sum(((c + b) * (lab > 0)).sum() for c, b, lab in zip(roi.cls, roi.box, roi.labels))
        roi_n = torch.stack([(lab > 0).sum() for lab in roi.labels]).sum().clamp(min=1)
        return TeacherLosses(per_instance, per_level / n_pos + roi_sum / roi_n)

    def teacher_loss_parts(self, model, images, features, targets, outputs=None) -> dict[str, list[Tensor]]:
        """cls: the RPN objectness BCE + the RoI cross-entropy; box: the RPN + RoI smooth-L1; the same anchors, RoIs
        and fallbacks as :meth:`teacher_losses` (each of its two means split in two)."""
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        rpn, roi = self._teacher_terms(model, images, features, targets, outputs)
        rpn_parts = self._rpn_instance_means(model, rpn, outputs, targets, cls_box_split)
        roi_parts = per_instance_parts(*self._roi_instance_terms(roi, targets))
        return {k: [a + b for a, b in zip(rpn_parts[k], roi_parts[k])] for k in ("cls", "box")}

    def _teacher_terms(self, model, images, features, targets, outputs) -> tuple[RPNTerms, RoITerms]:
        """Every anchor and every positive RoI (plus a ground-truth RoI for a box without one), no sampling."""
        rpn = self.rpn_terms(model, outputs, targets, sample=False)
        roi = self.roi_terms(model, images, features, outputs["proposals"], targets, sample=False)
        return rpn, roi

    def _rpn_instance_means(self, model, rpn: RPNTerms, outputs, targets, view) -> dict[str, list[Tensor]]:
        """Per box, the mean of the RPN terms (objectness is cls) over its anchors, with the fallback; one padded
        reduction for the batch (its images share their anchors: ``shared_anchors``)."""
        per_anchor = {"cls": torch.stack(rpn.objectness), "box": torch.stack(rpn.box)}
        return batched_instance_terms(per_anchor, torch.stack(rpn.matched_idxs), targets, lambda boxes, labels:
                                      self._fallback_terms_batch(model, outputs, boxes), view)

    def _fallback_terms_batch(self, model, outputs, boxes: Tensor) -> dict[str, Tensor]:
        """Objectness BCE and smooth-L1 of every box of the padded batch (``[B, M, 4]``) at its best-IoU anchor, taken
        as matched to it: ``{name: [B, M]}``."""
        rpn = model.rpn
        anchors = outputs["anchors"][0]
        batch, num = boxes.shape[:2]
        flat = boxes.reshape(-1, 4).to(anchors.dtype)
        best = box_ops.box_iou(flat, anchors).argmax(dim=1)  # [B * M]
        image = torch.arange(batch, device=anchors.device).repeat_interleave(num, output_size=batch * num)
        obj = F.binary_cross_entropy_with_logits(outputs["objectness"][image, best].float(),
                                                 torch.ones_like(best, dtype=torch.float32), reduction="none")
        target_deltas = rpn.box_coder.encode_single(flat, anchors[best])
        box = F.smooth_l1_loss(outputs["rpn_deltas"][image, best].float(), target_deltas, beta=SMOOTH_L1_BETA,
                               reduction="none").sum(-1)
        return {"cls": obj.view(batch, num), "box": box.view(batch, num)}

    @staticmethod
    def _roi_instance_terms(roi: RoITerms, targets):
        """The same for the RoI head: only positive RoIs count; no fallback (``roi_terms`` gave every box one)."""
        matched = [torch.where(lab > 0, m, torch.full_like(m, -1)) for m, lab in zip(roi.matched_idxs, roi.labels)]
        per_roi = [{"cls": c, "box": b} for c, b in zip(roi.cls, roi.box)]
        return per_roi, matched, targets, None

    def predict(self, model, images, features, outputs=None) -> list[dict[str, Tensor]]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        roi = model.roi_heads
        proposals = outputs["proposals"]
        box_features = roi.box_head(roi.box_roi_pool(features, proposals, images.image_sizes))
        class_logits, box_regression = roi.box_predictor(box_features)
        boxes, scores, labels = roi.postprocess_detections(class_logits, box_regression, proposals,
                                                           images.image_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
