"""KITTI 2D object detection average precision (AP|R40, plus AP|R11), as the official devkit computes it.

This is a re-implementation of the 2D-bbox part of the KITTI object devkit (``evaluate_object.cpp``:
``cleanData``, ``computeStatistics``, ``getThresholds``, ``eval_class``), rule for rule:

* difficulties ``easy/moderate/hard``: a ground-truth (gt) box takes part when its height ``y2 - y1 >= MIN_HEIGHT``
  (40, 25, 25 px), ``occluded <= MAX_OCCLUSION`` (0, 1, 2) and ``truncated <= MAX_TRUNCATION`` (0.15, 0.3, 0.5).
  The sets are cumulative (moderate contains every easy object). A gt of the evaluated class outside the
  difficulty is *ignored*: a detection matched to it is neither TP nor FP, and it is no FN;
* neighbouring classes (``Van`` for ``Car``, ``Person_sitting`` for ``Pedestrian`` and vice versa) are ignored
  gts in the same sense; every other class (``Truck``, ``Tram``, ``Misc``, ``DontCare``, other evaluated classes)
  does not exist for the evaluated class, so a detection on it is a false positive (unless DontCare applies);
* detections lower than ``MIN_HEIGHT`` are ignored (whatever their class: like the devkit, such a detection may
  even absorb a gt of the evaluated class);
* an unmatched detection whose intersection with a ``DontCare`` box exceeds ``MIN_OVERLAP`` of the *detection's*
  area (the devkit's ``boxoverlap(det, dc, 0) > MIN_OVERLAP[class]``; 0.7 for Car, 0.5 for Pedestrian/Cyclist) is
  ignored;
* a detection matches a gt when IoU ``> MIN_OVERLAP`` (strictly; 0.7 Car, 0.5 Pedestrian and Cyclist), boxes in
  continuous pixel coordinates (no ``+1``); class names compare case-insensitively;
* score thresholds come from ``getThresholds`` (the TP scores of a greedy highest-score matching, thinned to
  ``N_SAMPLE_PTS = 41`` recall positions), TP/FP/FN are recomputed at each threshold with the devkit's
  largest-overlap matching, precision is made monotone (max to the right) and
  ``AP_R40 = sum(precision[1..40]) / 40`` (recall 0 excluded), ``AP_R11 = sum(precision[0, 4, ..., 40]) / 11``.

Like the devkit, AP assumes many gts (hundreds, as on KITTI val): the k-th threshold stands for recall k/40,
and with fewer than 41 valid gts even perfect detections score below 100 (one perfect detection of a single gt
gives AP_R40 = 0 and AP_R11 = 9.09; 40 gts all found give 97.5; 41 give 100). The tests pin these values.

Differences from the devkit, all outside its defined behaviour: a class/difficulty without any valid gt gets
``nan`` (the devkit prints nothing for it), a threshold with ``tp + fp == 0`` gets precision 0 (the devkit divides
0 by 0), and at most 41 thresholds are used (the devkit writes past its array otherwise).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aidkd.data.kitti import KITTI_DEFAULT_CLASSES
from aidkd.data.structures import ObjectAnnotation

__all__ = [
    "DIFFICULTIES",
    "KITTI_CLASSES",
    "MAX_OCCLUSION",
    "MAX_TRUNCATION",
    "MIN_HEIGHT",
    "MIN_OVERLAP",
    "N_SAMPLE_PTS",
    "Detection",
    "KittiAPResult",
    "get_thresholds",
    "kitti_ap_r40",
]

DIFFICULTIES = ("easy", "moderate", "hard")
KITTI_CLASSES = KITTI_DEFAULT_CLASSES  # the classes the KITTI benchmark evaluates
MIN_HEIGHT = (40, 25, 25)  # minimum box height (px) of evaluated gts and detections
MAX_OCCLUSION = (0, 1, 2)  # maximum occlusion level of evaluated gts
MAX_TRUNCATION = (0.15, 0.3, 0.5)  # maximum truncation of evaluated gts
N_SAMPLE_PTS = 41
# minimum IoU per class (lower-case names); the devkit's 2D values
MIN_OVERLAP = {
    "car": 0.7, "pedestrian": 0.5, "cyclist": 0.5,
    "van": 0.7, "truck": 0.7, "person_sitting": 0.5, "tram": 0.7,
}
_NEIGHBOUR = {"car": "van", "van": "car", "pedestrian": "person_sitting", "person_sitting": "pedestrian"}
_NO_DETECTION = -10000000.0


@dataclass(frozen=True)
class Detection:
    """One detection: class name, xyxy box in original image pixels, confidence score."""

    cls: str
    box: tuple[float, float, float, float]
    score: float
    alpha: float = -10.0


DetectionLike = Detection | tuple


@dataclass
class KittiAPResult:
    """Per class and difficulty: ``ap`` (AP|R40, percent), ``ap_r11`` (percent), ``num_gt`` (valid gts, the recall
    denominator) and ``curves`` -> ``(recall, precision)``: the devkit's plot data, 41 recall positions ``i/40`` and
    the interpolated precision at each (both float arrays of length 41)."""

    ap: dict[str, dict[str, float]] = field(default_factory=dict)
    ap_r11: dict[str, dict[str, float]] = field(default_factory=dict)
    num_gt: dict[str, dict[str, int]] = field(default_factory=dict)
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def mean_ap(self, difficulty: str = "moderate") -> float:
        """Mean AP|R40 over classes at one difficulty, ``nan`` classes (no gt) left out; ``nan`` if none is left."""
        vals = [v[difficulty] for v in self.ap.values() if not math.isnan(v[difficulty])]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{class: {difficulty: AP|R40 percent}}`` (plain floats; a copy)."""
        return {c: dict(v) for c, v in self.ap.items()}


