"""Accumulate a model's predictions over a split and compute COCO, VOC and (optionally) KITTI metrics at once."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aidkd.data.structures import ImageRecord
from aidkd.eval.coco_map import COCO_METRIC_NAMES, coco_map, records_to_coco, split_objects
from aidkd.eval.kitti_ap import DIFFICULTIES, MIN_OVERLAP, Detection, KittiAPResult, kitti_ap_r40
from aidkd.eval.voc import voc_map

__all__ = ["DetectionEvaluator", "format_metrics_table"]


def read_metrics(text: str) -> dict:
    """A metrics object written by ``strict_json`` (one json object), with ``null`` read back as NaN."""
    import json

    return {k: float("nan") if v is None else v for k, v in json.loads(text).items()}


def strict_json(obj: Any, **kwargs) -> str:
    """``json.dumps`` writing strict JSON: NaN and infinities (an AP without ground truth, a diverged loss) become
    ``null``, which every JSON reader accepts (bare ``NaN`` is not JSON)."""
    import json

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _to_np(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def coco_key(name: str) -> str:
    """The key of one of COCO's summary numbers (``name`` in ``COCO_METRIC_NAMES``: ``coco/AP``, ``coco/AP50``...)."""
    return f"coco/{name}"


#: The headline metric (the key in ``DetectionEvaluator.compute()``); training logs it as ``val/coco/AP``
#: (``aidkd.engine.module.VAL_PREFIX``) and keeps the best checkpoint by it.
PRIMARY_METRIC = coco_key("AP")
#: the other headline keys: VOC mAP at IoU 0.5 (the paper's KITTI metric) and KITTI AP|R40 moderate, class mean
VOC_METRIC = "voc/mAP50"
KITTI_METRIC = "kitti/moderate_mAP"
#: the headline keys in the order tables show them
HEADLINE_METRICS = (*(coco_key(n) for n in COCO_METRIC_NAMES), VOC_METRIC, KITTI_METRIC)


def coco_class_key(cls: str) -> str:
    """The key of a class's COCO AP (``coco/AP/<class>``)."""
    return f"coco/AP/{cls}"


def voc_class_key(cls: str) -> str:
    """The key of a class's VOC AP at IoU 0.5 (``voc/AP50/<class>``)."""
    return f"voc/AP50/{cls}"


def kitti_class_key(cls: str, difficulty: str) -> str:
    """The key of a class's KITTI AP|R40 at one difficulty (``kitti/<class>/<difficulty>``)."""
    return f"kitti/{cls}/{difficulty}"


def scored_detections(pred: Mapping[str, Any], target: Mapping[str, Any], score_thresh: float):
    """The detections evaluation scores, in the image's original pixels on the CPU: ``(keep, {"boxes", "scores",
    "labels"})`` for a model output ``pred`` of the dataset sample ``target``; kept are scores >= ``score_thresh``
    and labels >= 1 (0 is background, never a class), boxes divided by the dataset's exact per-axis resize factors
    (evaluation never flips). Validation and ``aidkd report`` score the same boxes through it."""
    import torch

    sx, sy = (float(v) for v in target.get("scale_xy", (target["scale"], target["scale"])))
    keep = (pred["scores"] >= score_thresh) & (pred["labels"] >= 1)
    boxes = pred["boxes"][keep].float() / torch.tensor([sx, sy, sx, sy], device=pred["boxes"].device)
    return keep, {"boxes": boxes.cpu(), "scores": pred["scores"][keep].cpu(), "labels": pred["labels"][keep].cpu()}


def metric_classes(metrics: Mapping[str, float]) -> list[str]:
    """The class names of the per-class COCO / VOC keys in ``metrics``, in order (a name may hold "/" itself)."""
    out = []
    for k in metrics:
        parts = k.split("/", 2)
        if len(parts) == 3 and parts[0] in ("coco", "voc") and parts[1] in ("AP", "AP50") and parts[2] not in out:
            out.append(parts[2])
    return out


