"""YOLO (Ultralytics) detection datasets: ``data.yaml``, ``images/`` and ``labels/``.

Layout::

    DATA/data.yaml                 path: .   (the dataset root; default the yaml's folder)
                                   train: images/train   (a folder of images, a .txt list of images, or a list)
                                   val: images/val
                                   test: images/test     (optional)
                                   names: [person, car]  (or {0: person, 1: car})
    DATA/images/train/a.jpg ...
    DATA/labels/train/a.txt ...    one ``class cx cy w h`` line per box, normalised to [0, 1]

An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the suffix by
``.txt`` (beside the image when the path has no ``images`` folder). An image without a label file, or with an
empty one, has no boxes. A segmentation line (``class x1 y1 x2 y2 ... xn yn``, n >= 3) counts as the box around
its polygon. Relative ``train``/``val``/``test`` entries are relative to ``path``; a relative ``path`` to the
yaml's folder; lines of a .txt list to the list's folder.

Every problem is a :class:`DatasetError` naming the label file and the 1-based line (or the yaml key, the list
file's line, or the image).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .images import read_image_size
from .kitti import _lines, parse_label_lines, read_text_file
from .scan import ScanResult, combine_errors, sort_errors, stem_image_ids
from .structures import BOX_TOLERANCE, DatasetError, ImageRecord, ObjectAnnotation

__all__ = [
    "YOLO_IMAGE_EXTENSIONS",
    "YOLO_SPLITS",
    "YoloData",
    "find_data_yaml",
    "format_yolo_line",
    "load_yolo_records",
    "parse_yolo_label_file",
    "parse_yolo_line",
    "read_data_yaml",
    "scan_yolo",
    "yolo_label_path",
]

YOLO_IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
YOLO_SPLITS = ("train", "val", "test")
DATA_YAML = "data.yaml"
_BOX_FIELDS = ("class", "x_center", "y_center", "width", "height", "confidence")


@dataclass
class YoloData:
    """A parsed ``data.yaml``: class names in index order and, per split, its sources (folders or .txt lists)."""

    yaml_file: Path
    root: Path  # ``path``, resolved
    names: list[str]
    splits: dict[str, list[Path]] = field(default_factory=dict)


def find_data_yaml(root: str | Path) -> Path:
    """``root`` itself when it is a yaml file, else ``root/data.yaml``; an error says what to pass."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.exists():
        raise DatasetError("dataset root not found", file=root)
    if (root / DATA_YAML).is_file():
        return root / DATA_YAML
    others = sorted(p.name for p in root.glob("*.y*ml"))
    hint = f" (it holds {', '.join(others)}: pass that file)" if others else ""
    raise DatasetError(f"no {DATA_YAML} in this folder{hint}; data.root of a YOLO dataset is its data.yaml "
                       "or the folder holding it", file=root)


def _yaml_error(e: yaml.YAMLError, file: Path) -> DatasetError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return DatasetError(f"invalid YAML: {' '.join(str(problem).split())}", file=file,
                        line=mark.line + 1 if mark is not None else None)


def _class_names(value, file: Path) -> list[str]:
    def err(msg: str, loc: str = "names") -> DatasetError:
        return DatasetError(msg, file=file, location=loc)

    if isinstance(value, dict):
        if not all((isinstance(k, int) and not isinstance(k, bool)) or (isinstance(k, str) and k.isdigit())
                   for k in value):
            raise err(f"the keys of names must be class indices 0, 1, ...; got {list(value)[:5]!r}")
        value = {int(k): v for k, v in value.items()}
        keys = list(value)
        if sorted(keys) != list(range(len(keys))):
            missing = sorted(set(range(max(keys) + 1)) - set(keys)) if keys and min(keys) >= 0 else []
            detail = f"missing {missing[:5]}" if missing else f"got {sorted(keys)[:5]}"
            raise err(f"the keys of names must number the classes 0, 1, 2, ... without gaps; {detail}")
        items = [(f"names.{k}", value[k]) for k in range(len(keys))]
    elif isinstance(value, list):
        items = [(f"names[{i}]", v) for i, v in enumerate(value)]
    else:
        raise err(f"names must be a list or an {{index: name}} mapping, got {type(value).__name__}")
    if not items:
        raise err("names is empty")
    names: list[str] = []
    for loc, v in items:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or str(v).strip() == "":
            raise err(f"a class name must be a non-empty string, got {v!r}", loc)
        name = str(v)
        if name in names:
            raise err(f"duplicate class name {name!r} (also index {names.index(name)})", loc)
        names.append(name)
    return names