# ----------------------------------------------------------------------------------------------------------------
# devkit pieces
# ----------------------------------------------------------------------------------------------------------------

def get_thresholds(scores: Iterable[float], n_groundtruth: int) -> list[float]:
    """The devkit's ``getThresholds``: scores (of TPs) giving recall steps closest to ``k / (N_SAMPLE_PTS - 1)``."""
    v = sorted((float(s) for s in scores), reverse=True)
    t: list[float] = []
    current_recall = 0.0
    n = len(v)
    for i in range(n):
        l_recall = (i + 1) / n_groundtruth
        r_recall = (i + 2) / n_groundtruth if i < n - 1 else l_recall
        if (r_recall - current_recall) < (current_recall - l_recall) and i < n - 1:
            continue
        t.append(v[i])
        current_recall += 1.0 / (N_SAMPLE_PTS - 1.0)
    return t


def _iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``boxoverlap(det, gt, -1)`` for all pairs: (D, G) IoU, 0 where the intersection is empty."""
    x1 = np.maximum(det[:, None, 0], gt[None, :, 0])
    y1 = np.maximum(det[:, None, 1], gt[None, :, 1])
    x2 = np.minimum(det[:, None, 2], gt[None, :, 2])
    y2 = np.minimum(det[:, None, 3], gt[None, :, 3])
    w = x2 - x1
    h = y2 - y1
    valid = (w > 0) & (h > 0)
    inter = w * h
    a_area = ((det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]))[:, None]
    b_area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        o = inter / (a_area + b_area - inter)
    return np.where(valid, o, 0.0)


def _ioa_det(det: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """``boxoverlap(det, dc, 0)``: intersection over the detection's area, (D, C)."""
    x1 = np.maximum(det[:, None, 0], dc[None, :, 0])
    y1 = np.maximum(det[:, None, 1], dc[None, :, 1])
    x2 = np.minimum(det[:, None, 2], dc[None, :, 2])
    y2 = np.minimum(det[:, None, 3], dc[None, :, 3])
    w = x2 - x1
    h = y2 - y1
    valid = (w > 0) & (h > 0)
    a_area = ((det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        o = (w * h) / a_area
    return np.where(valid, o, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# input normalisation
# ----------------------------------------------------------------------------------------------------------------

def _det_fields(d: DetectionLike) -> tuple[str, tuple, float]:
    if isinstance(d, Detection):
        return d.cls, d.box, d.score
    if isinstance(d, tuple) and len(d) >= 3:
        return d[0], d[1], d[2]
    raise TypeError(f"a detection must be a Detection or a (cls, box_xyxy, score) tuple, got {d!r}")


class _Frame:
    """One image's gts and detections as arrays; class names as integer codes (shared per evaluation call)."""

    def __init__(self, gts: Sequence[ObjectAnnotation], dets: Sequence[DetectionLike], codes: dict[str, int]):
        def code(name: str) -> int:
            return codes.setdefault(str(name).lower(), len(codes))

        self.gt_code = np.array([code(o.cls) for o in gts], dtype=np.int64)
        self.gt_boxes = np.array([[float(c) for c in o.box] for o in gts], dtype=np.float64).reshape(-1, 4)
        self.gt_trunc = np.array([float(o.truncated) for o in gts], dtype=np.float64)
        self.gt_occ = np.array([int(o.occluded) for o in gts], dtype=np.int64)
        self.gt_height = self.gt_boxes[:, 3] - self.gt_boxes[:, 1]
        self.dc_boxes = self.gt_boxes[self.gt_code == code("dontcare")]
        fields = [_det_fields(d) for d in dets]
        self.det_code = np.array([code(f[0]) for f in fields], dtype=np.int64)
        self.det_boxes = np.array([[float(c) for c in f[1]] for f in fields], dtype=np.float64).reshape(-1, 4)
        self.det_scores = np.array([float(f[2]) for f in fields], dtype=np.float64)
        self.det_height = np.abs(self.det_boxes[:, 1] - self.det_boxes[:, 3])
        self._iou: np.ndarray | None = None
        self._ioa_dc: np.ndarray | None = None

    @property
    def iou(self) -> np.ndarray:
        """(N, G) IoU of every detection with every gt, computed once for all classes/difficulties."""
        if self._iou is None:
            self._iou = _iou(self.det_boxes, self.gt_boxes)
        return self._iou

    @property
    def ioa_dc(self) -> np.ndarray:
        """(N, C) intersection over detection area with every DontCare box."""
        if self._ioa_dc is None:
            self._ioa_dc = _ioa_det(self.det_boxes, self.dc_boxes)
        return self._ioa_dc


# ----------------------------------------------------------------------------------------------------------------
# per class and difficulty
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Cleaned:
    """One frame after cleanData, reduced to the gts/detections that take part (ignored_* != -1)."""

    ig_gt: list[int]  # per relevant gt: 0 valid, 1 ignored
    ig_det: list[int]  # per relevant det: 0 valid, 1 ignored (too small)
    scores: list[float]  # per relevant det
    scores_desc: np.ndarray  # the same, sorted descending
    cands: list[list[int]]  # per relevant gt: relevant det indices with IoU > min_overlap, in detection order
    overlaps: np.ndarray  # (D', G')
    fp_pool: np.ndarray  # per relevant det: counts as FP when unassigned and above threshold (valid, not in DC)
    fp_scores_desc: np.ndarray  # scores of fp_pool dets, descending
    n_valid_gt: int
    any_cand: bool


def _clean(frame: _Frame, cls_code: int, nb_code: int, diff: int, min_overlap: float) -> _Cleaned | None:
    """cleanData for one frame; ``None`` when nothing of the frame takes part."""
    # --- ground truth: 1 = evaluated class, 0 = neighbour class, -1 = anything else
    valid_class = np.where(frame.gt_code == cls_code, 1, np.where(frame.gt_code == nb_code, 0, -1))
    ignore = ((frame.gt_occ > MAX_OCCLUSION[diff]) | (frame.gt_trunc > MAX_TRUNCATION[diff])
              | (frame.gt_height < MIN_HEIGHT[diff]))
    ig_gt_all = np.where((valid_class == 1) & ~ignore, 0,
                         np.where((valid_class == 0) | (ignore & (valid_class == 1)), 1, -1))
    # --- detections: 1 = too small (any class), 0 = evaluated class, -1 = other class
    ig_det_all = np.where(frame.det_height < MIN_HEIGHT[diff], 1, np.where(frame.det_code == cls_code, 0, -1))

    g_idx = np.nonzero(ig_gt_all != -1)[0]
    d_idx = np.nonzero(ig_det_all != -1)[0]
    if not len(g_idx) and not len(d_idx):
        return None
    ig_gt = ig_gt_all[g_idx]
    ig_det = ig_det_all[d_idx]
    scores = frame.det_scores[d_idx]
    if len(d_idx) and len(g_idx):
        overlaps = frame.iou[np.ix_(d_idx, g_idx)]
        cand_mask = overlaps > min_overlap
        cands = [np.nonzero(cand_mask[:, g])[0].tolist() for g in range(len(g_idx))]
    else:
        overlaps = np.zeros((len(d_idx), len(g_idx)))
        cands = [[] for _ in range(len(g_idx))]
    fp_pool = ig_det == 0
    if len(frame.dc_boxes) and len(d_idx):
        fp_pool &= ~(frame.ioa_dc[d_idx] > min_overlap).any(axis=1)
    return _Cleaned(
        ig_gt=ig_gt.tolist(), ig_det=ig_det.tolist(), scores=scores.tolist(), scores_desc=-np.sort(-scores),
        cands=cands, overlaps=overlaps, fp_pool=fp_pool, fp_scores_desc=-np.sort(-scores[fp_pool]),
        n_valid_gt=int((ig_gt == 0).sum()), any_cand=any(cands),
    )


def _tp_scores(c: _Cleaned) -> list[float]:
    """computeStatistics(compute_fp=false): per gt, the unassigned candidate with the highest score."""
    assigned = [False] * len(c.scores)
    v: list[float] = []
    for g, cands in enumerate(c.cands):
        det_idx = -1
        valid_detection = _NO_DETECTION
        for j in cands:
            if assigned[j]:
                continue
            if c.scores[j] > valid_detection:
                det_idx = j
                valid_detection = c.scores[j]
        if valid_detection == _NO_DETECTION:
            continue
        if c.ig_gt[g] == 1 or c.ig_det[det_idx] == 1:
            assigned[det_idx] = True
        else:
            v.append(c.scores[det_idx])
            assigned[det_idx] = True
    return v


def _stats_at(c: _Cleaned, thresh: float) -> tuple[int, int, int]:
    """computeStatistics(compute_fp=true, thresh) of one frame: (tp, assigned pool detections, fn).

    FP = pool detections (valid class and height, not on DontCare) above the threshold minus those assigned to a
    gt; the caller counts the former.
    """
    scores, ig_det, ov = c.scores, c.ig_det, c.overlaps
    assigned = [False] * len(scores)
    tp = fn = 0
    fp_removed = 0  # assigned detections that would otherwise count as FP
    for g, cands in enumerate(c.cands):
        det_idx = -1
        found = False
        max_overlap = 0.0
        assigned_ignored_det = False
        for j in cands:
            if assigned[j] or scores[j] < thresh:
                continue
            overlap = ov[j, g]
            if (overlap > max_overlap or assigned_ignored_det) and ig_det[j] == 0:
                max_overlap = overlap
                det_idx = j
                found = True
                assigned_ignored_det = False
            elif not found and ig_det[j] == 1:
                det_idx = j
                found = True
                assigned_ignored_det = True
        if not found:
            if c.ig_gt[g] == 0:
                fn += 1
            continue
        if c.ig_gt[g] != 1 and ig_det[det_idx] != 1:
            tp += 1
        assigned[det_idx] = True
        if c.fp_pool[det_idx]:
            fp_removed += 1
    return tp, fp_removed, fn


def _eval_class(frames: list[_Frame], cls_code: int, nb_code: int, diff: int, min_overlap: float):
    cleaned = [c for c in (_clean(f, cls_code, nb_code, diff, min_overlap) for f in frames) if c is not None]
    n_gt = sum(c.n_valid_gt for c in cleaned)
    if n_gt == 0:
        return None
    v: list[float] = []
    for c in cleaned:
        if c.any_cand:
            v.extend(_tp_scores(c))
    thresholds = get_thresholds(v, n_gt)[:N_SAMPLE_PTS]
    nt = len(thresholds)
    thr = np.asarray(thresholds, dtype=np.float64)
    tp = np.zeros(nt, dtype=np.int64)
    fp = np.zeros(nt, dtype=np.int64)
    fn = np.zeros(nt, dtype=np.int64)
    if nt:
        neg_thr = -thr
        for c in cleaned:
            fn_base = c.n_valid_gt
            if len(c.fp_scores_desc):
                fp += np.searchsorted(-c.fp_scores_desc, neg_thr, side="right")  # pool detections >= threshold
            if not c.any_cand:  # nothing can be matched: every valid gt is a FN
                fn += fn_base
                continue
            # the outcome only depends on which detections are above the threshold, i.e. on their number
            n_active = np.searchsorted(-c.scores_desc, neg_thr, side="right")
            keys, inverse = np.unique(n_active, return_inverse=True)
            per_key = np.array([_stats_at(c, float(c.scores_desc[k - 1]) if k else np.inf) for k in keys],
                               dtype=np.int64).reshape(-1, 3)[inverse.reshape(-1)]
            tp += per_key[:, 0]
            fp -= per_key[:, 1]
            fn += per_key[:, 2]
    precision = np.zeros(N_SAMPLE_PTS, dtype=np.float64)
    denom = tp + fp
    precision[:nt] = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
    for i in range(nt):
        precision[i] = precision[i:].max()
    return n_gt, precision, thr


def kitti_ap_r40(
    gts: Sequence[Sequence[ObjectAnnotation]],
    dets: Sequence[Sequence[DetectionLike]],
    classes: Sequence[str] = KITTI_CLASSES,
    min_overlap: dict[str, float] | None = None,
) -> KittiAPResult:
    """KITTI 2D AP|R40 (and R11) per class and difficulty, in percent.

    ``gts[i]``: every labelled object of image ``i`` as in the label file (including DontCare, Van, ...), with
    ``truncated``/``occluded``; ``dets[i]``: detections of image ``i`` as :class:`Detection` or
    ``(cls, (x1, y1, x2, y2), score)`` tuples, in the order they appear (the order breaks ties like the devkit).
    ``min_overlap`` overrides the IoU threshold per class (keys case-insensitive).
    """
    if len(gts) != len(dets):
        raise ValueError(f"gts and dets must have one entry per image, got {len(gts)} and {len(dets)}")
    overlap_table = dict(MIN_OVERLAP)
    if min_overlap:
        overlap_table.update({k.lower(): float(v) for k, v in min_overlap.items()})
    for cls in classes:
        if cls.lower() not in overlap_table:
            raise ValueError(f"no KITTI IoU threshold for class {cls!r}; pass min_overlap={{{cls!r}: ...}}")
    codes: dict[str, int] = {}
    frames = [_Frame(g, d, codes) for g, d in zip(gts, dets)]
    result = KittiAPResult()
    positions = np.arange(N_SAMPLE_PTS, dtype=np.float64) / (N_SAMPLE_PTS - 1.0)
    for cls in classes:
        key = cls.lower()
        cls_code = codes.setdefault(key, len(codes))
        nb_code = codes.setdefault(_NEIGHBOUR[key], len(codes)) if key in _NEIGHBOUR else -1
        for store in (result.ap, result.ap_r11, result.num_gt, result.curves, result.thresholds):
            store[cls] = {}
        for diff, name in enumerate(DIFFICULTIES):
            out = _eval_class(frames, cls_code, nb_code, diff, overlap_table[key])
            if out is None:
                nan = float("nan")
                result.ap[cls][name] = nan
                result.ap_r11[cls][name] = nan
                result.num_gt[cls][name] = 0
                result.curves[cls][name] = (positions.copy(), np.zeros(N_SAMPLE_PTS))
                result.thresholds[cls][name] = np.zeros(0)
                continue
            n_gt, precision, thr = out
            result.ap[cls][name] = float(precision[1:].sum() / 40.0 * 100.0)
            result.ap_r11[cls][name] = float(precision[0::4].sum() / 11.0 * 100.0)
            result.num_gt[cls][name] = n_gt
            result.curves[cls][name] = (positions.copy(), precision)
            result.thresholds[cls][name] = thr
    return result
