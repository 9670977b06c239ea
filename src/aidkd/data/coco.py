"""COCO instances reader and the COCO-traffic subset builder.

Errors name the json file and the json location (``annotations[12].bbox``); json syntax errors name the line.
Boxes are converted from COCO ``[x, y, w, h]`` to xyxy pixels; ``iscrowd`` annotations become ignore regions
(``ObjectAnnotation(iscrowd=True)``). Annotations of categories that are not selected are dropped (they are
background for the selected classes, as usual for COCO subsets), not turned into ignore regions.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .scan import ScanResult, combine_errors, warn_links_out
from .structures import BOX_TOLERANCE, DatasetError, ImageRecord, ObjectAnnotation

__all__ = [
    "TRAFFIC_CLASSES_11",
    "TRAFFIC_CLASSES_13",
    "TRAFFIC_KEEP_IMAGE_CLASSES",
    "coco_category_ids",
    "default_image_dir",
    "find_coco_split",
    "load_coco_records",
    "make_coco_traffic",
    "read_coco_json",
    "scan_coco",
]

log = logging.getLogger("aidkd.data")

#: An image is kept in COCO-traffic when it contains any of these.
TRAFFIC_KEEP_IMAGE_CLASSES = ("bicycle", "car", "motorcycle", "bus", "train", "truck", "traffic light",
                              "fire hydrant", "stop sign")
#: COCO-traffic annotation classes (11-class variant; the 13-class variant adds cat and dog).
TRAFFIC_CLASSES_11 = ("person", "bicycle", "car", "motorcycle", "bus", "train", "truck", "traffic light",
                      "fire hydrant", "stop sign", "parking meter")
TRAFFIC_CLASSES_13 = TRAFFIC_CLASSES_11 + ("cat", "dog")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def read_coco_json(path: str | Path):
    """Parse a json file; unreadable, non-UTF-8 or malformed json raises :class:`DatasetError` (with line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError("annotation file not found", file=path) from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation file: {e.strerror or e}", file=path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                           file=path, line=line) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"invalid json: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"invalid json: {e}", file=path) from None


def default_image_dir(ann_file: str | Path) -> Path:
    """``DATA/annotations/instances_val2017.json`` -> ``DATA/val2017``; otherwise the json's folder."""
    ann_file = Path(ann_file)
    if ann_file.parent.name == "annotations" and ann_file.stem.startswith("instances_"):
        return ann_file.parent.parent / ann_file.stem[len("instances_"):]
    return ann_file.parent


def find_coco_split(root: str | Path, split: str, hint: str | None = None) -> tuple[Path, Path]:
    """``(instances json, image folder)`` of ``split`` (``"train"`` or ``"val"``) in a COCO root:
    ``annotations/instances_{split}*.json`` and the folder of its images (``ROOT/train2017`` for
    ``instances_train2017.json``, else ``ROOT/images/train2017``, ``ROOT/images/train`` or ``ROOT/train``).

    A :class:`DatasetError` on ``root`` says what is missing and ``hint``, what to set instead (default: the config
    keys ``data.{split}_ann`` and ``data.{split}_images``), or that ``root`` looks like a KITTI dataset."""
    from .layout import detect_layout

    root = Path(root)
    keys = hint or f"set data.{split}_ann (an instances json) and data.{split}_images (its image folder)"
    if not root.is_dir():
        raise DatasetError(f"COCO root not found (a folder with annotations/instances_{split}*.json); {keys}",
                           file=root)
    if detect_layout(root) in ("kitti", "synth"):
        raise DatasetError("looks like a KITTI dataset (training/image_2, training/label_2), not a COCO one "
                           "(annotations/instances_*.json): read it as format kitti", file=root)
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if len(found) != 1:
        what = (f"no annotations/instances_{split}*.json" if not found else
                f"{len(found)} {split} annotation files ({', '.join(p.name for p in found)})")
        raise DatasetError(f"{what} in this COCO root; {keys}", file=root)
    ann = found[0]
    name = ann.stem[len("instances_"):]
    candidates = [root / name, root / "images" / name, root / "images" / split, root / split]
    images = next((c for c in candidates if c.is_dir()), None)
    if images is None:
        looked = ", ".join(str(c.relative_to(root)) for c in dict.fromkeys(candidates))
        raise DatasetError(f"no image folder for annotations/{ann.name} (looked for {looked}); {keys}", file=root)
    return ann, images


