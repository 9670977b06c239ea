"""COCO box mAP through faster-coco-eval (pycocotools when faster-coco-eval is missing); nothing re-implemented.

Ground truth can be a COCO dict or be built from :class:`~aidkd.data.structures.ImageRecord` objects with
:func:`records_to_coco`: category ``k`` (1-based) is ``classes[k-1]``, so a model's label ``k`` is category ``k``.
Objects are split like :class:`aidkd.data.dataset.DetectionDataset` builds its targets: an object whose class is
in ``classes`` (exact name) and that is not ``iscrowd`` is a positive; everything else (crowd regions, KITTI
``DontCare``/``Van``/``Truck``/..., any class not in ``classes``) is an ignore region. Ignore regions become
``iscrowd=1`` boxes, which COCOeval never counts as positives and on which it does not penalise detections (a
detection covered by one -- intersection over the detection's area >= the IoU threshold -- is dropped):

* a crowd object of an evaluated class -> a crowd box of that category (COCO's own semantics);
* any other ignore region -> a crowd box in **every** category (class-agnostic, like the datasets'
  ``ignore_boxes``).

Results are percent; a value COCOeval reports as ``-1`` (nothing to evaluate, e.g. no gt in an area range)
is ``nan``.
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aidkd.data.structures import ImageRecord, ObjectAnnotation

__all__ = [
    "COCO_METRIC_NAMES",
    "coco_backend",
    "coco_map",
    "predictions_to_coco",
    "records_to_coco",
    "split_objects",
]

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_backend(prefer: str = "auto") -> str:
    """Which COCOeval implementation ``coco_map`` uses: ``"faster_coco_eval"`` or ``"pycocotools"``."""
    if prefer not in ("auto", "faster_coco_eval", "pycocotools"):
        raise ValueError(f"unknown COCO backend {prefer!r}")
    if prefer in ("auto", "faster_coco_eval"):
        try:
            import faster_coco_eval  # noqa: F401

            return "faster_coco_eval"
        except ImportError:
            if prefer == "faster_coco_eval":
                raise
    import pycocotools  # noqa: F401  (ImportError names the missing package)

    return "pycocotools"


def split_objects(
    objects: Iterable[ObjectAnnotation], classes: Sequence[str],
) -> tuple[list[tuple[ObjectAnnotation, int]], list[tuple[ObjectAnnotation, int | None]]]:
    """Sort objects into positives ``(obj, label)`` (label 1..K) and ignore regions ``(obj, label or None)``.

    The rule of ``DetectionDataset``: a non-crowd object of a class in ``classes`` (exact name) is a positive,
    every other object an ignore region. An ignore region's label is its class's label for a crowd object of an
    evaluated class, else ``None`` (class-agnostic).
    """
    label_of = {c: i + 1 for i, c in enumerate(classes)}
    positives: list[tuple[ObjectAnnotation, int]] = []
    ignores: list[tuple[ObjectAnnotation, int | None]] = []
    for obj in objects:
        label = label_of.get(obj.cls)
        if label is not None and not obj.iscrowd:
            positives.append((obj, label))
        else:
            ignores.append((obj, label))
    return positives, ignores


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def records_to_coco(records: Sequence[ImageRecord], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO ground-truth dict (with ``info``/``licenses``) from records; categories ``1..K`` = ``classes``."""
    images, annotations = [], []
    ann_id = 1
    n_cls = len(classes)
    seen: set[int] = set()
    for rec in records:
        img_id = int(rec.image_id)
        if img_id in seen:
            raise ValueError(f"duplicate image_id {img_id} ({rec.source or rec.image_path})")
        seen.add(img_id)
        img: dict[str, Any] = {"id": img_id, "file_name": str(rec.image_path)}
        if rec.width is not None and rec.height is not None:
            img["width"], img["height"] = int(rec.width), int(rec.height)
        images.append(img)
        positives, ignores = split_objects(rec.objects, classes)
        entries = [(obj, label, 0) for obj, label in positives]
        for obj, label in ignores:
            for lab in ([label] if label is not None else range(1, n_cls + 1)):
                entries.append((obj, lab, 1))
        for obj, label, crowd in entries:
            bbox = _xywh(obj.box)
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": int(label), "bbox": bbox,
                "area": max(bbox[2], 0.0) * max(bbox[3], 0.0), "iscrowd": crowd,
            })
            ann_id += 1
    return {
        "info": {"description": "aidkd ground truth"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(classes)],
    }


