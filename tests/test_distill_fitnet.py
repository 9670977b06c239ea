import pytest
import torch
import torch.nn.functional as F

from aidkd.distill import DistillInputs, FitNetDistill, fitnet_loss


def test_fitnet_loss_ones_equals_mse():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(fitnet_loss(s, t), F.mse_loss(s, t))
    torch.testing.assert_close(fitnet_loss(s, t, torch.ones(2, 4, 5)), F.mse_loss(s, t))
    torch.testing.assert_close(fitnet_loss(s, t, torch.full((2, 4, 5), 0.2)), 0.2 * F.mse_loss(s, t))


def test_fitnet_loss_pixel_weight_hand():
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([[[[1.0, 2.0]]]])
    pw = torch.tensor([[[3.0, 0.5]]])
    assert fitnet_loss(s, t, pw).item() == pytest.approx((3 * 1 + 0.5 * 4) / 2)


def test_fitnet_gradient_reaches_student_only():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    t = torch.randn(1, 2, 3, 3, requires_grad=True)
    fitnet_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_fitnet_module():
    torch.manual_seed(0)
    module = FitNetDistill(4, 6, 2, fitnet_weight=2.0)
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    teacher = [torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)]
    out = module(DistillInputs(student, teacher, [8, 16], []))
    expected = sum(F.mse_loss(module.adapters[i](student[i]), teacher[i]) for i in range(2))
    torch.testing.assert_close(out["fitnet"], 2.0 * expected)
    level = module(DistillInputs(student, teacher, [8, 16], [], level_weights=torch.tensor([1.0, 0.0])))
    torch.testing.assert_close(level["fitnet"], 2.0 * F.mse_loss(module.adapters[0](student[0]), teacher[0]))
