"""KITTI 2D object reader/writer.

Layout (native KITTI)::

    ROOT/training/image_2/000000.png ...   (.png, .jpg or .jpeg)
    ROOT/training/label_2/000000.txt ...   (15 whitespace separated fields a line)
    ROOT/ImageSets/train.txt, val.txt      (optional; one frame stem a line)

``ROOT`` may also be the ``training`` folder itself. Label line fields::

    type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]

Every problem is a :class:`DatasetError` naming the file and the 1-based line.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from .images import read_image_size
from .scan import ScanResult, combine_errors, sort_errors, stem_image_ids, warn_links_out
from .structures import BOX_TOLERANCE, DatasetError, ImageRecord, ObjectAnnotation

__all__ = [
    "IMAGE_EXTENSIONS",
    "KITTI_CLASSES",
    "KITTI_DEFAULT_CLASSES",
    "KITTI_DEFAULT_IGNORE",
    "KITTI_FIELDS",
    "format_kitti_line",
    "kitti_dirs",
    "load_kitti_records",
    "parse_kitti_label_file",
    "parse_kitti_line",
    "read_kitti_label_dir",
    "read_split_file",
    "scan_kitti",
    "split_stems",
    "write_kitti_label_file",
]

#: The KITTI 2D object class vocabulary; any other class name in a label file is an error.
KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
#: Default positive classes (labels 1, 2, 3) and ignore classes of the KITTI benchmark setup.
KITTI_DEFAULT_CLASSES = ("Car", "Pedestrian", "Cyclist")
KITTI_DEFAULT_IGNORE = ("Van", "Truck", "Person_sitting", "Tram", "Misc", "DontCare")
KITTI_FIELDS = ("type", "truncated", "occluded", "alpha", "x1", "y1", "x2", "y2", "h", "w", "l", "x", "y", "z",
                "rotation_y", "score")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_DONTCARE_EXTRA = (-1.0, -1.0, -1.0, -1000.0, -1000.0, -1000.0, -10.0)


def parse_kitti_line(text: str, file: str | Path | None = None, line: int | None = None, with_score: bool = False,
                     image_size: tuple[int, int] | None = None,
                     box_tolerance: float = BOX_TOLERANCE) -> ObjectAnnotation | None:
    """Parse one label line; ``None`` for a blank line. Raises :class:`DatasetError` at ``file:line``.

    ``with_score`` allows (not requires) a 16th ``score`` field (prediction files). ``image_size`` is
    ``(width, height)``; when given, boxes must lie inside the image up to ``box_tolerance`` pixels.
    """
    def err(msg: str) -> DatasetError:
        return DatasetError(msg, file=file, line=line)

    tokens = text.split()
    if not tokens:
        return None
    allowed = (15, 16) if with_score else (15,)
    if len(tokens) not in allowed:
        want = "15 or 16" if with_score else "15"
        raise err(f"expected {want} fields, got {len(tokens)}")
    cls = tokens[0]
    if cls not in KITTI_CLASSES:
        shown = cls if len(cls) <= 40 else cls[:40] + "..."
        raise err(f"unknown class {shown!r} (KITTI classes: {', '.join(KITTI_CLASSES)})")
    vals: list[float] = []
    for i, tok in enumerate(tokens[1:], start=1):
        try:
            if "_" in tok:  # Python's float() reads "1_0.00" as 10.0; KITTI files never group digits
                raise ValueError(tok)
            v = float(tok)
        except ValueError:
            shown = tok if len(tok) <= 40 else tok[:40] + "..."
            raise err(f"field {i + 1} ({KITTI_FIELDS[i]}) is not a number: {shown!r}") from None
        if not math.isfinite(v):
            raise err(f"field {i + 1} ({KITTI_FIELDS[i]}) is not finite: {tok!r}")
        vals.append(v)
    truncated, occluded, alpha = vals[0], vals[1], vals[2]
    x1, y1, x2, y2 = vals[3:7]
    if not (truncated == -1.0 or 0.0 <= truncated <= 1.0):
        raise err(f"truncated must be in [0, 1] (or -1 for DontCare), got {tokens[1]!r}")
    if occluded != int(occluded) or int(occluded) not in (-1, 0, 1, 2, 3):
        raise err(f"occluded must be one of 0, 1, 2, 3 (or -1 for DontCare), got {tokens[2]!r}")
    if x2 <= x1 or y2 <= y1:
        raise err(f"inverted or zero-area box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}")
    if x1 < -box_tolerance or y1 < -box_tolerance:
        raise err(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) starts outside the image (negative coordinate)")
    if image_size is not None:
        w, h = image_size
        if x2 > w + box_tolerance or y2 > h + box_tolerance:
            raise err(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the {w}x{h} image")
    score = vals[14] if len(vals) == 15 else None
    return ObjectAnnotation(cls=cls, box=(x1, y1, x2, y2), truncated=truncated, occluded=int(occluded),
                            alpha=alpha, extra=tuple(vals[7:14]), score=score, line=line)


def _decode(data: bytes, file: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        raise DatasetError(f"not valid UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})",
                           file=file, line=line) from None


def read_text_file(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{what} not found", file=path) from None
    except OSError as e:
        raise DatasetError(f"cannot read {what}: {e.strerror or e}", file=path) from None
    return _decode(data, path)


def _lines(text: str):
    """1-based (number, text) pairs; lines are split on '\\n' only so numbers match editors and ``wc -l``."""
    for i, raw in enumerate(text.split("\n"), start=1):
        yield i, raw.rstrip("\r")


def parse_kitti_label_file(path: str | Path, with_score: bool = False, image_size: tuple[int, int] | None = None,
                           errors: list[DatasetError] | None = None,
                           box_tolerance: float = BOX_TOLERANCE) -> list[ObjectAnnotation]:
    """Parse a KITTI label (or, with ``with_score``, prediction) file. An empty file means no objects.

    Without ``errors`` the first problem raises :class:`DatasetError` (file + 1-based line). With an
    ``errors`` list every problem is appended there and the bad lines are skipped.
    """
    path = Path(path)
    return parse_label_lines(path, lambda raw, no: parse_kitti_line(raw, file=path, line=no, with_score=with_score,
                                                                  image_size=image_size,
                                                                  box_tolerance=box_tolerance), errors)


def parse_label_lines(path: Path, parse_line, errors: list[DatasetError] | None = None) -> list[ObjectAnnotation]:
    """The objects of a text label file (KITTI, YOLO), ``parse_line(raw, line_number)`` a line (None: a line
    without an object). Without ``errors`` the first problem raises; with an ``errors`` list every problem is
    appended there and the bad lines are skipped (an unreadable file: no objects)."""
    try:
        text = read_text_file(path, "label file")
    except DatasetError as e:
        if errors is None:
            raise
        errors.append(e)
        return []
    objects: list[ObjectAnnotation] = []
    for no, raw in _lines(text):
        try:
            obj = parse_line(raw, no)
        except DatasetError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        if obj is not None:
            objects.append(obj)
    return objects


def format_kitti_line(obj: ObjectAnnotation, score: float | None = None) -> str:
    """One KITTI label line (``score`` or ``obj.score`` appended as the 16th field when not None)."""
    extra = tuple(obj.extra) if len(obj.extra) == 7 else _DONTCARE_EXTRA
    x1, y1, x2, y2 = obj.box
    fields = [obj.cls, f"{obj.truncated:.2f}", str(int(obj.occluded)), f"{obj.alpha:.2f}",
              f"{x1:.2f}", f"{y1:.2f}", f"{x2:.2f}", f"{y2:.2f}"] + [f"{v:.2f}" for v in extra]
    s = score if score is not None else obj.score
    if s is not None:
        fields.append(f"{s:.4f}")
    return " ".join(fields)


def write_kitti_label_file(path: str | Path, objects: list[ObjectAnnotation]) -> None:
    """Write objects as a KITTI label/prediction file (an empty list writes an empty file)."""
    text = "".join(format_kitti_line(o) + "\n" for o in objects)
    Path(path).write_text(text, encoding="utf-8")


def read_kitti_label_dir(label_dir: str | Path, with_score: bool = True,
                         errors: list[DatasetError] | None = None) -> dict[str, list[ObjectAnnotation]]:
    """Read every ``*.txt`` of a folder (e.g. KITTI-format predictions): ``{stem: objects}``."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        e = DatasetError("label folder not found", file=label_dir)
        if errors is None:
            raise e
        errors.append(e)
        return {}
    out = {}
    for p in sorted(label_dir.glob("*.txt")):
        out[p.stem] = parse_kitti_label_file(p, with_score=with_score, errors=errors)
    return out


