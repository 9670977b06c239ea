"""The detection dataset (docs/architecture.md, "Dataset sample") and record validation."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch.utils.data import Dataset

from .images import check_image, image_to_float, image_to_uint8, read_image
from .kitti import KITTI_DEFAULT_CLASSES, KITTI_DEFAULT_IGNORE
from .scan import combine_errors, sort_errors
from .structures import BOX_TOLERANCE, DatasetError, ImageRecord
from .transforms import clip_boxes, hflip_boxes, hflip_image, resize_sample

__all__ = ["DetectionDataset", "collate_fn", "validate_record", "validate_records"]

log = logging.getLogger("aidkd.data")


def validate_record(record: ImageRecord, check_images: bool = True, decode: bool = False,
                    box_tolerance: float = BOX_TOLERANCE) -> list[DatasetError]:
    """Problems of one record: unreadable image (header, or full decode with ``decode``), image size differing
    from the declared ``width``/``height``, non-finite / zero-area / out-of-image boxes (``box_tolerance`` px).

    When the record has no size and the image header was read, ``record.width``/``height`` are filled in.
    """
    errors: list[DatasetError] = []
    declared = (record.width, record.height) if record.width is not None and record.height is not None else None
    if check_images:
        size, err = check_image(record.image_path, expected_size=declared, decode=decode,
                                source=record.source or None)
        if err is not None:
            errors.append(err)
        elif declared is None and size is not None:
            record.width, record.height = size
    w, h = record.width, record.height
    src = record.source or str(record.image_path)
    for obj in record.objects:
        def bad(msg: str, obj=obj) -> None:
            errors.append(DatasetError(msg, file=src, line=obj.line, location=obj.location))
        try:
            x1, y1, x2, y2 = (float(v) for v in obj.box)
        except (TypeError, ValueError):
            bad(f"invalid box {obj.box!r}")
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            bad(f"box has a non-finite coordinate {obj.box!r}")
        elif x2 <= x1 or y2 <= y1:
            bad(f"inverted or zero-area box ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
        elif (x1 < -box_tolerance or y1 < -box_tolerance
              or (w is not None and x2 > w + box_tolerance) or (h is not None and y2 > h + box_tolerance)):
            size_s = f"{w}x{h} " if w is not None else ""
            bad(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is outside the {size_s}image {record.image_path.name}")
    return errors


POOL_MIN_RECORDS = 64  # fewer records are checked in this process: a pool's start costs more than it saves


def validate_records(records: Sequence[ImageRecord], check_images: bool = True, decode: bool = False,
                     box_tolerance: float = BOX_TOLERANCE, workers: int = 0) -> list[DatasetError]:
    """Every problem of ``records`` (see :func:`validate_record`), plus duplicate ``image_id``s.

    ``workers`` > 1: the records are checked in a pool of that many processes (the records' missing sizes are then
    not filled in here: for a check whose records are thrown away)."""
    errors: list[DatasetError] = []
    seen: dict[int, ImageRecord] = {}
    for r in records:
        if r.image_id in seen:
            errors.append(DatasetError(f"duplicate image_id {r.image_id} (also {seen[r.image_id].image_path})",
                                       file=r.image_path))
        else:
            seen[r.image_id] = r
    check = partial(validate_record, check_images=check_images, decode=decode, box_tolerance=box_tolerance)
    if workers > 1 and len(records) >= POOL_MIN_RECORDS:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            per_record = list(pool.map(check, records, chunksize=max(1, len(records) // (8 * workers))))
    else:
        per_record = [check(r) for r in records]
    for found in per_record:
        errors += found
    return errors


class DetectionDataset(Dataset):
    """Images + targets in the format of docs/architecture.md.

    ``dataset[i] -> (image FloatTensor[3, H, W] in [0, 1], target)`` (``uint8=True``: ByteTensor[3, H, W]) with
    ``boxes`` Float[N, 4] (xyxy, pixels of the returned image), ``labels`` Int64[N] (class ``classes[k]`` ->
    ``k + 1``), ``ignore_boxes`` Float[M, 4], ``image_id`` int, ``orig_size`` (H0, W0), ``scale`` float (resized =
    original * scale), ``flipped`` bool, and ``scale_xy`` (sx, sy): the exact per-axis factors used for the boxes
    (equal to ``scale`` up to rounding of the output size to whole pixels).

    Class mapping: an object whose class is in ``classes`` is a positive; ``iscrowd`` objects (COCO), objects of
    ``ignore_classes`` and objects of any *other* class (neither in ``classes`` nor in ``ignore_classes``) become
    ignore regions -- an unlisted class is never treated as background.

    Resize (``resize=True``): keep-ratio, ``scale = min(min_size / short, max_size / long)`` (torchvision's rule),
    bilinear on the float image as the model's own transform does it
    (:func:`aidkd.data.transforms.resize_sample`), so the model, built with the same ``min_size``/``max_size``,
    leaves the image as it is. ``uint8=True`` (training; needs ``resize=False``): the decoded uint8 image at its
    original size, ``scale`` 1; the training step makes it the same float image on the device
    (:func:`aidkd.data.transforms.resize_samples`, the same function), so the workers neither resize nor hand
    over four times the bytes. ``resize=False`` (evaluation): the original float image, ``scale`` 1 -- the
    model's transform resizes it, exactly as in ``predict`` and in the exported ONNX graph, so the metrics are those
    of the path that ships. Horizontal flip with probability ``hflip_prob`` only when ``train``.

    Construction validates all records (:func:`validate_records`, image headers when ``check_images``): with
    ``skip_invalid=False`` problems raise one :class:`DatasetError` listing them (first 20 with file:line); with
    ``skip_invalid=True`` bad images are dropped (``self.skipped`` keeps the problems) and the count is logged on
    the ``aidkd.data`` logger.
    """

    def __init__(self, records: Sequence[ImageRecord], classes: Sequence[str] = KITTI_DEFAULT_CLASSES,
                 ignore_classes: Sequence[str] = KITTI_DEFAULT_IGNORE, min_size: int = 800, max_size: int = 1333,
                 train: bool = False, hflip_prob: float = 0.5, skip_invalid: bool = False,
                 check_images: bool = True, resize: bool = True, uint8: bool = False):
        self.classes = list(classes)
        self.ignore_classes = list(ignore_classes)
        if not self.classes:
            raise ValueError("classes must not be empty")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        both = set(self.classes) & set(self.ignore_classes)
        if both:
            raise ValueError(f"classes {sorted(both)} are both positive and ignored")
        if min_size <= 0 or max_size <= 0:
            raise ValueError(f"min_size and max_size must be positive, got {min_size}, {max_size}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.train, self.hflip_prob = bool(train), float(hflip_prob)
        if uint8 and resize:
            raise ValueError("uint8 images keep their original size (resize_samples resizes them where the model "
                             "runs): pass resize=False with uint8=True")
        self.resize, self.uint8 = bool(resize), bool(uint8)
        self.label_of = {c: i + 1 for i, c in enumerate(self.classes)}

        records = list(records)
        problems: list[DatasetError] = []
        good: list[ImageRecord] = []
        seen: dict[int, ImageRecord] = {}
        for r in records:
            errs = validate_record(r, check_images=check_images)
            if r.image_id in seen:
                errs.append(DatasetError(f"duplicate image_id {r.image_id} (also {seen[r.image_id].image_path})",
                                         file=r.image_path))
            else:
                seen[r.image_id] = r
            if errs:
                problems += errs
            else:
                good.append(r)
        self.skipped: list[DatasetError] = problems
        if problems:
            if not skip_invalid:
                raise combine_errors(sort_errors(problems), what=f"dataset of {len(records)} images")
            log.warning("skipped %d of %d images with invalid data (%d problems; first: %s)",
                        len(records) - len(good), len(records), len(problems), problems[0].format())
        self.records: list[ImageRecord] = good

    @property
    def num_classes(self) -> int:
        """``len(classes) + 1`` (background included), the detector's ``num_classes``."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.records)

    def label_for(self, cls: str, iscrowd: bool = False) -> int:
        """Label of a class name: ``1..K`` for positives, ``0`` for ignore regions."""
        return 0 if iscrowd else self.label_of.get(cls, 0)

    def __getitem__(self, index: int):
        r = self.records[index]
        declared = (r.width, r.height) if r.width is not None and r.height is not None else None
        img = read_image(r.image_path, expected_size=declared, source=r.source or None)
        w0, h0 = img.size
        image = image_to_uint8(img)

        boxes, labels, ignore = [], [], []
        for o in r.objects:
            label = self.label_for(o.cls, o.iscrowd)
            if label > 0:
                boxes.append(o.box)
                labels.append(label)
            else:
                ignore.append(o.box)
        target = {
            "boxes": clip_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), h0, w0),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "ignore_boxes": clip_boxes(torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4), h0, w0),
            "image_id": int(r.image_id),
            "orig_size": (int(h0), int(w0)),
            "scale": 1.0,
            "flipped": False,
            "scale_xy": (1.0, 1.0),
        }
        if self.resize:
            image, target = resize_sample(image, target, self.min_size, self.max_size)
        elif not self.uint8:
            image = image_to_float(image)

        b, g = target["boxes"], target["ignore_boxes"]
        if self.train and self.hflip_prob > 0 and torch.rand(()).item() < self.hflip_prob:
            nw = image.shape[-1]
            image, b, g = hflip_image(image), hflip_boxes(b, nw), hflip_boxes(g, nw)
            target["flipped"] = True
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        target["boxes"], target["labels"] = b[keep], target["labels"][keep]
        target["ignore_boxes"] = g[(g[:, 2] > g[:, 0]) & (g[:, 3] > g[:, 1])]
        return image, target


def collate_fn(batch):
    """``[(image, target), ...] -> (list[image], list[target])``."""
    images = [s[0] for s in batch]
    targets = [s[1] for s in batch]
    return images, targets