def _resolve_source(base: Path, entry: str) -> Path:
    p = Path(entry).expanduser()
    if p.is_absolute():
        return p
    out = base / p
    # Exports that write `train: ../train/images` beside data.yaml mean the dataset folder (Ultralytics reads them so)
    if not out.exists() and entry.startswith("../"):
        alt = base / entry[3:]
        if alt.exists():
            return alt
    return out


def read_data_yaml(root: str | Path) -> YoloData:
    """Parse ``data.yaml`` (``root`` is the file or its folder) with ``yaml.safe_load``; raises :class:`DatasetError`
    naming the key."""
    file = find_data_yaml(root)
    try:
        data = yaml.safe_load(read_text_file(file, "data.yaml"))
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    if not isinstance(data, dict):
        raise DatasetError(f"the top level must be a mapping (path, train, val, names), got {type(data).__name__}",
                           file=file)
    if "kpt_shape" in data:
        raise DatasetError("a pose dataset (kpt_shape): keypoint labels are not read; use a detection dataset",
                           file=file, location="kpt_shape")
    for key in ("train", "val", "names"):
        if data.get(key) in (None, "", []):
            raise DatasetError(f"missing key {key!r}", file=file, location=key)
    names = _class_names(data["names"], file)
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"nc is {nc!r} but names has {len(names)} classes", file=file, location="nc")
    path = data.get("path")
    if path in (None, ""):
        root_dir = file.parent
    elif not isinstance(path, str):
        raise DatasetError(f"path must be a folder name, got {path!r}", file=file, location="path")
    else:
        root_dir = Path(path).expanduser()
        root_dir = root_dir if root_dir.is_absolute() else file.parent / root_dir
        if not root_dir.is_dir():
            raise DatasetError(f"dataset folder {root_dir} not found", file=file, location="path")
    splits: dict[str, list[Path]] = {}
    for key in YOLO_SPLITS:
        value = data.get(key)
        if value in (None, "", []):
            continue
        entries = value if isinstance(value, list) else [value]
        sources = []
        for i, entry in enumerate(entries):
            loc = f"{key}[{i}]" if isinstance(value, list) else key
            if not isinstance(entry, str) or not entry:
                raise DatasetError(f"expected a folder or a .txt list of images, got {entry!r}", file=file,
                                   location=loc)
            src = _resolve_source(root_dir, entry)
            if not src.exists():
                where = "" if Path(entry).expanduser().is_absolute() else f" ({entry} relative to {root_dir})"
                raise DatasetError(f"{src} not found{where}", file=file, location=loc)
            if not src.is_dir() and src.suffix.lower() != ".txt":
                raise DatasetError(f"{src} is neither a folder of images nor a .txt list of images", file=file,
                                   location=loc)
            sources.append(src)
        splits[key] = sources
    return YoloData(yaml_file=file, root=root_dir, names=names, splits=splits)


