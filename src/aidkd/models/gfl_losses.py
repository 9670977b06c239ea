"""The losses and box codings of Generalized Focal Loss (Li et al., NeurIPS 2020, arXiv 2006.04388).

Every loss here returns one value per element (no reduction); the detector weights and normalises them, so that
per-instance and per-level sums (for distillation) are reductions of the same numbers as the training loss.

- Quality Focal Loss: a sigmoid BCE against a soft target ``y`` (the IoU for the positive class of a positive
  location, 0 elsewhere), modulated by ``|y - sigmoid(x)| ** beta``.
- Distribution Focal Loss: a box side is a discrete distribution over ``{0, 1, ..., reg_max}`` (stride units);
  for a target distance ``y`` between bins ``i`` and ``i + 1`` it is ``(i + 1 - y) * CE(i) + (y - i) * CE(i + 1)``.
- The box loss is GIoU (``giou_loss``: torchvision's ``generalized_box_iou_loss`` without its host syncs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss summed over classes, one value per location.

    Args:
        logits: ``[N, C]`` joint class-quality logits.
        labels: ``Int64[N]`` the class index of a positive location, or any negative value for a negative one.
        quality: ``[N]`` the quality target of a positive location (the IoU of its predicted box with its box);
            ignored for negatives.
        beta: the modulating exponent.

    Returns:
        ``[N]``: ``sum_c BCE(x_c, y_c) * |y_c - sigmoid(x_c)| ** beta`` with ``y_c = quality`` for the positive
        class and 0 for every other class.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    # y: quality at each positive's class, 0 elsewhere (a comparison, not indexing: no host sync)
    hot = labels[:, None] == torch.arange(logits.shape[1], device=logits.device)
    targets = torch.where(hot, quality[:, None].to(logits.dtype), torch.zeros((), dtype=logits.dtype,
                                                                               device=logits.device))
    modulator = (targets - logits.sigmoid()).abs().pow(beta)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulator
    return loss.sum(dim=1)


def giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """``torchvision.ops.generalized_box_iou_loss(boxes1, boxes2, reduction="none")``, the same arithmetic, with
    the intersection masked by ``torch.where`` instead of boolean indexing (which syncs the host with the device
    twice per call, forward and backward)."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk = torch.where(overlap, (xkis2 - xkis1) * (ykis2 - ykis1), torch.zeros_like(x1))
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iouk - ((area_c - unionk) / (area_c + eps)))


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss, one value per distribution.

    Args:
        logits: ``[N, reg_max + 1]`` unnormalised distribution over the distances ``0..reg_max``.
        target: ``[N]`` continuous target distances in ``[0, reg_max)``.

    Returns:
        ``[N]``: ``(i + 1 - y) * -log p_i + (y - i) * -log p_{i+1}`` with ``i = floor(y)``.
    """
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(logits, left, reduction="none") * weight_left
        + F.cross_entropy(logits, right, reduction="none") * weight_right
    )


def integral(distribution_logits: Tensor, reg_max: int) -> Tensor:
    """Expected distances of the four box sides: ``[..., 4 * (reg_max + 1)]`` logits -> ``[..., 4]``."""
    shape = distribution_logits.shape[:-1]
    probs = distribution_logits.reshape(*shape, 4, reg_max + 1).softmax(dim=-1)
    project = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return probs @ project


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """``(x, y)`` points and ``(left, top, right, bottom)`` distances -> xyxy boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor, max_distance: float | None = None, eps: float = 0.1) -> Tensor:
    """xyxy boxes seen from ``(x, y)`` points -> ``(left, top, right, bottom)`` distances.

    With ``max_distance``, distances are clamped to ``[0, max_distance - eps]`` (DFL needs targets below
    ``reg_max``; the reference implementations use ``eps = 0.1``).
    """
    distances = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    if max_distance is not None:
        distances = distances.clamp(min=0, max=max_distance - eps)
    return distances


class QualityFocalLoss(nn.Module):
    """Module form of :func:`quality_focal_loss` (``forward(logits, labels, quality) -> [N]``)."""

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, logits: Tensor, labels: Tensor, quality: Tensor) -> Tensor:
        return quality_focal_loss(logits, labels, quality, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class DistributionFocalLoss(nn.Module):
    """Module form of :func:`distribution_focal_loss` (``forward(logits, target) -> [N]``)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return distribution_focal_loss(logits, target)


class GIoULoss(nn.Module):
    """``1 - GIoU`` of aligned box pairs (``forward(pred, target) -> [N]``), via torchvision."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return giou_loss(pred, target)
