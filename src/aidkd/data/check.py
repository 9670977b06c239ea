"""Dataset checking: list every problem in a KITTI folder, a COCO json or a YOLO dataset, each located by file +
line / json path / yaml key.

``aidkd data check`` prints :func:`check_dataset`'s list and exits 1 when it is not empty.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .coco import find_coco_split, scan_coco
from .dataset import validate_records
from .kitti import scan_kitti
from .structures import DatasetError
from .yolo import YOLO_SPLITS, read_data_yaml, scan_yolo

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
    ``fmt="coco"``: ``root_or_json`` is an instances json (``image_dir`` defaults as in
    :func:`aidkd.data.coco.load_coco_records`) or a COCO root folder (each split :func:`coco_sources` finds).
    Checks json structure/ids/boxes and every referenced image, including its size against the declared
    ``width``/``height``.
    ``fmt="yolo"``: ``root_or_json`` is a ``data.yaml`` or its folder; checks the yaml, every label line of every
    split (train, val, test), every listed image, and images that are in two splits.
    ``fmt="auto"`` picks coco for a ``.json`` path or a COCO root, yolo for a ``.yaml`` or a folder holding
    ``data.yaml``, kitti otherwise. ``workers`` > 1 checks the
    images in a pool of that many processes.
    """
    path = Path(root_or_json)
    fmt = _auto_format(path) if fmt == "auto" else fmt
    if fmt == "yolo":
        return _dedup(_check_yolo(path, decode))
    if fmt == "kitti":
        scans = [scan_kitti(path, split="all", with_score=with_score, check_split_files=True)]
    elif fmt == "coco":
        scans = [scan_coco(ann, image_dir=images, categories=None) for ann, images in coco_sources(path, image_dir)]
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (expected 'kitti', 'coco', 'yolo' or 'auto')")
    errors = [e for scan in scans for e in scan.errors]
    errors += validate_records([r for scan in scans for r in scan.records], check_images=True, decode=decode,
                                workers=workers)
    return _dedup(errors)


def _auto_format(path: Path) -> str:
    """coco for a ``.json`` file, else the layout a folder shows (``data.yaml``: yolo, ``annotations/*.json``:
    coco), else kitti."""
    from .layout import detect_layout

    if path.suffix.lower() == ".json":
        return "coco"
    layout = detect_layout(path)
    return layout if layout in ("coco", "yolo") else "kitti"


def _yolo_scans(path: Path) -> list:
    """``(split, scan)`` for each split of a YOLO dataset (a bad data.yaml: one scan holding that error)."""
    try:
        splits = [s for s in YOLO_SPLITS if s in read_data_yaml(path).splits]
    except DatasetError:
        splits = ["train"]  # scan_yolo reports the yaml's problem
    return [(s, scan_yolo(path, split=s)) for s in splits]


def _check_yolo(path: Path, decode: bool) -> list[DatasetError]:
    errors: list[DatasetError] = []
    first_split: dict[Path, str] = {}
    for split, scan in _yolo_scans(path):
        errors += scan.errors
        errors += validate_records(scan.records, check_images=True, decode=decode)  # image ids are per split
        for r in scan.records:
            other = first_split.setdefault(Path(r.image_path).resolve(), split)
            if other != split:
                errors.append(DatasetError(f"image is in both the {other} and the {split} split", file=r.image_path))
    return errors


def coco_sources(path: str | Path, image_dir: str | Path | None = None) -> list[tuple[Path, Path | None]]:
    """``[(instances json, image folder)]`` to check: the json given, or every split :func:`find_coco_split` finds
    in a COCO root folder (an error naming what to pass when it finds none)."""
    path = Path(path)
    if not path.is_dir():
        return [(path, Path(image_dir) if image_dir else None)]
    if image_dir is not None:
        raise ValueError(f"--images goes with an instances json, not with the COCO root {path} (its image folders "
                         "are found beside annotations/)")
    hint = "pass an instances json as ROOT instead (and --images its image folder)"
    found, errors = [], []
    for split in ("train", "val"):
        try:
            found.append(find_coco_split(path, split, hint=hint))
        except DatasetError as e:
            errors.append(e)
    if not found:  # the first split's reason (a KITTI folder, no annotations/, no image folder)
        raise errors[0]
    return found


def dataset_summary(root_or_json: str | Path, fmt: str = "kitti", image_dir: str | Path | None = None) -> dict:
    """What a dataset holds, for ``aidkd data check``'s last lines: ``images``, ``images_without_boxes`` and
    ``boxes`` per class name (crowd regions counted under ``<name> (crowd)``), from the labels alone."""
    path = Path(root_or_json)
    fmt = _auto_format(path) if fmt == "auto" else fmt
    if fmt == "yolo":
        records = [r for _, scan in _yolo_scans(path) for r in scan.records]
    elif fmt == "coco":
        records = [r for ann, images in coco_sources(path, image_dir) for r in scan_coco(ann, image_dir=images).records]
    else:
        records = scan_kitti(path, split="all").records
    boxes = Counter(o.cls + (" (crowd)" if o.iscrowd else "") for r in records for o in r.objects)
    return {"images": len(records), "images_without_boxes": sum(not r.objects for r in records),
            "boxes": dict(sorted(boxes.items(), key=lambda kv: (-kv[1], kv[0])))}


def format_summary(summary: dict) -> str:
    per_class = ", ".join(f"{name} {n}" for name, n in summary["boxes"].items()) or "none"
    return (f"{summary['images']} images ({summary['images_without_boxes']} without boxes); "
            f"{sum(summary['boxes'].values())} boxes: {per_class}")
