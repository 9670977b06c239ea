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
        num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(num_anchors_per_level)} but {num_anchors} anchors were given"
            )
        matched_idxs = torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0:
            return matched_idxs

        ious = box_iou(anchors, gt_boxes)  # [A, M]
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        distances = torch.cdist(anchor_centres, gt_centres)  # [A, M]

        # 1. candidates: the topk closest anchor centres of every level, for every box.
        candidates = []
        start = 0
        for count in num_anchors_per_level:
            k = min(self.topk, count)
            if k > 0:
                _, idx = distances[start : start + count].topk(k, dim=0, largest=False)
                candidates.append(idx + start)
            start += count
        candidate_idxs = torch.cat(candidates, dim=0)  # [C, M]

        # 2.-3. adaptive IoU threshold (mean + unbiased std of the candidates' IoUs) and centre-in-box test.
        gt_range = torch.arange(num_gt, device=anchors.device)
        candidate_ious = ious[candidate_idxs, gt_range]  # [C, M]
        threshold = candidate_ious.mean(dim=0) + candidate_ious.std(dim=0)
        is_pos = candidate_ious >= threshold[None, :]

        cx = anchor_centres[candidate_idxs, 0]  # [C, M]
        cy = anchor_centres[candidate_idxs, 1]
        inside = torch.stack(
            [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=0
        ).amin(dim=0)
        is_pos &= inside > self.min_inside

        # 4. an anchor positive for several boxes goes to the box it overlaps most.
        pos_ious = torch.full_like(ious, -1.0)
        cand_flat, gt_flat = candidate_idxs[is_pos], gt_range.expand_as(candidate_idxs)[is_pos]
        pos_ious[cand_flat, gt_flat] = ious[cand_flat, gt_flat]
        best_iou, best_gt = pos_ious.max(dim=1)
        assigned = best_iou >= 0
        matched_idxs[assigned] = best_gt[assigned]
        return matched_idxs