def _escapes(file_name: str) -> bool:
    """An absolute file_name, or one whose ``..`` leads out of the images folder (read lexically, so symlinked
    images inside the folder stay allowed)."""
    import os.path

    norm = os.path.normpath(file_name)
    return Path(file_name).is_absolute() or norm == ".." or norm.startswith(".." + os.sep)


def _positive_int(v) -> int | None:
    if _is_int(v) and v > 0:
        return v
    if isinstance(v, float) and math.isfinite(v) and v > 0 and v == int(v):
        return int(v)
    return None


def scan_coco(ann_file: str | Path, image_dir: str | Path | None = None, categories: list[str] | None = None,
              box_tolerance: float = BOX_TOLERANCE) -> ScanResult:
    """Read a COCO instances json collecting every problem (see :func:`load_coco_records`)."""
    ann_file = Path(ann_file)
    result = ScanResult()
    errors = result.errors
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(ann_file)

    def err(msg: str, loc: str) -> None:
        errors.append(DatasetError(msg, file=ann_file, location=loc))

    try:
        data = read_coco_json(ann_file)
    except DatasetError as e:
        errors.append(e)
        return result
    if not isinstance(data, dict):
        err(f"top level must be a json object, got {type(data).__name__}", "$")
        return result
    sections = {}
    for key in ("images", "annotations", "categories"):
        if key not in data:
            err(f"missing key {key!r}", key)
            sections[key] = None
        elif not isinstance(data[key], list):
            err(f"{key!r} must be a list, got {type(data[key]).__name__}", key)
            sections[key] = None
        else:
            sections[key] = data[key]

    # --- categories
    cat_by_id: dict[int, str] = {}
    first_name: dict[str, int] = {}
    for i, c in enumerate(sections["categories"] or []):
        loc = f"categories[{i}]"
        if not isinstance(c, dict):
            err(f"category must be an object, got {type(c).__name__}", loc)
            continue
        ok = True
        for key in ("id", "name"):
            if key not in c:
                err(f"missing key {key!r}", f"{loc}.{key}")
                ok = False
        if not ok:
            continue
        cid, name = c["id"], c["name"]
        if not _is_int(cid):
            err(f"category id must be an integer, got {_short(cid)}", f"{loc}.id")
            continue
        if not isinstance(name, str) or not name:
            err(f"category name must be a non-empty string, got {_short(name)}", f"{loc}.name")
            continue
        if cid in cat_by_id:
            err(f"duplicate category id {cid}", f"{loc}.id")
            continue
        if name in first_name:
            err(f"duplicate category name {name!r} (first at categories[{first_name[name]}])", f"{loc}.name")
            continue
        cat_by_id[cid] = name
        first_name[name] = i
    if categories is None:
        class_names = [cat_by_id[k] for k in sorted(cat_by_id)]
    else:
        class_names = list(categories)
        seen = set()
        for name in class_names:
            if name in seen:
                err(f"category {name!r} requested twice", "categories")
            seen.add(name)
            if name not in first_name and sections["categories"] is not None:
                err(f"requested category {name!r} is not in the json", "categories")
    result.class_names = class_names
    selected = set(class_names)

    # --- images
    records_by_id: dict[int, int] = {}  # image id -> index in result.records
    image_ids: dict[int, int] = {}  # every image id seen -> index in images[]
    files: dict[str, int] = {}
    for i, im in enumerate(sections["images"] or []):
        loc = f"images[{i}]"
        if not isinstance(im, dict):
            err(f"image must be an object, got {type(im).__name__}", loc)
            continue
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
        for k in missing:
            err(f"missing key {k!r}", f"{loc}.{k}")
        iid = im.get("id")
        if "id" in im and not _is_int(iid):
            err(f"image id must be an integer, got {_short(iid)}", f"{loc}.id")
            iid = None
        if iid is not None and "id" in im:
            if iid in image_ids:
                err(f"duplicate image id {iid} (first at images[{image_ids[iid]}])", f"{loc}.id")
                continue
            image_ids[iid] = i
        bad = bool(missing) or iid is None
        fname = im.get("file_name")
        if "file_name" in im and (not isinstance(fname, str) or not fname):
            err(f"file_name must be a non-empty string, got {_short(fname)}", f"{loc}.file_name")
            bad = True
        elif isinstance(fname, str) and fname:
            if _escapes(fname):
                err(f"file_name {fname!r} is outside the images folder {image_dir} (absolute or with '..'); "
                    "file names are relative to the images folder", f"{loc}.file_name")
                bad = True
            elif fname in files:
                err(f"duplicate file_name {fname!r} (first at images[{files[fname]}])", f"{loc}.file_name")
                bad = True
            else:
                files[fname] = i
        size = {}
        for k in ("width", "height"):
            if k in im:
                v = _positive_int(im[k])
                if v is None:
                    err(f"{k} must be a positive integer, got {_short(im[k])}", f"{loc}.{k}")
                    bad = True
                size[k] = v
        if bad:
            continue
        records_by_id[iid] = len(result.records)
        result.records.append(ImageRecord(image_path=image_dir / fname, image_id=iid, objects=[],
                                          width=size["width"], height=size["height"], source=str(ann_file),
                                          stem=Path(fname).stem))

    warn_links_out(image_dir, [r.image_path for r in result.records])

    # --- annotations
    ann_ids: dict[int, int] = {}
    for i, a in enumerate(sections["annotations"] or []):
        loc = f"annotations[{i}]"
        if not isinstance(a, dict):
            err(f"annotation must be an object, got {type(a).__name__}", loc)
            continue
        n_before = len(errors)
        for k in ("id", "image_id", "category_id", "bbox"):
            if k not in a:
                err(f"missing key {k!r}", f"{loc}.{k}")
        rec_index = None
        if "image_id" in a:
            iid = a["image_id"]
            if not _is_int(iid):
                err(f"image_id must be an integer, got {_short(iid)}", f"{loc}.image_id")
            elif iid not in image_ids:
                err(f"dangling image_id {iid}: no such image", f"{loc}.image_id")
            else:
                rec_index = records_by_id.get(iid)
        if "id" in a:
            aid = a["id"]
            if not _is_int(aid):
                err(f"annotation id must be an integer, got {_short(aid)}", f"{loc}.id")
            elif aid in ann_ids:
                err(f"duplicate annotation id {aid} (first at annotations[{ann_ids[aid]}])", f"{loc}.id")
            else:
                ann_ids[aid] = i
        name = None
        if "category_id" in a:
            cid = a["category_id"]
            if not _is_int(cid):
                err(f"category_id must be an integer, got {_short(cid)}", f"{loc}.category_id")
            elif cid not in cat_by_id:
                err(f"unknown category_id {cid}", f"{loc}.category_id")
            else:
                name = cat_by_id[cid]
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            err(f"iscrowd must be 0 or 1, got {_short(crowd)}", f"{loc}.iscrowd")
        box = None
        if "bbox" in a:
            b = a["bbox"]
            if not isinstance(b, list) or len(b) != 4 or not all(_is_num(v) for v in b):
                err(f"bbox must be a list of 4 numbers [x, y, w, h], got {_short(b)}", f"{loc}.bbox")
            elif not all(math.isfinite(v) for v in b):
                err(f"bbox has a non-finite value: {_short(b)}", f"{loc}.bbox")
            else:
                x, y, w, h = (float(v) for v in b)
                if w < 0 or h < 0:
                    err(f"bbox has negative {'width' if w < 0 else 'height'}: {_short(b)}", f"{loc}.bbox")
                elif w == 0 or h == 0:
                    err(f"bbox has zero {'width' if w == 0 else 'height'}: {_short(b)}", f"{loc}.bbox")
                else:
                    box = (x, y, x + w, y + h)
                    if rec_index is not None:
                        rec = result.records[rec_index]
                        if (x < -box_tolerance or y < -box_tolerance or x + w > rec.width + box_tolerance
                                or y + h > rec.height + box_tolerance):
                            err(f"bbox {_short(b)} is outside the {rec.width}x{rec.height} image "
                                f"(images[{image_ids[rec.image_id]}])", f"{loc}.bbox")
        if len(errors) > n_before:
            if rec_index is not None:
                result.bad.add(rec_index)
            continue
        if rec_index is None or name not in selected:
            continue
        result.records[rec_index].objects.append(
            ObjectAnnotation(cls=name, box=box, iscrowd=bool(crowd), location=loc))
    return result