def yolo_label_path(image_path: str | Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder); beside the image otherwise."""
    parts = list(Path(image_path).with_suffix(".txt").parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts)


def _number(tok: str, index: int, name: str, err) -> float:
    try:
        if "_" in tok:  # float() reads "1_0" as 10
            raise ValueError(tok)
        v = float(tok)
    except ValueError:
        shown = tok if len(tok) <= 40 else tok[:40] + "..."
        raise err(f"field {index + 1} ({name}) is not a number: {shown!r}") from None
    if not math.isfinite(v):
        raise err(f"field {index + 1} ({name}) is not finite: {tok!r}")
    return v


def parse_yolo_line(text: str, names: list[str], image_size: tuple[int, int] | None = None,
                    file: str | Path | None = None, line: int | None = None, with_score: bool = False,
                    box_tolerance: float = BOX_TOLERANCE) -> ObjectAnnotation | None:
    """One label line -> an object with its box in pixels of the ``(width, height)`` image; ``None`` for a blank
    line. ``with_score`` allows (not requires) a 6th ``confidence`` field (prediction files). Normalised values may
    leave [0, 1] by ``box_tolerance`` pixels (without ``image_size``: not at all; the box then stays normalised).
    Raises :class:`DatasetError` at ``file:line``."""
    def err(msg: str) -> DatasetError:
        return DatasetError(msg, file=file, line=line)

    tokens = text.split()
    if not tokens:
        return None
    n = len(tokens)
    polygon = n >= 7 and n % 2 == 1
    if not (n == 5 or (with_score and n == 6) or polygon):
        want = "5 (class x_center y_center width height)" + (" or 6 (... confidence)" if with_score else "")
        raise err(f"expected {want} fields, or a polygon (class x1 y1 ... xn yn), got {n}")
    value = _number(tokens[0], 0, "class", err)
    if value != int(value):
        raise err(f"class index must be an integer, got {tokens[0]!r}")
    index = int(value)
    if not 0 <= index < len(names):
        raise err(f"class index {index} out of range: data.yaml names {len(names)} classes (0..{len(names) - 1})")
    fields = ("x", "y") * (n // 2) if polygon else _BOX_FIELDS[1:]
    vals = [_number(tok, i, fields[i - 1], err) for i, tok in enumerate(tokens[1:], start=1)]
    w_img, h_img = image_size if image_size is not None else (None, None)
    tol_x = box_tolerance / w_img if w_img else 0.0
    tol_y = box_tolerance / h_img if h_img else 0.0
    score = None
    if polygon:
        xs, ys = vals[0::2], vals[1::2]
        for k, v in enumerate(vals):
            tol = tol_x if k % 2 == 0 else tol_y
            if not -tol <= v <= 1 + tol:
                raise err(f"polygon coordinate {k + 1} ({tokens[k + 1]}) is outside [0, 1] (normalised)")
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        cx, cy, w, h = vals[:4]
        for k, v in enumerate(vals[:4]):
            tol = tol_x if k % 2 == 0 else tol_y
            if not -tol <= v <= 1 + tol:
                raise err(f"{_BOX_FIELDS[k + 1]} {tokens[k + 1]} is outside [0, 1] (normalised coordinates)")
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if with_score and n == 6:
            score = vals[4]
            if not 0.0 <= score <= 1.0:
                raise err(f"confidence {tokens[5]} is outside [0, 1]")
    if (x2 <= x1 or y2 <= y1) and not with_score:  # a detector may output a zero-width box at the image border
        raise err(f"zero-area box (width {x2 - x1:g}, height {y2 - y1:g})")
    if x1 < -tol_x or y1 < -tol_y or x2 > 1 + tol_x or y2 > 1 + tol_y:
        raise err(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) (x1 y1 x2 y2, normalised) is outside the image")
    box = (x1 * w_img, y1 * h_img, x2 * w_img, y2 * h_img) if image_size is not None else (x1, y1, x2, y2)
    return ObjectAnnotation(cls=names[index], box=box, score=score, line=line)


def parse_yolo_label_file(path: str | Path, names: list[str], image_size: tuple[int, int] | None = None,
                          with_score: bool = False, errors: list[DatasetError] | None = None,
                          box_tolerance: float = BOX_TOLERANCE) -> list[ObjectAnnotation]:
    """Objects of one label file (boxes in pixels of ``image_size``). Without ``errors`` the first problem
    raises; with an ``errors`` list every problem is appended there and the bad lines are skipped."""
    path = Path(path)
    return parse_label_lines(path, lambda raw, no: parse_yolo_line(raw, names, image_size, file=path, line=no,
                                                                 with_score=with_score,
                                                                 box_tolerance=box_tolerance), errors)


def format_yolo_line(class_index: int, box: tuple[float, float, float, float], image_size: tuple[int, int],
                     score: float | None = None) -> str:
    """``class cx cy w h [conf]``, normalised to ``image_size`` (width, height); numbers as Ultralytics writes
    them (``%g``)."""
    w_img, h_img = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    values = [(x1 + x2) / 2 / w_img, (y1 + y2) / 2 / h_img, (x2 - x1) / w_img, (y2 - y1) / h_img]
    if score is not None:
        values.append(float(score))
    return " ".join([str(int(class_index))] + [f"{v:.6g}" for v in values])


def _list_images(source: Path, errors: list[DatasetError]) -> list[tuple[Path, Path, int | None]]:
    """``(image, where it was listed, line)`` of one source: every image below a folder (sorted), or the lines of
    a .txt list (relative lines are relative to the list's folder)."""
    if source.is_dir():
        return [(p, source, None) for p in sorted(source.rglob("*"))
                if p.suffix.lower() in YOLO_IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    out = []
    try:
        text = read_text_file(source, "image list")
    except DatasetError as e:
        errors.append(e)
        return out
    for no, raw in _lines(text):
        entry = raw.strip()
        if not entry:
            continue
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else source.parent / p
        if not p.is_file():
            errors.append(DatasetError(f"image {p} not found", file=source, line=no))
            continue
        out.append((p, source, no))
    return out


def scan_yolo(root: str | Path, split: str = "train", classes: list[str] | None = None,
              ignore_classes: list[str] | None = None, with_score: bool = False) -> ScanResult:
    """Read one split of a YOLO dataset collecting every problem (see :func:`load_yolo_records`)."""
    result = ScanResult()
    errors = result.errors
    try:
        data = read_data_yaml(root)
    except DatasetError as e:
        errors.append(e)
        return result
    if split not in data.splits:
        present = ", ".join(data.splits) or "none"
        errors.append(DatasetError(f"no {split!r} split (splits here: {present})", file=data.yaml_file,
                                   location=split))
        return result
    names = data.names
    selected = list(names) if classes is None else list(classes)
    requested = selected + list(ignore_classes or [])
    for i, name in enumerate(requested):
        if name in requested[:i]:
            errors.append(DatasetError(f"class {name!r} requested twice", file=data.yaml_file, location="names"))
        elif name not in names:
            errors.append(DatasetError(f"requested class {name!r} is not in names ({', '.join(names)})",
                                       file=data.yaml_file, location="names"))
    result.class_names = selected
    keep = set(requested)

    listed: list[tuple[Path, Path, int | None]] = []
    seen: dict[Path, str] = {}
    for source in data.splits[split]:
        for image, where, line in _list_images(source, errors):
            key = Path(os.path.abspath(image))
            place = f"{where}:{line}" if line is not None else str(where)
            if key in seen:
                errors.append(DatasetError(f"image {image} listed twice (also from {seen[key]})", file=where,
                                           line=line))
                continue
            seen[key] = place
            listed.append((image, where, line))
    ids = stem_image_ids([image.stem for image, _, _ in listed])
    for (image, _, _), image_id in zip(listed, ids):
        n_before = len(errors)
        try:
            size = read_image_size(image)
        except DatasetError as e:
            errors.append(e)
            size = None
        label = yolo_label_path(image)
        objects = (parse_yolo_label_file(label, names, size, with_score=with_score, errors=errors)
                   if label.is_file() else [])  # no label file: an image without boxes
        if len(errors) > n_before:
            result.bad.add(len(result.records))
        result.records.append(ImageRecord(
            image_path=image, image_id=image_id, objects=[o for o in objects if o.cls in keep],
            width=size[0] if size else None, height=size[1] if size else None,
            source=str(label) if label.is_file() else "", stem=image.stem))
    return result


def load_yolo_records(root: str | Path, split: str = "train", classes: list[str] | None = None,
                      errors: list[DatasetError] | None = None,
                      ignore_classes: list[str] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Records of one split (``train``, ``val`` or ``test``) of a YOLO dataset: ``(records, class_names)``.

    ``root``: the ``data.yaml`` or the folder holding it. ``classes``: names to keep, in label order (class ``i``
    -> label ``i + 1``); default all of ``names`` in index order. Boxes of ``ignore_classes`` are kept (the dataset
    makes them ignore regions); boxes of other classes are dropped (background for the selected ones, as for COCO
    subsets). Records have pixel boxes and the image's size (from its header);
    ``image_id`` is ``int(stem)`` when every stem of the split is a distinct number, else the image's index.

    Problems (malformed lines, coordinates outside [0, 1], class indices out of range, missing or unreadable
    images, a bad data.yaml): without ``errors`` one :class:`DatasetError` listing them is raised; with an
    ``errors`` list they are appended there and the affected images are left out.
    """
    scan = scan_yolo(root, split=split, classes=classes, ignore_classes=ignore_classes)
    if scan.errors:
        if errors is None:
            raise combine_errors(sort_errors(scan.errors), what=f"YOLO dataset {root} ({split})")
        errors.extend(scan.errors)
    return scan.good_records(), scan.class_names