def _to_np(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def predictions_to_coco(
    predictions: Mapping[int, Mapping[str, Any]],
    label_to_category: Mapping[int, int] | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts from ``{image_id: {"boxes": (N,4) xyxy, "scores": (N,), "labels": (N,)}}``.

    ``labels`` are category ids unless ``label_to_category`` maps them.
    """
    out: list[dict[str, Any]] = []
    for img_id, pred in predictions.items():
        boxes = _to_np(pred["boxes"], np.float64).reshape(-1, 4)
        scores = _to_np(pred["scores"], np.float64).reshape(-1)
        labels = _to_np(pred["labels"], np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {img_id}: boxes, scores and labels differ in length")
        for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            cat = label_to_category[lab] if label_to_category is not None else lab
            out.append({"image_id": int(img_id), "category_id": int(cat), "bbox": _xywh(b), "score": float(s)})
    return out


def _summary_from_precision(precision: np.ndarray, params: Any) -> tuple[dict[str, float], np.ndarray]:
    """AP, AP50, AP75, APs/m/l exactly as COCOeval.summarize (maxDets = last), and per-category AP."""
    area_lbl = list(params.areaRngLbl)
    m = len(params.maxDets) - 1
    iou_thrs = np.asarray(params.iouThrs)

    def mean_valid(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(np.mean(s)) * 100.0 if s.size else float("nan")

    a_all = area_lbl.index("all")
    t50 = np.where(np.isclose(iou_thrs, 0.5))[0]
    t75 = np.where(np.isclose(iou_thrs, 0.75))[0]
    stats = {
        "AP": mean_valid(precision[:, :, :, a_all, m]),
        "AP50": mean_valid(precision[t50][:, :, :, a_all, m]),
        "AP75": mean_valid(precision[t75][:, :, :, a_all, m]),
        "APs": mean_valid(precision[:, :, :, area_lbl.index("small"), m]),
        "APm": mean_valid(precision[:, :, :, area_lbl.index("medium"), m]),
        "APl": mean_valid(precision[:, :, :, area_lbl.index("large"), m]),
    }
    per_cat = np.array([mean_valid(precision[:, :, k, a_all, m]) for k in range(precision.shape[2])])
    return stats, per_cat


def _empty_result(backend_coco_cls: Any, gt: Any) -> Any:
    res = backend_coco_cls()
    res.dataset = {
        "info": copy.deepcopy(gt.dataset.get("info", {})),
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def coco_map(
    gt: Mapping[str, Any] | Sequence[ImageRecord],
    detections: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
    classes: Sequence[str] | None = None,
    *,
    label_to_category: Mapping[int, int] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """COCO bbox metrics in percent: ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP}}``.

    ``gt``: a COCO dict (not modified; a missing ``info``/``licenses`` is fine) or ImageRecords together with
    ``classes``. ``detections``: a list of COCO result dicts (``bbox`` xywh) or
    ``{image_id: {"boxes" xyxy, "scores", "labels"}}`` (labels = category ids, i.e. ``1..K`` for records).
    Images without detections or without gt are fine; detections on unknown image ids are an error.
    """
    if isinstance(gt, Mapping):
        gt_dict = copy.deepcopy(dict(gt))
    else:
        if classes is None:
            raise ValueError("coco_map: pass classes together with ImageRecords")
        gt_dict = records_to_coco(gt, classes)
    gt_dict.setdefault("info", {})
    gt_dict.setdefault("licenses", [])
    gt_dict.setdefault("annotations", [])
    for key in ("images", "categories"):
        if key not in gt_dict:
            raise ValueError(f"coco_map: the ground-truth dict has no {key!r}")
    for ann in gt_dict["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    if isinstance(detections, Mapping):
        dets = predictions_to_coco(detections, label_to_category)
    else:
        dets = [dict(d) for d in detections]
    image_ids = {int(img["id"]) for img in gt_dict["images"]}
    unknown = sorted({int(d["image_id"]) for d in dets} - image_ids)
    if unknown:
        raise ValueError(f"coco_map: detections on image ids that are not in the ground truth: {unknown[:10]}")
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_dict["categories"]}
    nan = float("nan")
    if not gt_dict["images"] or not cat_names:
        return {**{k: nan for k in COCO_METRIC_NAMES}, "per_class": {n: nan for n in cat_names.values()}}

    which = coco_backend(backend)
    if which == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        def quiet(*args: Any, **kwargs: Any) -> None:
            return None

        coco_gt = COCO(gt_dict, print_function=quiet)
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_result(COCO, coco_gt)
        coco_dt.print_function = quiet
        ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=quiet)
        ev.evaluate()
        ev.accumulate()
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt_dict
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dets) if dets else _empty_result(COCO, coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
    precision = np.asarray(ev.eval["precision"])
    stats, per_cat = _summary_from_precision(precision, ev.params)
    cat_ids = list(ev.params.catIds)
    per_class = {cat_names[int(cid)]: float(per_cat[k]) for k, cid in enumerate(cat_ids)}
    return {**stats, "per_class": per_class}
