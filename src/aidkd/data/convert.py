"""``aidkd data convert``: a KITTI, COCO or YOLO dataset written in another of these layouts.

The source is read with the same checks as for training (an invalid source is refused, every problem listed);
the destination is a new or empty folder outside the source, built beside it under a temporary name and renamed
when complete. Images are symlinked (or copied); labels are written. Splits: KITTI's train/val (``ImageSets`` or
the deterministic split, as training reads them), each COCO json (``instances_<split>.json``), YOLO's
train/val/test. Every class of the source is a class of the destination, in the source's order (KITTI: its nine
classes, DontCare included). What a layout cannot hold is said, not guessed: KITTI-only fields (truncation,
occlusion, 3D) are not carried to COCO/YOLO, COCO crowd regions become KITTI DontCare boxes and are left out of
YOLO labels (counted in the log), and class names outside KITTI's vocabulary cannot be written as KITTI.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .coco import load_coco_records
from .kitti import IMAGE_EXTENSIONS, KITTI_CLASSES, format_kitti_line, load_kitti_records
from .structures import DatasetError, ImageRecord, ObjectAnnotation
from .yolo import YOLO_SPLITS, format_yolo_line, load_yolo_records, read_data_yaml

__all__ = ["CONVERT_FORMATS", "convert_dataset"]

CONVERT_FORMATS = ("kitti", "coco", "yolo")
log = logging.getLogger("aidkd.data")


@dataclass
class _Source:
    names: list[str]
    splits: dict[str, list[ImageRecord]]
    root: Path  # the folder nothing may be written into


def _coco_jsons(src: Path) -> list[tuple[str, Path]]:
    """``(split, json)``: SRC itself (a json) or every ``SRC/annotations/instances_<split>.json``."""
    if src.is_file():
        files = [src]
    else:
        files = sorted((src / "annotations").glob("instances_*.json"))
        if not files:
            raise DatasetError("no annotations/instances_<split>.json here; pass a COCO instances json or the "
                               "folder holding annotations/", file=src)
    out: dict[str, Path] = {}
    for f in files:
        name = f.stem.removeprefix("instances_")
        split = next((s for s in YOLO_SPLITS if name.startswith(s)), name)  # val2017 -> val
        if split in out:
            raise DatasetError(f"two jsons for the {split} split ({out[split].name} and {f.name}); pass one json",
                               file=f)
        out[split] = f
    return list(out.items())


def _read(src: Path, fmt: str) -> _Source:
    if fmt == "kitti":
        splits = {s: load_kitti_records(src, split=s, read_sizes=True) for s in ("train", "val")}
        return _Source(list(KITTI_CLASSES), splits, src)
    if fmt == "yolo":
        data = read_data_yaml(src)
        splits = {s: load_yolo_records(src, split=s)[0] for s in YOLO_SPLITS if s in data.splits}
        return _Source(data.names, splits, data.root)
    names: list[str] | None = None
    splits = {}
    for split, ann in _coco_jsons(src):
        records, classes = load_coco_records(ann)
        if names is not None and classes != names:
            raise DatasetError(f"its categories ({', '.join(classes)}) differ from the other json's "
                               f"({', '.join(names)})", file=ann, location="categories")
        names, splits[split] = classes, records
    root = src.parent.parent if src.is_file() and src.parent.name == "annotations" else (
        src.parent if src.is_file() else src)
    return _Source(names or [], splits, root)


def _check_destination(dst: Path, source_root: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetError("the destination must be a new or empty folder", file=dst)
    d, s = dst.resolve(), source_root.resolve()
    if d == s or s in d.parents:
        raise DatasetError(f"the destination is inside the source dataset {source_root}; choose a folder outside it",
                           file=dst)


def _place_image(image: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(image, dst)
    else:
        dst.symlink_to(Path(os.path.abspath(image)))


def _unique_names(records: list[ImageRecord], split: str, what: Callable[[ImageRecord], str]) -> None:
    seen: dict[str, Path] = {}
    for r in records:
        key = what(r)
        if key in seen:
            raise DatasetError(f"two images named {key!r} in the {split} split ({seen[key]} and {r.image_path}); "
                               "the destination layout keeps one folder per split", file=r.image_path)
        seen[key] = r.image_path


def _write_yolo(source: _Source, out: Path, copy: bool) -> int:
    dropped = 0
    for split, records in source.splits.items():
        if split not in YOLO_SPLITS:
            raise DatasetError(f"a YOLO data.yaml has the splits {', '.join(YOLO_SPLITS)}, not {split!r}; rename "
                               "the source's split", file=records[0].source if records else None)
        _unique_names(records, split, lambda r: r.image_path.stem)
        for r in records:
            _place_image(r.image_path, out / "images" / split / r.image_path.name, copy)
            lines = [format_yolo_line(source.names.index(o.cls), o.box, (r.width, r.height))
                     for o in r.objects if not o.iscrowd]
            dropped += sum(o.iscrowd for o in r.objects)
            lbl = out / "labels" / split / f"{r.image_path.stem}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            lbl.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    # no `path`: Ultralytics and aidkd then both read the splits relative to this file's folder
    data = {split: f"images/{split}" for split in source.splits} | {"names": dict(enumerate(source.names))}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return dropped


def _write_kitti(source: _Source, out: Path, copy: bool) -> int:
    unknown = [n for n in source.names if n not in KITTI_CLASSES]
    used = {o.cls for records in source.splits.values() for r in records for o in r.objects if not o.iscrowd}
    if unknown and used & set(unknown):
        raise DatasetError(f"classes {sorted(used & set(unknown))} are not KITTI classes "
                           f"({', '.join(KITTI_CLASSES)}); KITTI label files cannot hold them", file=source.root)
    every = [r for records in source.splits.values() for r in records]
    _unique_names(every, "train + val", lambda r: r.image_path.stem)
    (out / "ImageSets").mkdir(parents=True)
    for split, records in source.splits.items():
        for r in records:
            if r.image_path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DatasetError(f"KITTI images are {', '.join(IMAGE_EXTENSIONS)}", file=r.image_path)
            _place_image(r.image_path, out / "training" / "image_2" / r.image_path.name, copy)
            objects = [ObjectAnnotation(cls="DontCare" if o.iscrowd else o.cls, box=o.box) for o in r.objects]
            lbl = out / "training" / "label_2" / f"{r.image_path.stem}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            lbl.write_text("".join(format_kitti_line(o) + "\n" for o in objects), encoding="utf-8")
        (out / "ImageSets" / f"{split}.txt").write_text("".join(f"{r.image_path.stem}\n" for r in records))
    return 0


def _write_coco(source: _Source, out: Path, copy: bool) -> int:
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(source.names)]
    for split, records in source.splits.items():
        _unique_names(records, split, lambda r: r.image_path.name)
        images, annotations = [], []
        for r in records:
            _place_image(r.image_path, out / split / r.image_path.name, copy)
            images.append({"id": int(r.image_id), "file_name": r.image_path.name, "width": int(r.width),
                           "height": int(r.height)})
            for o in r.objects:
                x1, y1, x2, y2 = (float(v) for v in o.box)
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": int(r.image_id),
                                    "category_id": source.names.index(o.cls) + 1,
                                    "bbox": [round(x1, 3), round(y1, 3), round(w, 3), round(h, 3)],
                                    "area": round(w * h, 3), "iscrowd": int(o.iscrowd)})
        ann = out / "annotations" / f"instances_{split}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({"info": {"description": "written by aidkd data convert"}, "licenses": [],
                                   "images": images, "annotations": annotations, "categories": categories}))
    return 0


_WRITERS = {"kitti": _write_kitti, "coco": _write_coco, "yolo": _write_yolo}


def convert_dataset(src: str | Path, dst: str | Path, src_format: str, dst_format: str, copy: bool = False) -> dict:
    """Write the ``src_format`` dataset at ``src`` as a ``dst_format`` dataset in ``dst`` (new or empty, outside
    ``src``); images symlinked, or copied with ``copy``. Returns ``{split: number of images}``.

    ``src``: a KITTI root; a COCO instances json or a folder holding ``annotations/instances_<split>.json``; a YOLO
    ``data.yaml`` or its folder. Layouts written: KITTI ``training/{image_2,label_2}`` + ``ImageSets/<split>.txt``;
    COCO ``annotations/instances_<split>.json`` + ``<split>/`` images; YOLO ``data.yaml`` + ``images/<split>`` +
    ``labels/<split>``.
    """
    for fmt in (src_format, dst_format):
        if fmt not in CONVERT_FORMATS:
            raise ValueError(f"unknown dataset format {fmt!r} (expected one of {', '.join(CONVERT_FORMATS)})")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise DatasetError("source dataset not found", file=src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetError("the destination must be a new or empty folder", file=dst)
    source = _read(src, src_format)
    _check_destination(dst, source.root)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dropped = _WRITERS[dst_format](source, tmp, copy)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dropped:
        log.warning("%d crowd region(s) left out: YOLO labels have no ignore regions", dropped)
    return {split: len(records) for split, records in source.splits.items()}
