import math

import pytest
import torch

from aidkd.distill import (
    AttentionDistill,
    DistillInputs,
    attention_masks,
    attention_transfer_loss,
    masked_feature_loss,
)


def test_masks_sum_to_hw_and_c():
    torch.manual_seed(0)
    feat = torch.randn(3, 5, 4, 6)
    for temperature in (0.1, 0.5, 2.0):
        spatial, channel = attention_masks(feat, temperature)
        assert spatial.shape == (3, 4, 6) and channel.shape == (3, 5)
        torch.testing.assert_close(spatial.sum(dim=(1, 2)), torch.full((3,), 24.0))
        torch.testing.assert_close(channel.sum(dim=1), torch.full((3,), 5.0))
        assert (spatial > 0).all() and (channel > 0).all()


def test_masks_follow_abs_means():
    feat = torch.ones(1, 2, 2, 2)
    feat[0, 0, 0, 0] = -5.0  # |.| large at (0, 0) and on channel 0
    spatial, channel = attention_masks(feat, 0.5)
    assert spatial[0, 0, 0] == spatial.max() and channel[0, 0] > channel[0, 1]
    spatial, channel = attention_masks(torch.full((1, 3, 2, 2), -2.0), 1.0)
    torch.testing.assert_close(spatial, torch.ones(1, 2, 2))
    torch.testing.assert_close(channel, torch.ones(1, 3))


def test_masked_loss_zero_for_equal_features():
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 4, 4)
    spatial, channel = attention_masks(feat, 0.5)
    assert masked_feature_loss(feat.clone(), feat, spatial, channel).item() == 0.0


def test_masked_loss_hand_computation():
    student = torch.zeros(1, 1, 2, 2)
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    spatial = torch.tensor([[[1.0, 0.5], [2.0, 0.5]]])
    channel = torch.tensor([[1.0]])
    def published(*args):
        return masked_feature_loss(*args, reduction="published").item()

    # 1*1 + 4*0.5 + 9*2 + 16*0.5 = 29
    assert published(student, teacher, spatial, channel) == pytest.approx(math.sqrt(29.0))
    # channel mask scales every squared term
    assert published(student, teacher, spatial, 2 * channel) == pytest.approx(math.sqrt(58.0))
    # pixel weight multiplies the squared error (linear rule): 2 * 1 + 2 + 18 + 8 = 30
    pw = torch.tensor([[[2.0, 1.0], [1.0, 1.0]]])
    assert published(student, teacher, spatial, channel, pw) == pytest.approx(math.sqrt(30.0))
    # all-ones pixel weights = unweighted; constant w = sqrt(w) * unweighted
    assert published(student, teacher, spatial, channel, torch.ones(1, 2, 2)) == pytest.approx(math.sqrt(29.0))
    assert published(student, teacher, spatial, channel, torch.full((1, 2, 2), 0.3)) == \
        pytest.approx(math.sqrt(0.3 * 29.0))
    # normalized (default): mean of the 4 squared terms times 2 * 256 * reference_cells(8) before the root
    assert masked_feature_loss(student, teacher, spatial, channel).item() == \
        pytest.approx(math.sqrt(29.0 / 4 * 2 * 256 * 100 * 168))


def test_masked_loss_gradient_reaches_student_only():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    spatial, channel = attention_masks(teacher, 0.5)
    spatial = spatial.detach().requires_grad_(True)
    channel = channel.detach().requires_grad_(True)
    pw = torch.rand(2, 4, 4, requires_grad=True)
    masked_feature_loss(student, teacher, spatial, channel, pw).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and spatial.grad is None and channel.grad is None and pw.grad is None


def test_masked_loss_gradient_finite_at_zero_residual():
    feat = torch.randn(1, 2, 3, 3)
    student = feat.clone().requires_grad_(True)
    spatial, channel = attention_masks(feat, 0.5)
    masked_feature_loss(student, feat, spatial, channel).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("form", ["paper", "code"])
