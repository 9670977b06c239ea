"""docs/extending.md's worked example is code that works: it registers, computes the expected value and trains."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from aidkd.distill import METHODS, DistillInputs, build_method, method_params
from aidkd.distill.aid import AIDWeighting
from aidkd.distill.distiller import Distiller
from aidkd.models import build_detector

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example_code() -> str:
    """The first python block under the heading "Worked example" of docs/extending.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### Worked example"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def l2_mimic():
    namespace: dict = {"__name__": "my_methods"}
    exec(compile(example_code(), str(DOC), "exec"), namespace)  # noqa: S102 (the page's code is what is tested)
    try:
        yield namespace["L2Mimic"]
    finally:
        METHODS.pop("l2_mimic", None)


def test_the_example_registers_with_its_parameters(l2_mimic):
    assert METHODS["l2_mimic"] is l2_mimic
    assert method_params("l2_mimic") == {"mimic_weight": 1.0}
    with pytest.raises(ValueError, match="mimic_weight"):
        build_method("l2_mimic", 4, 8, 2, weight=1.0)


def test_the_example_gives_the_expected_value(l2_mimic):
    method = build_method("l2_mimic", 4, 8, 2, mimic_weight=2.0)
    for adapter in method.adapters:  # adapted student features == 0
        torch.nn.init.zeros_(adapter.weight)
        torch.nn.init.zeros_(adapter.bias)
    student = [torch.rand(2, 4, 6, 8), torch.rand(2, 4, 3, 4)]
    teacher = [torch.full((2, 8, 6, 8), 3.0), torch.full((2, 8, 3, 4), 1.0)]
    inputs = DistillInputs(student, teacher, [8, 16], [torch.zeros(0, 4)] * 2)
    # squared error 9 on level 0 and 1 on level 1, summed over levels, times mimic_weight 2
    assert method(inputs)["mimic"].item() == pytest.approx(2.0 * (9.0 + 1.0))
    # AID: a pixel weight of 0.5 on half of level 0's pixels, 1 elsewhere
    weights = [torch.ones(2, 6, 8), torch.ones(2, 3, 4)]
    weights[0][:, :, :4] = 0.5
    inputs.pixel_weights = weights
    assert method(inputs)["mimic"].item() == pytest.approx(2.0 * (9.0 * 0.75 + 1.0))
    inputs.level_weights = torch.tensor([0.0, 1.0])
    assert method(inputs)["mimic"].item() == pytest.approx(2.0 * 1.0)


def test_the_example_trains_one_step_with_aid(l2_mimic):
    torch.manual_seed(0)
    h, w = 64, 96
    teacher = build_detector("retinanet", "resnet18", 3, fpn_channels=16, min_size=h, max_size=w * 2)
    student = build_detector("retinanet", "resnet18", 3, fpn_channels=8, min_size=h, max_size=w * 2)
    distiller = Distiller(student, teacher, {"l2_mimic": {"name": "l2_mimic", "mimic_weight": 0.5}},
                          AIDWeighting("instance"), sample_shape=(h, w)).train()
    images = [torch.rand(3, h, w) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "image_id": i,
                "flipped": False} for i in range(2)]
    adapter = distiller.methods["l2_mimic"].adapters[0].weight
    before = adapter.detach().clone()
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1)
    losses = distiller(images, targets)
    term = losses["distill/l2_mimic/mimic"]
    assert torch.isfinite(term) and term.item() > 0
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(adapter.detach(), before)  # the method's adapter trained
    assert distiller.last_stats  # AID weighted this step