def load_coco_records(ann_file: str | Path, image_dir: str | Path | None = None,
                      categories: list[str] | None = None,
                      errors: list[DatasetError] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Load a COCO instances json: ``(records, class_names)``.

    ``categories``: category *names* to keep, in label order (class ``i`` -> label ``i + 1``); default all
    categories sorted by category id. Annotations of other categories are dropped; ``iscrowd`` ones are kept as
    ignore regions. Records keep the COCO ``image_id`` and the declared ``width``/``height``; images without
    (selected) annotations are kept with no objects. ``image_dir`` defaults to :func:`default_image_dir`.

    Problems (missing keys, dangling/duplicate ids, non-finite/negative/zero-size or out-of-image boxes, unknown
    category ids, requested categories not in the json): without ``errors`` one :class:`DatasetError` listing them
    is raised; with an ``errors`` list they are appended there and the affected images are left out.
    """
    scan = scan_coco(ann_file, image_dir=image_dir, categories=categories)
    if scan.errors:
        if errors is None:
            raise combine_errors(scan.errors, what=f"COCO annotations {ann_file}")
        errors.extend(scan.errors)
    return scan.good_records(), scan.class_names


def coco_category_ids(ann_file: str | Path) -> dict[str, int]:
    """``{category name: category id}`` of a COCO json (for writing detections back as COCO results)."""
    data = read_coco_json(ann_file)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list):
        raise DatasetError("missing or invalid 'categories'", file=ann_file, location="categories")
    out = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetError("category needs an integer id and a string name", file=ann_file,
                               location=f"categories[{i}]")
        out[c["name"]] = c["id"]
    return out


def make_coco_traffic(instances_json: str | Path, out_json: str | Path, variant: int = 11) -> dict:
    """Write the COCO-traffic subset of a COCO instances json.

    Keeps the images that contain any of :data:`TRAFFIC_KEEP_IMAGE_CLASSES` (crowd annotations count), and in
    them only annotations of :data:`TRAFFIC_CLASSES_11` (``variant=13``: :data:`TRAFFIC_CLASSES_13`, adding cat and
    dog). Category ids and image/annotation ids are unchanged (so the default class order of
    :func:`load_coco_records`, by category id, is the order of those tuples). ``info`` and ``licenses`` are kept;
    a missing ``info`` is added (pycocotools' ``loadRes`` needs it). Returns counts.
    """
    if variant not in (11, 13):
        raise ValueError(f"variant must be 11 or 13, got {variant!r}")
    instances_json, out_json = Path(instances_json), Path(out_json)
    data = read_coco_json(instances_json)

    def fail(msg: str, loc: str):
        raise DatasetError(msg, file=instances_json, location=loc)

    if not isinstance(data, dict):
        fail("top level must be a json object", "$")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"missing or invalid {key!r} (must be a list)", key)
    wanted = TRAFFIC_CLASSES_13 if variant == 13 else TRAFFIC_CLASSES_11
    name_to_id: dict[str, int] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            fail("category needs an integer id and a string name", f"categories[{i}]")
        name_to_id.setdefault(c["name"], c["id"])
    missing = [n for n in wanted if n not in name_to_id]
    if all(n not in name_to_id for n in TRAFFIC_KEEP_IMAGE_CLASSES):
        fail(f"none of the traffic categories {', '.join(TRAFFIC_KEEP_IMAGE_CLASSES)} is in the json", "categories")
    if missing:
        log.warning("%s: categories not in the json, skipped: %s", instances_json, ", ".join(missing))
    keep_cat = {name_to_id[n] for n in wanted if n in name_to_id}
    trigger = {name_to_id[n] for n in TRAFFIC_KEEP_IMAGE_CLASSES if n in name_to_id}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            fail("annotation needs 'image_id' and 'category_id'", f"annotations[{i}]")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            fail("image needs an 'id'", f"images[{i}]")
    keep_images = {a["image_id"] for a in data["annotations"] if a["category_id"] in trigger}
    images = [im for im in data["images"] if im["id"] in keep_images]
    anns = [a for a in data["annotations"] if a["image_id"] in keep_images and a["category_id"] in keep_cat]
    cats = [c for c in data["categories"] if c["id"] in keep_cat]
    info = data.get("info")
    if not isinstance(info, dict):
        info = {"description": f"COCO-traffic ({variant} classes) made by aidkd from {instances_json.name}",
                "version": "1.0"}
    out = {"info": info}
    if "licenses" in data:
        out["licenses"] = data["licenses"]
    out.update(images=images, annotations=anns, categories=cats)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(out_json.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    tmp.replace(out_json)
    stats = {"images": len(images), "annotations": len(anns), "categories": [c["name"] for c in cats],
             "out": str(out_json)}
    log.info("COCO-traffic-%d: %d images, %d annotations -> %s", variant, len(images), len(anns), out_json)
    return stats