def test_attention_transfer_weights(form):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    base = attention_transfer_loss(student, teacher, form=form, reduction="published")
    assert attention_transfer_loss(teacher, teacher, form=form).item() == 0.0
    ones = attention_transfer_loss(student, teacher, form=form, image_weights=torch.ones(3), reduction="published")
    torch.testing.assert_close(ones, base)
    quarter = attention_transfer_loss(student, teacher, form=form, image_weights=torch.full((3,), 0.25),
                                      reduction="published")
    torch.testing.assert_close(quarter, 0.5 * base)  # weights multiply squared residuals: sqrt(0.25) = 0.5
    # a zero-weighted image does not contribute
    w = torch.tensor([1.0, 1.0, 0.0])
    only_two = attention_transfer_loss(student[:2], teacher[:2], form=form, reduction="published")
    c = attention_transfer_loss(student, teacher, form=form, image_weights=w, reduction="published")
    torch.testing.assert_close(c, only_two)


def test_attention_transfer_forms_hand():
    student = torch.zeros(1, 1, 1, 2)
    teacher = torch.tensor([[[[-1.0, 3.0]]]])
    def published(form):
        return attention_transfer_loss(student, teacher, form=form, reduction="published").item()

    # paper: channel |F| mean 2 -> 2; spatial |F| (1, 3) -> sqrt(10)
    assert published("paper") == pytest.approx(2 + math.sqrt(10))
    # code: channel signed mean 1 -> 1; spatial signed (-1, 3) -> sqrt(10)
    assert published("code") == pytest.approx(1 + math.sqrt(10))
    # normalized (default): channel term x sqrt(2 * 256 / 1), spatial term x sqrt(2 * reference_cells(8) / 2)
    assert attention_transfer_loss(student, teacher, form="paper").item() == \
        pytest.approx(2 * math.sqrt(512) + math.sqrt(10) * math.sqrt(100 * 168))
    with pytest.raises(ValueError, match="channels"):
        attention_transfer_loss(torch.zeros(1, 2, 1, 2), teacher, form="paper")
    with pytest.raises(ValueError, match="form"):
        attention_transfer_loss(student, teacher, form="other")


def _inputs(b=2, cs=4, ct=6, sizes=((8, 8), (4, 4)), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, cs, h, w, generator=g, requires_grad=True) for h, w in sizes]
    teacher = [torch.randn(b, ct, h, w, generator=g) for h, w in sizes]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 16.0]]) for _ in range(b)]
    return DistillInputs(student, teacher, [8 * 2**i for i in range(len(sizes))], boxes, **kw)


@pytest.mark.parametrize("at_form", ["paper", "code"])
@pytest.mark.parametrize("mask_source", ["mean", "teacher"])
def test_attention_module(at_form, mask_source):
    torch.manual_seed(0)
    module = AttentionDistill(4, 6, 2, at_form=at_form, mask_source=mask_source)
    inputs = _inputs()
    out = module(inputs)
    assert set(out) == {"am", "at"}
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    (out["am"] + out["at"]).backward()
    assert inputs.student[0].grad is not None
    assert module.adapters[0].weight.grad is not None
    if at_form == "code":
        assert module.channel_adapters[1].weight.grad is not None
        assert module.spatial_adapters[1].weight.grad is not None


def test_attention_module_weights_scale_terms():
    torch.manual_seed(0)
    module = AttentionDistill(4, 6, 2, am_weight=1.0, at_weight=1.0)
    plain = module(_inputs())
    scaled = AttentionDistill(4, 6, 2, am_weight=2.0, at_weight=3.0)
    scaled.load_state_dict(module.state_dict())
    out = scaled(_inputs())
    torch.testing.assert_close(out["am"], 2 * plain["am"])
    torch.testing.assert_close(out["at"], 3 * plain["at"])
    # constant AID weights w everywhere multiply every squared error: the root terms scale by sqrt(w)
    inputs = _inputs(pixel_weights=[torch.full((2, 8, 8), 0.25), torch.full((2, 4, 4), 0.25)],
                     image_weights=torch.full((2,), 0.25))
    out = module(inputs)
    torch.testing.assert_close(out["am"], 0.5 * plain["am"])
    torch.testing.assert_close(out["at"], 0.5 * plain["at"])


def test_attention_module_rejects_bad_params():
    with pytest.raises(ValueError, match="at_form"):
        AttentionDistill(4, 6, 2, at_form="x")
    with pytest.raises(ValueError, match="mask_source"):
        AttentionDistill(4, 6, 2, mask_source="student")
    with pytest.raises(ValueError, match="temperature"):
        AttentionDistill(4, 6, 2, temperature=0)
