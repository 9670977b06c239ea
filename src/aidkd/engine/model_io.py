"""Detector files: a compact, safe-to-load format for trained students and teachers.

A model file is ``{"format": "aidkd-model/1", "state_dict": ..., "meta": {...}, "metrics": {...}}`` written
atomically and refused when any weight is non-finite. ``load_detector`` also accepts a Lightning checkpoint written
by ``aidkd train`` / ``aidkd distill`` (its ``aidkd_meta`` entry; ``build_detector`` strips the module prefixes).
Both load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from aidkd.models import build_detector
from aidkd.models.checkpoint import load_checkpoint, save_checkpoint

MODEL_FORMAT = "aidkd-model/1"


def model_meta(model: nn.Module, classes: list[str], min_size: int, max_size: int, kwargs: dict) -> dict:
    """What it takes to rebuild ``model``: its ``aidkd_meta`` plus class names, input size and detector kwargs."""
    return {**model.aidkd_meta, "classes": list(classes), "min_size": min_size, "max_size": max_size,
            "kwargs": dict(kwargs)}


def save_model_file(path: str | Path, model: nn.Module, meta: dict, metrics: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": MODEL_FORMAT, "state_dict": state, "meta": meta,
                           "metrics": {k: float(v) for k, v in (metrics or {}).items()}})
    return Path(path)


def read_meta(path: str | Path) -> dict:
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") if ckpt.get("format") == MODEL_FORMAT else ckpt.get("aidkd_meta")
    if not isinstance(meta, dict) or "classes" not in meta:
        raise ValueError(f"{path}: not an aidkd model file or aidkd Lightning checkpoint (no metadata)")
    return meta


def check_meta(meta: dict, path: str | Path, classes: list[str] | None = None, arch: str | None = None,
               backbone: str | None = None) -> None:
    """Refuse a checkpoint whose classes or architecture differ from what the config asks for, naming each."""
    problems = []
    if classes is not None and list(meta["classes"]) != list(classes):
        problems.append(f"classes {meta['classes']} in the checkpoint vs {list(classes)} in the config")
    if arch is not None and meta["arch"] != arch:
        problems.append(f"arch '{meta['arch']}' in the checkpoint vs '{arch}' in the config")
    if backbone is not None and meta["backbone"] != backbone:
        problems.append(f"backbone '{meta['backbone']}' in the checkpoint vs '{backbone}' in the config")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match: " + "; ".join(problems))


def load_detector(path: str | Path, classes: list[str] | None = None, arch: str | None = None,
                  backbone: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild and load a trained detector, refusing it when classes / arch / backbone differ from the request."""
    meta = read_meta(path)
    check_meta(meta, path, classes, arch, backbone)
    model = build_detector(meta["arch"], meta["backbone"], meta["num_classes"], min_size=meta["min_size"],
                           max_size=meta["max_size"], fpn_channels=meta["fpn_channels"], weights=str(path),
                           frozen_bn=meta.get("frozen_bn"), **meta.get("kwargs", {}))
    return model, meta
