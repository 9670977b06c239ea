"""Plain data structures shared by readers, datasets, evaluators and the CLI.

Coordinates are always xyxy in pixels of the *original* image in these records; datasets rescale them when they
resize images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Boxes may exceed the image by this many pixels before they are an error (KITTI boxes are clipped to the image).
BOX_TOLERANCE = 1.0


#: the longest line an error message quotes whole; longer ones (a 5 MB label field) keep their start and end
MAX_LINE = 400


def shorten(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut in the middle to about ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    head, tail = text[:limit * 3 // 4], text[-(limit // 4):]
    return f"{head} [... {len(text) - len(head) - len(tail)} characters ...] {tail}"


class DatasetError(ValueError):
    """A problem in a dataset, located precisely: ``file`` and, where it applies, ``line`` (1-based) or a json path.

    ``str(err)`` reads ``path:line: message`` so that every error names where to look.
    """

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 location: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.location = location  # e.g. "annotations[12].bbox" for COCO json
        super().__init__(self.format())

    def format(self) -> str:
        where = self.file or "<dataset>"
        if self.line is not None:
            where += f":{self.line}"
        if self.location:
            where += f" [{self.location}]"
        return "\n".join(shorten(line) for line in f"{where}: {self.message}".splitlines())


@dataclass
class ObjectAnnotation:
    """One labelled object. ``cls`` is the raw class name from the source (e.g. 'Car', 'DontCare', 'person')."""

    cls: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels
    truncated: float = 0.0  # KITTI: 0..1
    occluded: int = 0  # KITTI: 0 fully visible, 1 partly, 2 largely, 3 unknown
    alpha: float = -10.0  # KITTI observation angle; -10 when unknown
    iscrowd: bool = False  # COCO crowd regions are ignore regions
    extra: tuple[float, ...] = ()  # KITTI 3D fields (dims, location, rotation_y) kept for round trips
    score: float | None = None  # KITTI prediction files: the optional 16th field
    # Where the object was read from, for error messages (not part of equality).
    line: int | None = field(default=None, compare=False)  # 1-based line in a KITTI label file
    location: str | None = field(default=None, compare=False)  # json path, e.g. "annotations[12]"


@dataclass
class ImageRecord:
    """One image and its objects. ``source`` names the label file (KITTI) or json file (COCO) for messages."""

    image_path: Path
    image_id: int
    objects: list[ObjectAnnotation] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    source: str = ""
    stem: str = ""  # KITTI frame name ('000123'); predictions are written under this name
