import math

import pytest
import torch

from aidkd.distill import (
    DistillInputs,
    NonLocalBlock2d,
    NonLocalDistill,
    default_nonlocal_plan,
    nonlocal_loss,
    reference_cells,
)


@pytest.mark.parametrize("shape,stride", [((2, 8, 16, 12), 8), ((2, 8, 3, 5), 8), ((1, 8, 1, 1), 4),
                                          ((3, 8, 7, 7), 2)])
def test_block_is_identity_at_init(shape, stride):
    torch.manual_seed(0)
    block = NonLocalBlock2d(8, 4, stride)
    x = torch.randn(*shape)
    for train in (True, False):
        block.train(train)
        torch.testing.assert_close(block(x), x)


def test_block_is_not_identity_after_update_and_pools_safely():
    torch.manual_seed(0)
    block = NonLocalBlock2d(8, 4, 8)
    torch.nn.init.ones_(block.out_norm.weight)
    for shape in [(2, 8, 16, 12), (2, 8, 3, 5), (2, 8, 1, 1), (1, 8, 1, 2)]:
        x = torch.randn(*shape)
        y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    block.eval()
    assert not torch.allclose(block(torch.randn(2, 8, 6, 6)), torch.zeros(2, 8, 6, 6))


def test_nonlocal_loss_and_weights():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    base = nonlocal_loss(s, t, reduction="published")
    torch.testing.assert_close(base, (s - t).pow(2).sum().sqrt())
    torch.testing.assert_close(nonlocal_loss(s, t, torch.ones(3), reduction="published"), base)
    # weights multiply the squared residual (linear rule): a constant w scales the norm by sqrt(w)
    torch.testing.assert_close(nonlocal_loss(s, t, torch.full((3,), 0.25), reduction="published"), 0.5 * base)
    # normalized (default): published * sqrt(2 * 256 * reference_cells(stride) / numel)
    torch.testing.assert_close(nonlocal_loss(s, t, stride=32),
                               base * math.sqrt(2 * 256 * reference_cells(32) / s.numel()))
    with pytest.raises(ValueError):
        nonlocal_loss(s, t[:, :2])


def test_default_plan():
    inter, strides = default_nonlocal_plan(5, 256)
    assert inter == [64, 64, 128, 128, 128] and strides == [8, 4, 2, 2, 2]
    inter, _ = default_nonlocal_plan(3, 64)
    assert inter == [32, 32, 32]


def _inputs(b=2, cs=8, ct=16, sizes=((16, 16), (8, 8), (1, 1)), **kw):
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(b, cs, h, w, generator=g, requires_grad=True) for h, w in sizes]
    teacher = [torch.randn(b, ct, h, w, generator=g) for h, w in sizes]
    return DistillInputs(student, teacher, [8, 16, 32][: len(sizes)], [torch.zeros(0, 4)] * b, **kw)


@pytest.mark.parametrize("train_teacher_block", [True, False])
def test_module_finite_and_gradients(train_teacher_block):
    torch.manual_seed(0)
    module = NonLocalDistill(8, 16, 3, train_teacher_block=train_teacher_block)
    inputs = _inputs()
    out = module(inputs)
    assert set(out) == {"nl"} and torch.isfinite(out["nl"]) and out["nl"] > 0
    out["nl"].backward()
    assert inputs.student[0].grad is not None
    assert module.adapters[0].weight.grad is not None
    # the zero-initialised BatchNorm of the output conv is what receives a gradient first
    assert module.student_blocks[0].out_norm.weight.grad.abs().sum() > 0
    teacher_grad = module.teacher_blocks[0].out_norm.weight.grad
    if train_teacher_block:
        assert teacher_grad is not None
    else:
        assert teacher_grad is None
        assert not any(p.requires_grad for p in module.teacher_blocks.parameters())


def test_module_batch_of_one_with_1x1_map_trains():
    module = NonLocalDistill(8, 16, 3)
    out = module(_inputs(b=1))
    out["nl"].backward()
    assert torch.isfinite(out["nl"])


def test_module_custom_plan_and_validation():
    module = NonLocalDistill(8, 16, 2, inter_channels=[2, 3], pool_strides=[1, 2])
    assert module.student_blocks[1].inter_channels == 3 and module.teacher_blocks[0].pool_stride == 1
    with pytest.raises(ValueError, match="inter_channels"):
        NonLocalDistill(8, 16, 2, inter_channels=[2])
    with pytest.raises(ValueError, match="pool_strides"):
        NonLocalDistill(8, 16, 2, pool_strides=[2, 2, 2])


def test_teacher_block_is_frozen_by_default():
    """The ablations (benchmarks/results/strength_cpu, strength_cpu_easy) favoured a frozen teacher-side block."""
    module = NonLocalDistill(8, 16, 3)
    assert module.train_teacher_block is False
    assert not any(p.requires_grad for p in module.teacher_blocks.parameters())
