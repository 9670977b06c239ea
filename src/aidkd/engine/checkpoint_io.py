"""Lightning checkpoint I/O through ``aidkd.models.weights``: atomic, refuses non-finite weights, ``weights_only``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aidkd.models.weights import load_checkpoint, save_checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # temp file + fsync + os.replace; refuses non-finite weights or optimizer state (callback state may
        # legitimately hold inf, e.g. ModelCheckpoint's kth_value before its first save)
        save_checkpoint(path, checkpoint, finite_keys=("state_dict", "optimizer_states"))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        ckpt = load_checkpoint(path)
        if map_location is not None:
            ckpt = _to(ckpt, map_location)
        return ckpt


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj if callable(device) else obj.to(device) if not isinstance(device, dict) else obj
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj
