"""PKD (Cao et al., NeurIPS 2022): per-channel standardised features compared by MSE / 2."""
import math

import pytest
import torch

from aidkd.distill import DistillInputs, PKDDistill, build_method, channel_standardise, pkd_loss


def test_pkd_loss_hand_worked():
    # one channel [1, 2, 3, 4]: mean 2.5, population variance 1.25 -> z = [-3, -1, 1, 3] / sqrt(5)
    student = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    z = torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5)
    torch.testing.assert_close(channel_standardise(student).flatten(), z, atol=1e-5, rtol=1e-5)
    # the reversed teacher is perfectly anti-correlated: (z - (-z))**2 = 4 z**2, mean 4, halved -> 2 = 1 - r, r = -1
    teacher = torch.tensor([4.0, 3.0, 2.0, 1.0]).reshape(1, 1, 2, 2)
    assert pkd_loss(student, teacher).item() == pytest.approx(2.0, rel=1e-5)
    # scale and shift do not matter: 10 * teacher + 3 correlates perfectly with the teacher
    assert pkd_loss(10 * teacher + 3, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # pixel weights multiply each pixel's squared error: weights [1, 0, 0, 1] keep 4 * (9 + 9) / 5 / 4 / 2
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert pkd_loss(student, teacher, w).item() == pytest.approx(4 * 18 / 5 / 4 / 2, rel=1e-5)


def test_pkd_loss_is_one_minus_pearson_r():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    r = torch.stack([torch.corrcoef(torch.stack([s[b, c].flatten(), t[b, c].flatten()]))[0, 1]
                     for b in range(2) for c in range(3)])
    assert pkd_loss(s, t).item() == pytest.approx(1 - r.mean().item(), rel=1e-4)


def test_pkd_loss_checks_shapes_and_detaches_the_teacher():
    with pytest.raises(ValueError, match="adapt the student"):
        pkd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="pixel_weight"):
        pkd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 3, 2))
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    t = torch.randn(1, 2, 3, 3, requires_grad=True)
    pkd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_pkd_module_adapts_widths_and_weights_terms():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    teacher = [torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    inputs = DistillInputs(student, teacher, [8, 16], [torch.zeros(0, 4)] * 2)
    torch.manual_seed(0)
    module = build_method("pkd", 4, 6, 2)
    assert isinstance(module, PKDDistill) and module.pkd_weight == 6.0
    out = module(inputs)
    expected = 6.0 * sum(pkd_loss(module.adapters[i](s), t) for i, (s, t) in enumerate(zip(student, teacher)))
    torch.testing.assert_close(out["pkd"], expected)
    same = build_method("pkd", 6, 6, 2, pkd_weight=1.0)
    assert all(isinstance(a, torch.nn.Identity) for a in same.adapters)
    assert same(DistillInputs(teacher, teacher, [8, 16], [torch.zeros(0, 4)] * 2))["pkd"].item() == \
        pytest.approx(0.0, abs=1e-6)
