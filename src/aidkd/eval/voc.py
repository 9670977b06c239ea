"""PASCAL VOC style mean average precision (VOC2010+ "all-point" AP) with ignore regions.

Per class, detections of all images are sorted by decreasing score (ties keep image order, then detection order)
and matched greedily as in the VOC devkit: a detection is compared with every gt box of its class in its image;
if the best IoU is ``>= iou`` (VOC's ``ovmax >= minoverlap``) the detection is a TP when that gt is still free and
a FP (duplicate) otherwise. A detection whose best gt IoU is below ``iou`` is checked against the image's *ignore
boxes* (class-agnostic: KITTI DontCare/Van/..., COCO crowd regions): if its IoU with one of them is ``>= iou`` it
is **neither TP nor FP** (dropped from the ranking, like a VOC "difficult" match); otherwise it is a FP.
Ignore boxes never count as positives (they are not in the recall denominator).

AP is the area under the monotone precision envelope (precision made non-increasing from the right), summed
over the recall steps; boxes are continuous xyxy pixels (IoU without the VOC devkit's ``+1``).
A class without gt boxes has AP ``nan`` and is left out of the mean (``mAP`` is ``nan`` if no class has gt).
All outputs are in percent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["box_iou", "voc_ap", "voc_map"]


def _np(x: Any, dtype, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """numpy copy of a numpy array / torch tensor / list; empty input gets shape (0, *shape_tail)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x if x is not None else [], dtype=dtype)
    if a.size == 0:
        return np.zeros((0, *shape_tail), dtype=dtype)
    return a.reshape(-1, *shape_tail) if shape_tail else a.reshape(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes, (len(a), len(b)); 0 where there is no overlap."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP (a fraction in [0, 1]) from cumulative recall/precision in ranking order."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def voc_map(
    gt_boxes: Sequence[Any],
    gt_labels: Sequence[Any],
    ignore_boxes: Sequence[Any] | None,
    det_boxes: Sequence[Any],
    det_scores: Sequence[Any],
    det_labels: Sequence[Any],
    num_classes: int,
    iou: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """VOC mAP over ``num_classes`` foreground classes with labels ``1..num_classes``.

    Every argument but ``num_classes``/``iou``/``class_names`` is a per-image list (numpy arrays, tensors or lists):
    ``gt_boxes[i]`` (G,4) xyxy, ``gt_labels[i]`` (G,), ``ignore_boxes[i]`` (M,4) or ``ignore_boxes=None``,
    ``det_boxes[i]`` (N,4), ``det_scores[i]`` (N,), ``det_labels[i]`` (N,).
    Returns ``{"mAP": float, "per_class": {name_or_label: AP}}`` in percent; ``per_class`` is keyed by
    ``class_names[label - 1]`` when given, else by the integer label.
    """
    n_img = len(gt_boxes)
    lens = {len(gt_labels), len(det_boxes), len(det_scores), len(det_labels)}
    if ignore_boxes is not None:
        lens.add(len(ignore_boxes))
    if lens != {n_img}:
        raise ValueError("voc_map: every per-image argument must have one entry per image")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"voc_map: {len(class_names)} class names for num_classes={num_classes}")

    gtb = [_np(b, np.float64, (4,)) for b in gt_boxes]
    gtl = [_np(lab, np.int64) for lab in gt_labels]
    ign = [_np(b, np.float64, (4,)) for b in ignore_boxes] if ignore_boxes is not None else [
        np.zeros((0, 4)) for _ in range(n_img)]
    dtb = [_np(b, np.float64, (4,)) for b in det_boxes]
    dts = [_np(s, np.float64) for s in det_scores]
    dtl = [_np(lab, np.int64) for lab in det_labels]
    for i in range(n_img):
        if len(gtb[i]) != len(gtl[i]) or not (len(dtb[i]) == len(dts[i]) == len(dtl[i])):
            raise ValueError(f"voc_map: image {i}: boxes, scores and labels differ in length")
        for what, labs in (("gt", gtl[i]), ("detection", dtl[i])):
            if labs.size and (labs.min() < 1 or labs.max() > num_classes):
                raise ValueError(f"voc_map: image {i}: {what} label outside 1..{num_classes}: {labs.tolist()}")

    per_class: dict[Any, float] = {}
    for c in range(1, num_classes + 1):
        key = class_names[c - 1] if class_names is not None else c
        npos = int(sum(int((lab == c).sum()) for lab in gtl))
        # all detections of class c, in (image, detection) order, then a stable sort by decreasing score
        img_of, box_of, score_of = [], [], []
        for i in range(n_img):
            m = dtl[i] == c
            if m.any():
                img_of.extend([i] * int(m.sum()))
                box_of.append(dtb[i][m])
                score_of.append(dts[i][m])
        if npos == 0:
            per_class[key] = float("nan")
            continue
        if not img_of:
            per_class[key] = 0.0
            continue
        img_of = np.asarray(img_of)
        boxes = np.concatenate(box_of)
        scores = np.concatenate(score_of)
        order = np.argsort(-scores, kind="stable")
        cls_gt = [gtb[i][gtl[i] == c] for i in range(n_img)]
        taken = [np.zeros(len(g), dtype=bool) for g in cls_gt]
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        keep = np.ones(len(order), dtype=bool)
        for rank, d in enumerate(order):
            i = img_of[d]
            box = boxes[d:d + 1]
            if len(cls_gt[i]):
                ious = box_iou(box, cls_gt[i])[0]
                j = int(np.argmax(ious))
                if ious[j] >= iou:
                    if not taken[i][j]:
                        taken[i][j] = True
                        tp[rank] = 1
                    else:
                        fp[rank] = 1
                    continue
            if len(ign[i]) and box_iou(box, ign[i]).max() >= iou:
                keep[rank] = False  # on an ignore region: neither TP nor FP
                continue
            fp[rank] = 1
        tp_c = np.cumsum(tp[keep])
        fp_c = np.cumsum(fp[keep])
        rec = tp_c / npos
        prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        per_class[key] = voc_ap(rec, prec) * 100.0
    vals = [v for v in per_class.values() if not math.isnan(v)]
    return {"mAP": float(np.mean(vals)) if vals else float("nan"), "per_class": per_class}
