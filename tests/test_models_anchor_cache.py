"""Anchors built once per input size (``aidkd.models.anchor_cache``): the same values as building them afresh, at
every size a run alternates between, and no aten op for a size seen before."""
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from aidkd.models import build_detector
from aidkd.models.anchor_cache import CACHE_SIZE
from aidkd.models.ops.base import shared_anchors
from tests.conftest import OpCounter


def _inputs(model, height, width):
    images = ImageList(torch.zeros(2, 3, height, width), [(height, width), (height - 8, width)])
    with torch.no_grad():
        feats = list(model.backbone(images.tensors).values())
    return images, feats


@pytest.mark.parametrize("arch", ["gfl", "retinanet", "fcos", "fasterrcnn"])
def test_cached_anchors_equal_fresh_ones_at_alternating_sizes_and_cost_no_ops(arch):
    model = build_detector(arch, "resnet18", 4, min_size=64, max_size=192, fpn_channels=16).eval()
    gen = model.rpn.anchor_generator if arch == "fasterrcnn" else model.anchor_generator

    def anchors(images, feats):
        if arch == "gfl":
            return model.anchors(images, feats)[0]
        return shared_anchors(gen, images, feats)

    def fresh(images, feats):
        gen.__dict__.pop("_aidkd_anchor_cache", None)
        return anchors(images, feats)

    sizes = [(64, 192), (96, 160), (64, 192), (96, 160)]
    inputs = {s: _inputs(model, *s) for s in set(sizes)}
    expected = {s: [a.clone() for a in fresh(*inputs[s])] for s in set(sizes)}
    gen.__dict__.pop("_aidkd_anchor_cache")
    for i, s in enumerate(sizes):
        with OpCounter() as count:
            got = anchors(*inputs[s])
        assert (count.ops == 0) == (s in sizes[:i])  # a size seen before runs nothing
        assert len(got) == 2 and all(torch.equal(a, e) for a, e in zip(got, expected[s]))
    assert expected[(64, 192)][0].shape != expected[(96, 160)][0].shape
    for i in range(CACHE_SIZE + 3):  # bounded: the oldest sizes are dropped
        anchors(*_inputs(model, 64 + 32 * (i % 6), 192 + 32 * (i // 6)))
    assert len(gen.__dict__["_aidkd_anchor_cache"]) <= CACHE_SIZE