class DetectionEvaluator:
    """Collects per-image predictions and computes flat metrics (percent).

    ``records``: the split's images in *original* pixels (ImageRecord.objects, KITTI fields included);
    ``classes``: the configured class list (label ``k`` = ``classes[k-1]``); ``kitti``: also compute KITTI AP|R40
    (classes must then be KITTI names). For COCO and VOC, objects are split as ``DetectionDataset`` splits them:
    non-crowd objects of ``classes`` are positives, every other object (crowd, DontCare, Van, any unlisted class)
    an ignore region (see :mod:`aidkd.eval.coco_map` and :mod:`aidkd.eval.voc`); KITTI uses the raw objects with
    the devkit's own rules (Van ignored for Car, DontCare areas, difficulties).

    ``update(image_ids, predictions)`` takes a batch: ``predictions[i]`` a dict with ``boxes`` (N,4) xyxy in
    original image pixels, ``scores`` (N,), ``labels`` (N,) in 1..K (tensors on any device or numpy). A second
    update of the same image replaces its predictions. ``compute()`` evaluates every record (an image never
    updated has no detections) or, with ``restrict_to_seen=True``, only the updated images.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        classes: Sequence[str],
        kitti: bool = False,
        *,
        voc_iou: float = 0.5,
    ):
        self.records = list(records)
        self.classes = list(classes)
        self.kitti = bool(kitti)
        self.voc_iou = voc_iou
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"DetectionEvaluator: empty or duplicate class list {self.classes}")
        self._by_id: dict[int, ImageRecord] = {}
        for rec in self.records:
            if int(rec.image_id) in self._by_id:
                raise ValueError(f"DetectionEvaluator: duplicate image_id {rec.image_id}")
            self._by_id[int(rec.image_id)] = rec
        if self.kitti:
            unknown = [c for c in self.classes if c.lower() not in MIN_OVERLAP]
            if unknown:
                raise ValueError(f"DetectionEvaluator(kitti=True): {unknown} are not KITTI classes")
        self._preds: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.kitti_result: KittiAPResult | None = None  # set by compute() when kitti=True (PR curves etc.)

    def reset(self) -> None:
        self._preds.clear()
        self.kitti_result = None

    def __len__(self) -> int:
        return len(self._preds)

    def update(self, image_ids: Iterable[Any], predictions: Sequence[Mapping[str, Any]]) -> None:
        ids = [int(i.item()) if hasattr(i, "item") else int(i) for i in image_ids]
        if len(ids) != len(predictions):
            raise ValueError(f"update: {len(ids)} image ids for {len(predictions)} predictions")
        k = len(self.classes)
        for img_id, pred in zip(ids, predictions):
            if img_id not in self._by_id:
                raise KeyError(f"update: image_id {img_id} is not in the evaluator's records")
            boxes = _to_np(pred["boxes"], np.float64).reshape(-1, 4)
            scores = _to_np(pred["scores"], np.float64).reshape(-1)
            labels = _to_np(pred["labels"], np.int64).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"update: image {img_id}: boxes, scores and labels differ in length")
            if labels.size and (labels.min() < 1 or labels.max() > k):
                raise ValueError(f"update: image {img_id}: labels must be in 1..{k}, got {sorted(set(labels.tolist()))}")
            self._preds[img_id] = (boxes, scores, labels)

    def _empty(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)

    def compute(self, restrict_to_seen: bool = False) -> dict[str, float]:
        """Flat metrics: ``coco/AP``, ``coco/AP50``, ``coco/AP75``, ``coco/APs``, ``coco/APm``, ``coco/APl``,
        ``coco/AP/<class>``, ``voc/mAP50``, ``voc/AP50/<class>`` and with ``kitti`` ``kitti/<class>/<difficulty>``
        and ``kitti/moderate_mAP``. ``nan`` marks a value without ground truth to measure it."""
        records = [r for r in self.records if int(r.image_id) in self._preds] if restrict_to_seen else self.records
        preds = [self._preds.get(int(r.image_id)) or self._empty() for r in records]
        metrics: dict[str, float] = {}

        # COCO
        gt = records_to_coco(records, self.classes)
        dets = {int(r.image_id): {"boxes": p[0], "scores": p[1], "labels": p[2]} for r, p in zip(records, preds)}
        coco = coco_map(gt, dets)
        for name in COCO_METRIC_NAMES:
            metrics[coco_key(name)] = coco[name]
        for cls in self.classes:
            metrics[coco_class_key(cls)] = coco["per_class"].get(cls, float("nan"))

        # VOC
        gt_boxes, gt_labels, ign_boxes = [], [], []
        for r in records:
            positives, ignores = split_objects(r.objects, self.classes)
            gt_boxes.append(np.array([o.box for o, _ in positives], dtype=np.float64).reshape(-1, 4))
            gt_labels.append(np.array([lab for _, lab in positives], dtype=np.int64))
            ign_boxes.append(np.array([o.box for o, _ in ignores], dtype=np.float64).reshape(-1, 4))
        voc = voc_map(gt_boxes, gt_labels, ign_boxes, [p[0] for p in preds], [p[1] for p in preds],
                      [p[2] for p in preds], num_classes=len(self.classes), iou=self.voc_iou,
                      class_names=self.classes)
        metrics[VOC_METRIC] = voc["mAP"]
        for cls in self.classes:
            metrics[voc_class_key(cls)] = voc["per_class"][cls]

        # KITTI
        if self.kitti:
            kdets = [
                [Detection(self.classes[lab - 1], tuple(b), s) for b, s, lab in
                 zip(p[0].tolist(), p[1].tolist(), p[2].tolist())]
                for p in preds
            ]
            res = kitti_ap_r40([r.objects for r in records], kdets, self.classes)
            self.kitti_result = res
            for cls in self.classes:
                for diff in DIFFICULTIES:
                    metrics[kitti_class_key(cls, diff)] = res.ap[cls][diff]
            metrics[KITTI_METRIC] = res.mean_ap("moderate")
        return metrics


_METRIC_MEANINGS = {
    "coco/AP": "COCO AP, IoU 0.50:0.95, mean over classes", "coco/AP50": "COCO AP at IoU 0.50",
    "coco/AP75": "COCO AP at IoU 0.75", "coco/APs": "COCO AP, small objects (< 32x32 px)",
    "coco/APm": "COCO AP, medium objects", "coco/APl": "COCO AP, large objects (> 96x96 px)",
    VOC_METRIC: "VOC mAP at IoU 0.5 (the paper's KITTI metric)",
    KITTI_METRIC: "KITTI AP|R40, moderate, mean over classes",
}


def metric_meaning(key: str) -> str:
    """What a flat metric key measures, in words (empty for keys it does not know)."""
    if key in _METRIC_MEANINGS:
        return _METRIC_MEANINGS[key]
    parts = key.split("/", 2)
    if key.startswith("coco/AP/") and len(parts) == 3:
        return f"COCO AP of class {parts[2]}"
    if key.startswith("voc/AP50/") and len(parts) == 3:
        return f"VOC AP at IoU 0.5 of class {parts[2]}"
    if key.startswith("kitti/"):
        cls, _, diff = key[len("kitti/"):].rpartition("/")
        if cls and diff in DIFFICULTIES:
            return f"KITTI AP|R40 of class {cls}, {diff}"
    return ""


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """Markdown table ``| Metric | Value (%) | Meaning |`` in the given order; ``nan`` shows as ``n/a``."""
    lines = ["| Metric | Value (%) | Meaning |", "|---|---:|---|"]
    for key, val in metrics.items():
        try:
            v = float(val)
            shown = "n/a" if math.isnan(v) else f"{v:.2f}"
        except (TypeError, ValueError):
            shown = str(val)
        lines.append("| " + " | ".join(markdown_cell(x) for x in (key, shown, metric_meaning(key))) + " |")
    return "\n".join(lines) + "\n"


def markdown_cell(text: object) -> str:
    """``text`` for a markdown table cell: a ``|`` (as in ``AP|R40``) escaped, so it does not split the cell."""
    return str(text).replace("|", "\\|")
