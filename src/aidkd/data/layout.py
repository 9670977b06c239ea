"""What a dataset folder looks like (KITTI, COCO, YOLO, or scenes aidkd generated), so that a wrong ``data.format`` is
an error that says which format to set instead of a run on the wrong data -- or generated scenes written over a
real dataset."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SYNTH_MARKER", "detect_layout", "format_mismatch", "is_synth_folder"]

# Written by generate_synth before any other file: the folder is aidkd's to (re)write.
SYNTH_MARKER = ".aidkd_synth"


def is_synth_folder(root: str | Path) -> bool:
    """``root`` holds scenes aidkd generated: its marker, or (folders of earlier versions) ``synth_meta.json`` of
    the generator or the ``.complete`` flag the synth cache wrote."""
    root = Path(root)
    if (root / SYNTH_MARKER).is_file() or (root / ".complete").is_file():
        return True
    meta = root / "synth_meta.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("generator") == "aidkd.data.synth"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def detect_layout(root: str | Path) -> str | None:
    """``"synth"``, ``"kitti"`` (``training/image_2`` or ``training/label_2``), ``"coco"`` (``annotations/*.json``
    or an ``instances*.json`` at the top), ``"yolo"`` (a ``.yaml`` file or a folder holding ``data.yaml``) or
    ``None`` (missing, empty or unrecognised)."""
    root = Path(root)
    if (root.is_file() and root.suffix.lower() in (".yaml", ".yml")) or (root / "data.yaml").is_file():
        return "yolo"
    if not root.is_dir():
        return None
    if is_synth_folder(root):
        return "synth"
    if (root / "training" / "image_2").is_dir() or (root / "training" / "label_2").is_dir():
        return "kitti"
    if any((root / "annotations").glob("*.json")) or any(root.glob("instances*.json")):
        return "coco"
    return None


_DESCRIBED = {"kitti": "a KITTI dataset (training/image_2, training/label_2)",
              "coco": "a COCO dataset (annotations/*.json)",
              "yolo": "a YOLO dataset (data.yaml)"}


def format_mismatch(root: str | Path, fmt: str) -> str | None:
    """An error message when ``data.root`` looks like another format than ``fmt``, else ``None``.

    A generated folder is KITTI layout, so ``format: kitti`` on it is fine; KITTI or COCO data under
    ``format: synth`` (the default) is the case that would overwrite a user's dataset."""
    layout = detect_layout(root)
    if layout is None or layout == fmt or (layout == "synth" and fmt == "kitti"):
        return None
    if layout == "synth":
        return (f"data.root {root} holds scenes aidkd generated (KITTI layout) but data.format is {fmt}; "
                "set data.format: synth (or kitti)")
    return f"data.root {root} looks like {_DESCRIBED[layout]} but data.format is {fmt}; set data.format: {layout}"
