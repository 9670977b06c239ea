"""The batched (padded, mask-beside) targets, assignment, losses, teacher losses and AID maps give the numbers the
per-image code gave: tests/data/loss_reference.json, written by tests/data/make_loss_reference.py on the per-image
implementation (commit recorded in the file), for every family on a fixed batch with crowded, tiny, ignored and
empty images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_loss_reference as ref

REFERENCE = json.loads((DATA / "loss_reference.json").read_text())


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_losses_equal_the_per_image_reference(family):
    torch.set_num_threads(1)
    expected = REFERENCE["families"][family]
    got = ref.compute(family)
    assert set(got["detection"]) == set(expected["detection"])
    for k, v in expected["detection"].items():
        close(got["detection"][k], v)
    assert len(got["per_instance"]) == len(expected["per_instance"])
    for a, b in zip(got["per_instance"], expected["per_instance"]):
        close(a, b)
    close(got["per_level"], expected["per_level"])
    for k in ("cls", "box"):
        for a, b in zip(got["parts"][k], expected["parts"][k]):
            close(a, b)
    for a, b in zip(got["aid_maps"], expected["aid_maps"]):
        close(a, b)


def test_padded_matcher_and_atss_equal_their_per_image_results():
    """``match_batch`` equals torchvision's ``Matcher`` image by image (ties and low-quality matches included), and
    ``ATSSAssigner.assign_batch`` of a padded batch equals the assigner called on each image alone."""
    from torchvision.models.detection._utils import Matcher

    from aidkd.models.atss import ATSSAssigner
    from aidkd.models.targets import match_batch, pad_per_image, unpad_per_image

    g = torch.Generator().manual_seed(0)
    quality = (torch.rand(3, 5, 40, generator=g) * 4).round() / 4  # coarse values: many ties
    sizes = [5, 2, 0]
    valid = torch.arange(5)[None, :] < torch.tensor(sizes)[:, None]
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    got = match_batch(matcher, quality, valid)
    for b, n in enumerate(sizes):
        expected = matcher(quality[b, :n]) if n else torch.full((40,), -1)
        assert torch.equal(got[b], expected), b

    xy = torch.rand(120, 2, generator=g) * 100
    anchors = torch.cat([xy - 8, xy + 8], dim=1)
    boxes = [torch.tensor([[10.0, 10.0, 40.0, 50.0], [12.0, 12.0, 38.0, 48.0], [60.0, 5.0, 95.0, 30.0]]),
             torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.zeros(0, 4)]
    padded, mask = pad_per_image(boxes)
    assert [t.tolist() for t in unpad_per_image(padded, [3, 1, 0])] == [b.tolist() for b in boxes]
    atss = ATSSAssigner(topk=4)
    batched = atss.assign_batch(anchors, [80, 40], padded, mask)
    for b, image_boxes in enumerate(boxes):
        assert torch.equal(batched[b], atss(anchors, [80, 40], image_boxes)), b
    assert (batched[0] >= 0).any() and (batched[2] == -1).all()
