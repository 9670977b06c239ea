"""Adaptive Training Sample Selection (ATSS, Zhang et al., CVPR 2020), the label assigner GFL trains with.

For every ground-truth box:

1. on each pyramid level take the ``topk`` anchors whose centres are closest to the box centre (candidates);
2. the IoU threshold is the mean + standard deviation of the candidates' IoUs with the box;
3. candidates with IoU >= threshold whose centre lies inside the box (by more than 0.01 px) are positive;
4. an anchor positive for several boxes goes to the one it overlaps most (first such box on ties).

The result follows torchvision's matcher convention: ``matched_idxs[i]`` is the index of the box anchor ``i`` is
assigned to, or ``-1`` (background).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1
"""``matched_idxs`` value of an anchor assigned to no box (a negative)."""

IGNORED = -2
"""``matched_idxs`` value of a negative anchor excluded from the classification loss (torchvision's
``Matcher.BETWEEN_THRESHOLDS``)."""


class ATSSAssigner:
    """Assigns anchors to ground-truth boxes with ATSS.

    Args:
        topk (int): candidates taken per pyramid level and box (9 in the ATSS and GFL papers).
        min_inside (float): an anchor centre counts as inside a box only if it is more than this many pixels from
            every side (0.01, as in the reference implementations).

    Call it with ``anchors`` (``FloatTensor[A, 4]``, all levels concatenated, finest first), the number of anchors
    on each level and the boxes (``FloatTensor[M, 4]``); it returns ``Int64Tensor[A]`` matched indices.
    """

    def __init__(self, topk: int = 9, min_inside: float = 0.01) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk
        self.min_inside = min_inside

    def __repr__(self) -> str:
        return f"{type(self).__name__}(topk={self.topk}, min_inside={self.min_inside})"

    def __call__(self, anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        mask = torch.ones(1, gt_boxes.shape[0], dtype=torch.bool, device=anchors.device)
        return self.assign_batch(anchors, num_anchors_per_level, gt_boxes[None], mask)[0]

    def assign_batch(self, anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, gt_mask: Tensor
                     ) -> Tensor:
        """All images at once: ``anchors`` ``[A, 4]`` (shared), boxes padded to ``[B, M, 4]`` with ``gt_mask``
        ``Bool[B, M]`` marking the real ones; returns ``Int64[B, A]`` matched indices (into each image's boxes).
        One batched op per step of the algorithm: no loop over images, no host sync."""
        num_anchors = anchors.shape[0]
        batch, num_gt = gt_boxes.shape[:2]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(num_anchors_per_level)} but {num_anchors} anchors were given"
            )
        matched_idxs = torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0:
            return matched_idxs

        flat_gt = gt_boxes.reshape(-1, 4)
        ious = box_iou(anchors, flat_gt).view(num_anchors, batch, num_gt).permute(1, 0, 2)  # [B, A, M]
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
        distances = torch.cdist(anchor_centres[None].expand(batch, -1, -1), gt_centres)  # [B, A, M]

        # 1. candidates: the topk closest anchor centres of every level, for every box.
        candidates = []
        start = 0
        for count in num_anchors_per_level:
            k = min(self.topk, count)
            if k > 0:
                _, idx = distances[:, start : start + count].topk(k, dim=1, largest=False)
                candidates.append(idx + start)
            start += count
        candidate_idxs = torch.cat(candidates, dim=1)  # [B, C, M]

        # 2.-3. adaptive IoU threshold (mean + unbiased std of the candidates' IoUs) and centre-in-box test.
        candidate_ious = ious.gather(1, candidate_idxs)  # [B, C, M]
        threshold = candidate_ious.mean(dim=1) + candidate_ious.std(dim=1)
        is_pos = candidate_ious >= threshold[:, None, :]

        cx = anchor_centres[:, 0][candidate_idxs]  # [B, C, M]
        cy = anchor_centres[:, 1][candidate_idxs]
        inside = torch.stack(
            [cx - gt_boxes[:, None, :, 0], cy - gt_boxes[:, None, :, 1], gt_boxes[:, None, :, 2] - cx,
             gt_boxes[:, None, :, 3] - cy], dim=0
        ).amin(dim=0)
        is_pos &= (inside > self.min_inside) & gt_mask[:, None, :]

        # 4. an anchor positive for several boxes goes to the box it overlaps most. A box's candidates are distinct
        # anchors, so the scatter writes each (anchor, box) pair at most once.
        pos_ious = torch.full_like(ious, -1.0).scatter_(1, candidate_idxs,
                                                        torch.where(is_pos, candidate_ious, -1.0))
        best_iou, best_gt = pos_ious.max(dim=2)
        return torch.where(best_iou >= 0, best_gt, matched_idxs)
