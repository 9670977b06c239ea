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
import make_loss_reference as ref  # noqa: E402

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
