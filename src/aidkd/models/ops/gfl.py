"""GFL's implementation of the detector ops, and the teacher-loss reductions that only distillation uses.

Everything derives from :meth:`aidkd.models.gfl.GFL.compute_loss_terms` (per-location QFL, GIoU, DFL):

- ``detection_losses``: :meth:`GFL.reduce_loss_terms`, equal to ``model(images, targets)`` in train mode;
- ``teacher_losses``: per box, the mean over its assigned locations of ``QFL + 2 GIoU + 0.25 DFL`` (the loss
  weights, without the score weighting that only normalises the batch loss; see :meth:`GFLOps.instance_losses`);
  per level, the training loss of that level's *positive* locations (the negatives' QFL left out), normalised
  like the detector, so level AID measures how well the teacher fits the objects, as in the other families.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

from aidkd.models.atss import ATSSAssigner
from aidkd.models.gfl import GFL, GFLLossTerms
from aidkd.models.gfl_losses import distance2bbox, integral
from aidkd.models.ops.base import (
    DetectorOps,
    TeacherLosses,
    _instance_term_means,
    anchor_config,
    batched_instance_terms,
    cls_box_split,
    summed_terms,
)


class GFLOps(DetectorOps):
    """The :class:`DetectorOps` of :class:`GFL` (``images`` is the model's transformed :class:`ImageList`;
    ``targets`` are in its pixels)."""

    family = "gfl"

    def head_outputs(self, model: GFL, images: ImageList, features) -> dict:
        feats = list(features.values())
        out = model.head(feats)
        anchors, num_per_level = model.anchors(images, feats)
        return {**out, "anchors": anchors, "num_per_level": num_per_level}

    def loss_terms(self, model: GFL, images: ImageList, features, targets, outputs=None) -> tuple[GFLLossTerms, dict]:
        outputs = outputs if outputs is not None else self.head_outputs(model, images, features)
        terms = model.compute_loss_terms(targets, outputs, outputs["anchors"], outputs["num_per_level"],
                                         outputs.get("matched"))
        return terms, outputs

    def detection_losses(self, model: GFL, images: ImageList, features, targets, outputs=None) -> dict[str, Tensor]:
        terms, _ = self.loss_terms(model, images, features, targets, outputs)
        return model.reduce_loss_terms(terms)

    @torch.no_grad()
    def teacher_losses(self, model: GFL, images: ImageList, features, targets, outputs=None) -> TeacherLosses:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        per_instance = self.instance_losses(model, terms, targets, outputs, outputs["anchors"])
        per_level = self.level_losses(model, terms, num_levels=len(outputs["num_per_level"]), positives_only=True)
        return TeacherLosses(per_instance=per_instance, per_level=per_level)

    @torch.no_grad()
    def teacher_loss_parts(self, model: GFL, images: ImageList, features, targets, outputs=None
                           ) -> dict[str, list[Tensor]]:
        terms, outputs = self.loss_terms(model, images, features, targets, outputs)
        return self.instance_loss_parts(model, terms, targets, outputs, outputs["anchors"])

    def predict(self, model: GFL, images: ImageList, features, outputs=None) -> list[dict[str, Tensor]]:
        return self._postprocess_by_level(model, images, features, outputs, ("cls_logits", "bbox_regression"))

    def assign_batch(self, model: GFL, outputs: dict, targets) -> Tensor:
        if "matched" in outputs:
            return outputs["matched"]
        return model._assign_batch(targets, outputs["anchors"], outputs["num_per_level"])

    def assignment_config(self, model: GFL) -> tuple | None:
        if type(model.assigner) is not ATSSAssigner:
            return None
        return ("gfl", anchor_config(model.anchor_generator), tuple(model.anchor_strides), model.assigner.topk,
                model.assigner.min_inside)

    def decode_boxes(self, model: GFL, outputs: dict) -> Tensor:
        anchors = torch.stack(outputs["anchors"])
        _, strides = model._anchor_strides(outputs["num_per_level"], anchors.device)
        distances = integral(outputs["bbox_regression"].float(), model.reg_max) * strides[None, :, None]
        return distance2bbox((anchors[..., :2] + anchors[..., 2:]) / 2, distances)

    # ------------------------------------------------------------------ teacher-loss reductions
    @staticmethod
    def location_losses(model: GFL, terms: GFLLossTerms) -> Tensor:
        """``[B, A]`` weighted QFL + GIoU + DFL of each location (no score weighting; GIoU/DFL are 0 off positives)."""
        return model.qfl_weight * terms.qfl + model.bbox_weight * terms.bbox + model.dfl_weight * terms.dfl

    def instance_losses(
        self,
        model: GFL,
        terms: GFLLossTerms,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
    ) -> list[Tensor]:
        """Per box: the mean of :meth:`location_losses` over the locations assigned to it.

        The batch loss weights GIoU and DFL by the predicted score and divides by the sum of scores; that is a
        normaliser, not a measure of how well the box is predicted (a low score would *lower* the loss), so it is left
        out here: each location counts ``qfl_weight * QFL + bbox_weight * GIoU + dfl_weight * DFL``.

        A box no location is assigned to (tiny, or lost every conflict) is scored at the anchor overlapping it most,
        taken as a positive for it (:meth:`_fallback_parts`), so that every box gets a finite loss.
        """
        return self._instance_reduction(model, terms, targets, head_outputs, anchors, summed_terms)["total"]

    def instance_loss_parts(
        self,
        model: GFL,
        terms: GFLLossTerms,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
    ) -> dict[str, list[Tensor]]:
        """:meth:`instance_losses` split in two, per box: ``"cls"`` (``qfl_weight * QFL``) and ``"box"``
        (``bbox_weight * GIoU + dfl_weight * DFL``), same locations and fallback; ``cls + box`` is
        :meth:`instance_losses` up to rounding. For analysis (``aidkd analyze``), not used in training."""
        return self._instance_reduction(model, terms, targets, head_outputs, anchors, cls_box_split)

    def _instance_reduction(self, model: GFL, terms: GFLLossTerms, targets, head_outputs, anchors, view
                            ) -> dict[str, list[Tensor]]:
        """The weighted per-location terms (in the order :meth:`location_losses` adds them) averaged per box, with
        the fallback: batched over images when they share their anchors (always, with GFL's own anchors)."""
        weighted = {"cls": model.qfl_weight * terms.qfl, "box": model.bbox_weight * terms.bbox,
                    "dfl": model.dfl_weight * terms.dfl}
        if all(a is anchors[0] for a in anchors):
            return batched_instance_terms(weighted, terms.matched_idxs, targets, lambda boxes, labels:
                                          self._fallback_parts_batch(model, head_outputs, boxes, labels, anchors[0],
                                                                     terms.levels), view)
        per_location = [{k: v[b] for k, v in weighted.items()} for b in range(len(targets))]
        parts = _instance_term_means(per_location, list(terms.matched_idxs), targets, lambda b, which:
                                     self._fallback_parts(model, head_outputs, b, targets[b], which, anchors[b],
                                                          terms.levels), view)
        return {k: parts.get(k, []) for k in view({"cls": weighted["cls"], "box": weighted["box"]})}

    @staticmethod
    def _fallback_parts(model: GFL, outputs: dict, i: int, target: dict, which: Tensor,
                        anchors: Tensor, levels: Tensor) -> dict[str, Tensor]:
        """The weighted QFL (``"cls"``) / GIoU (``"box"``) / DFL of boxes ``which`` of image ``i`` at the anchor
        overlapping each most."""
        boxes, labels = target["boxes"][which].float(), target["labels"][which]
        best = box_ops.box_iou(boxes, anchors).argmax(dim=1)  # [k]
        return GFLOps._terms_at(model, outputs["cls_logits"][i, best], outputs["bbox_regression"][i, best],
                                anchors[best], levels[best], boxes, labels)

    @staticmethod
    def _fallback_parts_batch(model: GFL, outputs: dict, boxes: Tensor, labels: Tensor, anchors: Tensor,
                              levels: Tensor) -> dict[str, Tensor]:
        """:meth:`_fallback_parts` of every box of the padded batch (``[B, M, 4]``): ``{name: [B, M]}``."""
        batch, num = boxes.shape[:2]
        flat_boxes = boxes.reshape(-1, 4).float()
        best = box_ops.box_iou(flat_boxes, anchors).argmax(dim=1)  # [B * M]
        image = torch.arange(batch, device=anchors.device).repeat_interleave(num, output_size=batch * num)
        terms = GFLOps._terms_at(model, outputs["cls_logits"][image, best], outputs["bbox_regression"][image, best],
                                 anchors[best], levels[best], flat_boxes, labels.flatten())
        return {k: v.view(batch, num) for k, v in terms.items()}

    @staticmethod
    def _terms_at(model: GFL, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, levels: Tensor,
                  boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The weighted QFL / GIoU / DFL of locations (their outputs, anchors and levels) taken as positives of
        ``boxes``."""
        cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
        strides = torch.stack([torch.full((), s, dtype=torch.float32, device=anchors.device)  # no host copy
                               for s in model.anchor_strides])[levels]
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        bbox, dfl, _, quality = model._positive_terms(cls_logits, bbox_regression, centres, strides, boxes)
        qfl = model.qfl_loss(cls_logits, labels, quality)
        return {"cls": model.qfl_weight * qfl, "box": model.bbox_weight * bbox, "dfl": model.dfl_weight * dfl}

    @staticmethod
    def level_losses(model: GFL, terms: GFLLossTerms, num_levels: int | None = None, positives_only: bool = False
                     ) -> Tensor:
        """``[L]``: the total training loss restricted to each level (sums to the total detection loss), or with
        ``positives_only`` its positive locations' part."""
        return torch.stack(list(model.level_loss_terms(terms, num_levels, positives_only).values())).sum(dim=0)
