"""What the readers return and how their errors are reported: ``ScanResult``, ``combine_errors``, ``sort_errors``.

Low-level: the readers (``kitti``, ``coco``) and ``dataset`` import this; ``check`` (which runs the readers) is
built on top, so nothing here imports a reader.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .structures import DatasetError, ImageRecord

__all__ = ["MAX_LISTED_ERRORS", "ScanResult", "combine_errors", "sort_errors", "stem_image_ids", "warn_links_out"]

MAX_LISTED_ERRORS = 20
log = logging.getLogger("aidkd.data")
_WARNED_LINKS: set[tuple] = set()


def warn_links_out(root: Path, files: list[Path], limit: int = 5) -> list[Path]:
    """Warn naming the ``files`` under ``root`` that are symbolic links (or lie in linked folders) leading out of
    it: they are read, but what they show is not in the dataset's folder. Returns them."""
    base = root.resolve()
    out = [p for p in files if not p.resolve().is_relative_to(base)]
    key = (str(base), len(out), tuple(str(p) for p in out[:limit]))
    if out and key not in _WARNED_LINKS:  # once a process: a run reads its dataset several times
        _WARNED_LINKS.add(key)
        names = ", ".join(f"{p} -> {p.resolve()}" for p in out[:limit])
        more = f" and {len(out) - limit} more" if len(out) > limit else ""
        log.warning("%d file(s) of %s are symbolic links out of it (read as they are): %s%s", len(out), root, names,
                    more)
    return out


@dataclass
class ScanResult:
    """What a reader found: records (bad objects already dropped), every error, and the indices (into
    ``records``) of records that had any label error (loaders leave those images out)."""

    records: list[ImageRecord] = field(default_factory=list)
    errors: list[DatasetError] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)
    class_names: list[str] = field(default_factory=list)  # COCO: the selected categories, in label order

    def good_records(self) -> list[ImageRecord]:
        return [r for i, r in enumerate(self.records) if i not in self.bad]


def stem_image_ids(stems: list[str]) -> list[int]:
    """Image ids for frames named ``stems``: ``int(stem)`` when every stem is a distinct number (KITTI's
    ``000123``, COCO's file names), else each stem's index in the list."""
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    return [int(s) for s in stems] if numeric else list(range(len(stems)))


def sort_errors(errors: list[DatasetError]) -> list[DatasetError]:
    """Stable order for reports: by file, then line, then json location (order of discovery kept otherwise)."""
    return sorted(errors, key=lambda e: (e.file or "", e.line if e.line is not None else -1))


def combine_errors(errors: list[DatasetError], what: str = "dataset",
                   limit: int | None = MAX_LISTED_ERRORS, file: str | Path | None = None) -> DatasetError:
    """One :class:`DatasetError` summarising ``errors`` (the first ``limit`` listed as ``file:line: message``;
    ``None``: all). Its headline names ``file`` when given (e.g. the dataset root), else the first problem's place.

    A single error is returned unchanged. The full list is kept on the result as ``.problems``.
    """
    if not errors:
        raise ValueError("combine_errors needs at least one error")
    if len(errors) == 1:
        err = errors[0]
        if not hasattr(err, "problems"):
            err.problems = [err]
        return err
    limit = len(errors) if limit is None else limit
    lines = [f"  {e.format()}" for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more (run `aidkd data check` to list all)")
    first = errors[0]
    msg = f"{len(errors)} problems in {what}:\n" + "\n".join(lines)
    err = (DatasetError(msg, file=file) if file is not None
           else DatasetError(msg, file=first.file, line=first.line, location=first.location))
    err.problems = list(errors)
    return err
