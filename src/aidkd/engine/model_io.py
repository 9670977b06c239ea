"""Detector files: a compact, safe-to-load format for trained students and teachers.

A model file is ``{"format": "aidkd-model/1", "state_dict": ..., "meta": {...}, "metrics": {...}}`` written
atomically and refused when any weight is non-finite. ``load_detector`` also accepts a Lightning checkpoint written
by ``aidkd train`` / ``aidkd distill`` (its ``aidkd_meta`` entry and the ``model.``/``distiller.student.`` prefixes).
Both load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aidkd.models import build_detector
from aidkd.models.checkpoint import load_checkpoint, save_checkpoint

MODEL_FORMAT = "aidkd-model/1"
STUDENT_PREFIXES = ("distiller.student.", "model.")


def model_meta(cfg_model, classes: list[str], min_size: int, max_size: int) -> dict:
    return {"arch": cfg_model.arch, "backbone": cfg_model.backbone, "fpn_channels": cfg_model.fpn_channels,
            "num_classes": len(classes) + 1, "classes": list(classes), "min_size": min_size, "max_size": max_size,
            "kwargs": dict(cfg_model.kwargs)}


def save_model_file(path: str | Path, model: nn.Module, meta: dict, metrics: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": MODEL_FORMAT, "state_dict": state, "meta": meta,
                           "metrics": {k: float(v) for k, v in (metrics or {}).items()}})
    return Path(path)


def read_model_file(path: str | Path) -> tuple[dict, dict]:
    """Return (detector state_dict, meta) from an aidkd model file or an aidkd Lightning checkpoint."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == MODEL_FORMAT:
        return ckpt["state_dict"], ckpt["meta"]
    if "aidkd_meta" in ckpt and "state_dict" in ckpt:
        full = ckpt["state_dict"]
        for prefix in STUDENT_PREFIXES:
            picked = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            if picked:
                return picked, ckpt["aidkd_meta"]
    raise ValueError(f"{path}: not an aidkd model file or aidkd Lightning checkpoint (no meta found)")


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
    state, meta = read_model_file(path)
    check_meta(meta, path, classes, arch, backbone)
    model = build_detector(meta["arch"], meta["backbone"], meta["num_classes"], min_size=meta["min_size"],
                           max_size=meta["max_size"], fpn_channels=meta["fpn_channels"], **meta.get("kwargs", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit a {meta['arch']}/{meta['backbone']} detector: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, meta
