"""Distillation under mixed precision (CPU bf16 autocast, the GPU path's dtype handling): the teacher's losses and
AID weights are computed in float32, and one distillation step runs end to end in every family."""
from __future__ import annotations

import pytest
import torch

from aidkd.distill import distiller as distiller_mod
from aidkd.distill.aid import AIDWeighting
from aidkd.distill.distiller import Distiller
from aidkd.models import build_detector

H, W = 64, 96
METHODS = {"attention": {"name": "attention"}, "nonlocal": {"name": "nonlocal"}, "pkd": {"name": "pkd"}}


def sample(image_id: int, n_boxes: int = 3):
    g = torch.Generator().manual_seed(image_id)
    image = torch.rand(3, H, W, generator=g)
    x0 = torch.rand(n_boxes, generator=g) * (W / 2)
    y0 = torch.rand(n_boxes, generator=g) * (H / 2)
    boxes = torch.stack([x0, y0, x0 + 12 + x0 / 2, y0 + 10 + y0 / 2], 1)
    return image, {"boxes": boxes, "labels": torch.arange(n_boxes) % 2 + 1, "image_id": image_id, "flipped": False}


def make_distiller(arch: str) -> Distiller:
    torch.manual_seed(0)
    kw = {"min_size": H, "max_size": W * 2}
    teacher = build_detector(arch, "resnet18", 3, fpn_channels=16, **kw)
    student = build_detector(arch, "resnet18", 3, fpn_channels=8, **kw)
    return Distiller(student, teacher, dict(METHODS), AIDWeighting("instance"), sample_shape=(H, W),
                     teacher_loss_cache=False)


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl", "fasterrcnn"])
def test_teacher_losses_are_computed_in_float32_under_autocast(arch):
    """Given the teacher's features, D^T under bf16 autocast equals D^T without it: the head, proposals and boxes
    are not rounded to bf16 (they were: Faster R-CNN's D^T moved by 0.03 here on a 96-px image, up to 0.4 at
    1333 px)."""
    d = make_distiller(arch)
    images, targets = [b[0] for b in (sample(1), sample(2))], [b[1] for b in (sample(1), sample(2))]
    with torch.no_grad():
        image_list, targets = distiller_mod.prepare_inputs(d.student, images, targets)
        feats = d.teacher.features(image_list)
        want, _ = d._teacher_losses(image_list, feats, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = d._teacher_losses(image_list, feats, targets)
            half, _ = d._teacher_losses(image_list, {k: v.bfloat16() for k, v in feats.items()}, targets)
    for a, b, c in zip(got, want, half):
        assert a.dtype == torch.float32 and c.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # bf16 features (as autocast gives) move D^T only by their own rounding
        torch.testing.assert_close(c, b, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl", "fasterrcnn"])
def test_distillation_step_end_to_end_under_bf16_autocast(arch):
    d = make_distiller(arch).train()
    batch = [sample(1), sample(2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d(images, targets)
    assert any(k.startswith("distill/pkd/") for k in losses) and any(k.startswith("distill/attention/") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    inputs = d.last_inputs
    assert all(w.dtype == torch.float32 for w in inputs.pixel_weights) and inputs.image_weights.dtype == torch.float32
    assert all(0 < float(w.min()) and float(w.max()) <= 1 for w in inputs.pixel_weights)
    sum(losses.values()).backward()
    grads = [p.grad for p in d.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(p.grad is not None for p in d.methods.parameters())
    stats = d.last_stats
    assert 0 < stats["instance_w_min"] <= stats["instance_w_max"] <= 1
