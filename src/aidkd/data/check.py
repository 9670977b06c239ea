"""Dataset checking: list every problem in a KITTI folder or a COCO json, each located by file + line / json path.

``aidkd data check`` prints :func:`check_dataset`'s list and exits 1 when it is not empty.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .coco import scan_coco
from .dataset import validate_records
from .kitti import scan_kitti
from .structures import DatasetError

__all__ = ["check_dataset", "dataset_summary", "format_summary"]


def _dedup(errors: list[DatasetError]) -> list[DatasetError]:
    seen, out = set(), []
    for e in errors:
        key = (e.file, e.line, e.location, e.message)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def check_dataset(root_or_json: str | Path, fmt: str = "kitti", image_dir: str | Path | None = None,
                  decode: bool = True, with_score: bool = False, workers: int = 0) -> list[DatasetError]:
    """List EVERY problem of a dataset; an empty list means the dataset is clean.

    ``fmt="kitti"``: ``root_or_json`` is a KITTI root (``training/image_2``, ``training/label_2``, optional
    ``ImageSets/*.txt``); checks every label line, label files without images and vice versa, split files,
    every image (fully decoded when ``decode``), and boxes against the real image size (1 px tolerance).
    ``fmt="coco"``: ``root_or_json`` is an instances json; ``image_dir`` defaults as in
    :func:`aidkd.data.coco.load_coco_records`. Checks json structure/ids/boxes and every referenced image,
    including its size against the declared ``width``/``height``.
    ``fmt="auto"`` picks coco for a ``.json`` path, kitti otherwise. ``workers`` > 1 checks the images in a pool of
    that many processes.
    """
    path = Path(root_or_json)
    if fmt == "auto":
        fmt = "coco" if path.suffix.lower() == ".json" else "kitti"
    if fmt == "kitti":
        scan = scan_kitti(path, split="all", with_score=with_score, check_split_files=True)
    elif fmt == "coco":
        scan = scan_coco(path, image_dir=image_dir, categories=None)
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (expected 'kitti', 'coco' or 'auto')")
    errors = list(scan.errors)
    errors += validate_records(scan.records, check_images=True, decode=decode, workers=workers)
    return _dedup(errors)


def dataset_summary(root_or_json: str | Path, fmt: str = "kitti", image_dir: str | Path | None = None) -> dict:
    """What a dataset holds, for ``aidkd data check``'s last lines: ``images``, ``images_without_boxes`` and
    ``boxes`` per class name (crowd regions counted under ``<name> (crowd)``), from the labels alone."""
    path = Path(root_or_json)
    if fmt == "auto":
        fmt = "coco" if path.suffix.lower() == ".json" else "kitti"
    scan = scan_coco(path, image_dir=image_dir) if fmt == "coco" else scan_kitti(path, split="all")
    boxes = Counter(o.cls + (" (crowd)" if o.iscrowd else "") for r in scan.records for o in r.objects)
    return {"images": len(scan.records), "images_without_boxes": sum(not r.objects for r in scan.records),
            "boxes": dict(sorted(boxes.items(), key=lambda kv: (-kv[1], kv[0])))}


def format_summary(summary: dict) -> str:
    per_class = ", ".join(f"{name} {n}" for name, n in summary["boxes"].items()) or "none"
    return (f"{summary['images']} images ({summary['images_without_boxes']} without boxes); "
            f"{sum(summary['boxes'].values())} boxes: {per_class}")