def _split_entries(path: Path, problems: list[DatasetError]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    try:
        text = read_text_file(path, "split file")
    except DatasetError as e:
        problems.append(e)
        return out
    for no, raw in _lines(text):
        toks = raw.split()
        if not toks:
            continue
        if len(toks) != 1:
            problems.append(DatasetError(f"expected one frame name a line, got {len(toks)} fields",
                                         file=path, line=no))
            continue
        stem = toks[0]
        if stem in seen:
            problems.append(DatasetError(f"frame {stem!r} listed twice (first on line {seen[stem]})",
                                         file=path, line=no))
            continue
        seen[stem] = no
        out.append((stem, no))
    return out


def read_split_file(path: str | Path, errors: list[DatasetError] | None = None) -> list[str]:
    """Frame stems of a split file (one a line; blank lines skipped). Duplicates are errors."""
    path = Path(path)
    problems: list[DatasetError] = []
    entries = _split_entries(path, problems)
    if problems:
        if errors is None:
            raise combine_errors(problems, what=f"split file {path}")
        errors.extend(problems)
    return [s for s, _ in entries]


def split_stems(stems, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/val split used when a KITTI root has no split files.

    The rule: sort the unique stems, shuffle them with ``random.Random(seed).shuffle``, the first
    ``round(n * (1 - val_fraction))`` are train and the rest val (for ``0 < val_fraction < 1`` and ``n >= 2``
    each side keeps at least one frame). Both returned lists are sorted. With the defaults this is an 80:20 split.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    order = sorted(set(stems))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = math.floor(n * (1.0 - val_fraction) + 0.5)
    if 0.0 < val_fraction < 1.0 and n >= 2:
        n_train = min(max(n_train, 1), n - 1)
    return sorted(order[:n_train]), sorted(order[n_train:])


def kitti_dirs(root: str | Path) -> tuple[Path, Path]:
    """``(image_dir, label_dir)`` of a KITTI root (``ROOT/training/{image_2,label_2}`` or ``ROOT/{...}``)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError("dataset root not found", file=root)
    for base in (root / "training", root):
        img, lbl = base / "image_2", base / "label_2"
        if img.is_dir() or lbl.is_dir():
            if not img.is_dir():
                raise DatasetError("image folder missing (label_2 exists)", file=img)
            if not lbl.is_dir():
                raise DatasetError("label folder missing (image_2 exists)", file=lbl)
            return img, lbl
    raise DatasetError("not a KITTI root: expected training/image_2 and training/label_2", file=root)


def _split_dir(root: Path) -> Path:
    root = Path(root)
    if (root / "ImageSets").is_dir() or not (root.name == "training" and (root.parent / "ImageSets").is_dir()):
        return root / "ImageSets"
    return root.parent / "ImageSets"


def scan_kitti(root: str | Path, split: str = "all", split_file: str | Path | None = None,
               val_fraction: float = 0.2, seed: int = 0, with_score: bool = False, read_sizes: bool = False,
               check_split_files: bool = False) -> ScanResult:
    """Read a KITTI root collecting every problem (see :func:`load_kitti_records` for the split rules).

    ``check_split_files`` additionally checks every ``ImageSets/*.txt`` (unknown frames, duplicates, frames in
    both train and val) whatever the split.
    """
    result = ScanResult()
    errors = result.errors
    root = Path(root)
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    try:
        image_dir, label_dir = kitti_dirs(root)
    except DatasetError as e:
        errors.append(e)
        return result

    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        if p.stem in images:
            errors.append(DatasetError(f"two images for frame {p.stem!r} ({images[p.stem].name} and {p.name})",
                                       file=p))
            continue
        images[p.stem] = p
    labels: dict[str, Path] = {p.stem: p for p in sorted(label_dir.glob("*.txt"))
                               if not p.name.startswith(".") and p.is_file()}
    warn_links_out(root, [*images.values(), *labels.values()])
    all_stems = sorted(set(images) | set(labels))
    image_ids = dict(zip(all_stems, stem_image_ids(all_stems)))

    # --- which frames
    known = set(all_stems)

    def listed(path: Path, lines: dict[str, int] | None = None) -> list[str]:
        entries = _split_entries(path, errors)
        for s, no in entries:
            if s not in known:
                errors.append(DatasetError(f"frame {s!r} has neither an image nor a label file", file=path, line=no))
            elif lines is not None:
                lines[s] = no
        return [s for s, _ in entries if s in known]

    sdir = _split_dir(root)
    if split == "all":
        selected = all_stems
    elif split_file is not None:
        selected = listed(Path(split_file))
    else:
        own, other = sdir / f"{split}.txt", sdir / ("val.txt" if split == "train" else "train.txt")
        if own.is_file():
            selected = listed(own)
        elif other.is_file():
            excluded = set(listed(other))
            selected = [s for s in all_stems if s not in excluded]
        else:
            train, val = split_stems(all_stems, val_fraction=val_fraction, seed=seed)
            selected = train if split == "train" else val
    if check_split_files and sdir.is_dir():
        members: dict[str, dict[str, int]] = {}
        for p in sorted(sdir.glob("*.txt")):
            members[p.stem] = {}
            if not listed(p, members[p.stem]) and not _split_entries(p, []):
                errors.append(DatasetError("split file lists no frame (a split needs at least one image)", file=p))
        if "train" in members and "val" in members:
            for s in sorted(set(members["train"]) & set(members["val"])):
                errors.append(DatasetError(f"frame {s!r} is in both train.txt (line {members['train'][s]}) and val.txt",
                                           file=sdir / "val.txt", line=members["val"][s]))

    # --- records
    for stem in sorted(set(selected)):
        img, lbl = images.get(stem), labels.get(stem)
        if img is None:
            errors.append(DatasetError(f"label file has no image (expected {image_dir / stem}.png)", file=lbl))
            continue
        if lbl is None:
            errors.append(DatasetError(f"image has no label file (expected {label_dir / (stem + '.txt')})",
                                       file=img))
            continue
        n_before = len(errors)
        size = None
        if read_sizes:
            try:
                size = read_image_size(img)
            except DatasetError as e:
                errors.append(e)
        objects = parse_kitti_label_file(lbl, with_score=with_score, image_size=size, errors=errors)
        rec = ImageRecord(image_path=img, image_id=image_ids[stem], objects=objects,
                          width=size[0] if size else None, height=size[1] if size else None,
                          source=str(lbl), stem=stem)
        if len(errors) > n_before:
            result.bad.add(len(result.records))
        result.records.append(rec)
    return result


def load_kitti_records(root: str | Path, split: str = "train", split_file: str | Path | None = None,
                       val_fraction: float = 0.2, seed: int = 0, errors: list[DatasetError] | None = None,
                       with_score: bool = False, read_sizes: bool = False) -> list[ImageRecord]:
    """Load the records of a KITTI split, sorted by frame name.

    Which frames:

    - ``split="all"``: every frame.
    - ``split_file`` given: exactly the frames it lists (``split`` only names the side).
    - ``ROOT/ImageSets/{split}.txt`` exists: the frames it lists; if only the *other* side's file exists, every
      frame not listed there.
    - otherwise the deterministic split of :func:`split_stems`: sort all frame stems,
      ``random.Random(seed).shuffle`` them, the first 80 % (``1 - val_fraction``) are ``train``, the rest ``val``.

    ``image_id`` is ``int(stem)`` when all stems are numbers, else the stem's index in the sorted list of all
    frames. ``read_sizes`` reads every image header to fill ``width``/``height`` (and check boxes against it);
    otherwise they stay ``None`` and :func:`aidkd.data.validate_records` fills them.

    Problems (malformed lines, unknown classes, label files without images and images without labels, unknown
    frames in split files, ...): without ``errors`` they raise one :class:`DatasetError` listing them; with an
    ``errors`` list they are appended there and the affected images are left out.
    """
    scan = scan_kitti(root, split=split, split_file=split_file, val_fraction=val_fraction, seed=seed,
                      with_score=with_score, read_sizes=read_sizes)
    if scan.errors:
        if errors is None:
            raise combine_errors(sort_errors(scan.errors), what=f"KITTI dataset {root}")
        errors.extend(scan.errors)
    return scan.good_records()
