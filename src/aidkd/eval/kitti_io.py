"""KITTI object files: write/read prediction files, read label files, evaluate a label dir against a prediction dir.

A prediction line has the 15 label fields plus a score (the devkit reads exactly 16 values)::

    type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y score

We write 2D detections with the devkit's "unknown" values: ``truncated -1``, ``occluded -1``, ``alpha -10`` (no
orientation: the devkit then skips AOS), dimensions ``-1 -1 -1``, location ``-1000 -1000 -1000``,
``rotation_y -10``.
"""
from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aidkd.data.kitti import parse_kitti_label_file, read_text_file
from aidkd.data.structures import DatasetError, ObjectAnnotation
from aidkd.eval.kitti_ap import DIFFICULTIES, KITTI_CLASSES, Detection, KittiAPResult, kitti_ap_r40

__all__ = [
    "escape_class_name",
    "evaluate_kitti_dirs",
    "evaluate_kitti_dirs_full",
    "format_kitti_table",
    "format_prediction_line",
    "load_kitti_dirs",
    "read_kitti_labels",
    "read_kitti_predictions",
    "unescape_class_name",
    "write_kitti_predictions",
]

_UNKNOWN_3D = "-1 -1 -1 -1000 -1000 -1000 -10"
log = logging.getLogger("aidkd.eval")


def escape_class_name(cls: str) -> str:
    """A class name as one whitespace-free KITTI field: ``%`` and whitespace percent-encoded
    (``fire hydrant`` -> ``fire%20hydrant``); names without them are unchanged."""
    if not cls:
        raise ValueError("KITTI class names cannot be empty")
    return "".join(f"%{ord(c):02X}" if c == "%" or c.isspace() else c for c in cls)


def unescape_class_name(field: str) -> str:
    """Inverse of :func:`escape_class_name`."""
    return urllib.parse.unquote(field) if "%" in field else field


def format_prediction_line(cls: str, box: Sequence[float], score: float, alpha: float = -10.0) -> str:
    """One prediction line (no newline); the class name is escaped with :func:`escape_class_name`."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (f"{escape_class_name(cls)} -1 -1 {float(alpha):.2f} {x1:.4f} {y1:.4f} {x2:.4f} {y2:.4f} {_UNKNOWN_3D} "
            f"{float(score):.8g}")


def _to_np(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _iter_dets(dets: Any, class_names: Sequence[str] | None) -> Iterable[tuple[str, Sequence[float], float, float]]:
    if isinstance(dets, Mapping):  # {"boxes", "scores", "labels"} with labels 1..K
        if class_names is None:
            raise ValueError("write_kitti_predictions: class_names is needed to name integer labels")
        boxes = _to_np(dets["boxes"], np.float64).reshape(-1, 4)
        scores = _to_np(dets["scores"], np.float64).reshape(-1)
        labels = _to_np(dets["labels"], np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError("write_kitti_predictions: boxes, scores and labels differ in length")
        for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            if not 1 <= lab <= len(class_names):
                raise ValueError(f"write_kitti_predictions: label {lab} outside 1..{len(class_names)}")
            yield class_names[lab - 1], b, s, -10.0
        return
    for d in dets:
        if isinstance(d, Detection):
            yield d.cls, d.box, d.score, d.alpha
        else:
            cls, box, score = d[0], d[1], d[2]
            if not isinstance(cls, str):
                if class_names is None:
                    raise ValueError("write_kitti_predictions: class_names is needed to name integer labels")
                cls = class_names[int(cls) - 1]
            yield cls, box, score, -10.0


def write_kitti_predictions(path: str | Path, dets: Any, class_names: Sequence[str] | None = None) -> Path:
    """Write one image's detections to ``path`` (parents created; no detections -> an empty file).

    ``dets``: a prediction dict ``{"boxes": (N,4) xyxy original pixels, "scores", "labels" 1..K}`` (numpy or
    torch; ``class_names[label-1]`` names them), or an iterable of :class:`Detection` /
    ``(cls, box, score)`` tuples (``cls`` a name, or a 1-based label with ``class_names``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [format_prediction_line(c, b, s, a) for c, b, s, a in _iter_dets(dets, class_names)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _floats(parts: list[str], path: Path, lineno: int) -> list[float]:
    out = []
    for k, p in enumerate(parts):
        try:
            v = float(p)
        except ValueError:
            raise DatasetError(f"field {k + 2} is not a number: {p!r}", file=path, line=lineno) from None
        if not math.isfinite(v):
            raise DatasetError(f"field {k + 2} is not finite: {p!r}", file=path, line=lineno)
        out.append(v)
    return out


def _check_box(box: tuple[float, float, float, float], path: Path, lineno: int) -> None:
    if box[2] < box[0] or box[3] < box[1]:
        raise DatasetError(f"box x1 y1 x2 y2 = {box} has x2 < x1 or y2 < y1", file=path, line=lineno)


def _read_lines(path: Path, what: str) -> list[str]:
    # The data package's reader: same errors (missing, unreadable, non-UTF-8 with file and line) as label files.
    return [raw.rstrip("\r") for raw in read_text_file(path, what).split("\n")]


def read_kitti_predictions(path: str | Path) -> list[Detection]:
    """Read a prediction file (exactly 16 fields a line, as the devkit reads it; blank lines skipped).

    Malformed lines raise :class:`DatasetError` naming the file and 1-based line.
    """
    path = Path(path)
    dets: list[Detection] = []
    for lineno, line in enumerate(_read_lines(path, "prediction file"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 16:
            raise DatasetError(
                f"expected 16 fields (type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y score), "
                f"got {len(parts)}", file=path, line=lineno)
        vals = _floats(parts[1:], path, lineno)
        box = (vals[3], vals[4], vals[5], vals[6])
        _check_box(box, path, lineno)
        dets.append(Detection(cls=unescape_class_name(parts[0]), box=box, score=vals[14], alpha=vals[2]))
    return dets


def read_kitti_labels(path: str | Path) -> list[ObjectAnnotation]:
    """Read a KITTI ground-truth label file with the data package's validating reader
    (:func:`aidkd.data.kitti.parse_kitti_label_file`)."""
    return parse_kitti_label_file(path)


def load_kitti_dirs(
    gt_label_dir: str | Path, pred_dir: str | Path, stems: Iterable[str] | None = None,
) -> tuple[list[str], list[list[ObjectAnnotation]], list[list[Detection]]]:
    """Read ``<stem>.txt`` label and prediction files matched by stem.

    Every label file is evaluated (or only ``stems``); a label file without prediction file has no detections
    (a warning on the ``aidkd.eval`` logger gives their count); a prediction file without label file is an error.
    """
    gt_dir, pr_dir = Path(gt_label_dir), Path(pred_dir)
    for d, what in ((gt_dir, "ground-truth label"), (pr_dir, "prediction")):
        if not d.is_dir():
            raise DatasetError(f"{what} directory does not exist or is not a directory", file=d)
    label_files = {p.stem: p for p in gt_dir.glob("*.txt")}
    pred_files = {p.stem: p for p in pr_dir.glob("*.txt")}
    orphans = sorted(set(pred_files) - set(label_files))
    if orphans:
        shown = ", ".join(f"{s}.txt" for s in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise DatasetError(f"{len(orphans)} prediction file(s) have no label file in {gt_dir}: {shown}",
                           file=pr_dir)
    if stems is None:
        chosen = sorted(label_files)
    else:
        chosen = [str(s) for s in stems]
        missing = [s for s in chosen if s not in label_files]
        if missing:
            raise DatasetError(f"no label file for {len(missing)} requested frame(s), e.g. {missing[0]}.txt",
                               file=gt_dir)
        extra = sorted(set(pred_files) - set(chosen))
        if extra:
            raise DatasetError(f"{len(extra)} prediction file(s) are not among the requested frames, "
                               f"e.g. {extra[0]}.txt", file=pr_dir)
    if not chosen:
        raise DatasetError("no label files (*.txt) found", file=gt_dir)
    unpredicted = [s for s in chosen if s not in pred_files]
    if unpredicted:
        log.warning("%d of %d label files have no prediction file in %s (e.g. %s.txt); they count as frames with no "
                    "detections%s", len(unpredicted), len(chosen), pr_dir, unpredicted[0],
                    "" if stems is not None else
                    " (pass --split FILE, or a run folder, to evaluate only the frames you predicted)")
    gts = [read_kitti_labels(label_files[s]) for s in chosen]
    dets = [read_kitti_predictions(pred_files[s]) if s in pred_files else [] for s in chosen]
    return chosen, gts, dets


def evaluate_kitti_dirs_full(
    gt_label_dir: str | Path, pred_dir: str | Path, classes: Sequence[str] = KITTI_CLASSES,
    stems: Iterable[str] | None = None,
) -> KittiAPResult:
    """Like :func:`evaluate_kitti_dirs` but returns the full :class:`KittiAPResult` (curves, R11, gt counts)."""
    _, gts, dets = load_kitti_dirs(gt_label_dir, pred_dir, stems)
    return kitti_ap_r40(gts, dets, classes)


def evaluate_kitti_dirs(
    gt_label_dir: str | Path, pred_dir: str | Path, classes: Sequence[str] = KITTI_CLASSES,
    stems: Iterable[str] | None = None,
) -> dict[str, dict[str, float]]:
    """KITTI 2D AP|R40 in percent: ``{"Car": {"easy", "moderate", "hard"}, "Pedestrian": ..., "Cyclist": ...}``.

    A value is ``nan`` when the class has no valid gt at that difficulty.
    """
    return evaluate_kitti_dirs_full(gt_label_dir, pred_dir, classes, stems).as_dict()


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_kitti_table(result: Mapping[str, Mapping[str, float]] | KittiAPResult) -> str:
    """Markdown table: one row per class (AP|R40 easy/moderate/hard) and a mean row."""
    ap = result.ap if isinstance(result, KittiAPResult) else result
    lines = ["| Class | Easy | Moderate | Hard |", "|---|---:|---:|---:|"]
    for cls, vals in ap.items():
        lines.append(f"| {cls} | " + " | ".join(_fmt(vals.get(d, float("nan"))) for d in DIFFICULTIES) + " |")
    means = []
    for d in DIFFICULTIES:
        vs = [v[d] for v in ap.values() if d in v and not math.isnan(v[d])]
        means.append(sum(vs) / len(vs) if vs else float("nan"))
    lines.append("| **mean** | " + " | ".join(_fmt(m) for m in means) + " |")
    return "\n".join(lines) + "\n"
