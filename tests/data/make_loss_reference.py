"""Writes tests/data/loss_reference.json: the losses of a fixed batch for every family (detection losses, the
teacher's per-instance / per-level losses and their cls / box parts, AID's instance weight maps), which
tests/test_vectorised_losses.py compares the current code against (1e-5).

    PYTHONPATH=src .venv/bin/python tests/data/make_loss_reference.py
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

H, W = 96, 160
FAMILIES = ("gfl", "retinanet", "fcos", "fasterrcnn")


def fixed_batch():
    """Three images: crowded (overlapping, tiny and border boxes, ignore regions), one box, none."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=g) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0], [5.0, 70.0, 22.0, 88.0],
                                [30.0, 30.0, 34.0, 33.0], [100.0, 40.0, 160.0, 96.0], [62.0, 22.0, 118.0, 88.0]]),
         "labels": torch.tensor([1, 2, 1, 3, 2, 2]),
         "ignore_boxes": torch.tensor([[130.0, 0.0, 160.0, 16.0], [0.0, 0.0, 8.0, 8.0]])},
        {"boxes": torch.tensor([[40.0, 10.0, 90.0, 80.0]]), "labels": torch.tensor([3]),
         "ignore_boxes": torch.zeros(0, 4)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def make_model(family: str, seed: int = 1):
    from aidkd.models import build_detector

    torch.manual_seed(seed)
    return build_detector(family, "resnet18", 4, min_size=H, max_size=W, fpn_channels=32)


def compute(family: str) -> dict:
    from aidkd.distill.aid import instance_pixel_weights
    from aidkd.models import ops

    model = make_model(family)
    images, targets = fixed_batch()
    model.train()
    torch.manual_seed(123)
    il, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, il)
    det = ops.detection_losses(model, il, feats, tt)
    model.eval()
    with torch.no_grad():
        tl = ops.teacher_losses(model, il, feats, tt)
        parts = ops.teacher_loss_parts(model, il, feats, tt)
    boxes = [t["boxes"] for t in tt]
    weights = [torch.linspace(0.2, 0.9, len(b)) for b in boxes]
    maps = [instance_pixel_weights(boxes, weights, f.shape[-2], f.shape[-1], s)
            for f, s in zip(feats.values(), ops.feature_strides(il, feats))]
    return {"detection": {k: float(v.detach()) for k, v in det.items()},
            "per_instance": [v.tolist() for v in tl.per_instance], "per_level": tl.per_level.tolist(),
            "parts": {k: [v.tolist() for v in vs] for k, vs in parts.items()},
            "aid_maps": [m.tolist() for m in maps]}


def main() -> None:
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    out = {"commit": commit, "families": {f: compute(f) for f in FAMILIES}}
    path = Path(__file__).with_name("loss_reference.json")
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
