import pytest
import torch

from aidkd.distill import (
    DistillInputs,
    FGDDistill,
    GlobalContextBlock,
    attention_masks,
    fgd_attention_loss,
    fgd_feature_loss,
    fgd_global_loss,
    fgd_masks,
    reference_cells,
)


def test_fgd_masks_hand_case():
    # 4x4 map, stride 4: box A covers cells rows 0-1, cols 0-1 (4 cells); box B covers cell (0, 0) only
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)]
    fg, bg = fgd_masks(boxes, 4, 4, 4)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 0.25
    expected[0, 0] = 1.0  # the smaller box wins (larger scale value)
    torch.testing.assert_close(fg[0], expected)
    expected_bg = torch.full((4, 4), 1 / 12)
    expected_bg[:2, :2] = 0
    torch.testing.assert_close(bg[0], expected_bg)
    # an image without boxes: no foreground, uniform background summing to 1
    torch.testing.assert_close(fg[1], torch.zeros(4, 4))
    torch.testing.assert_close(bg[1], torch.full((4, 4), 1 / 16))


def test_fgd_masks_rows_are_y_and_tiny_box_claims_centre():
    boxes = [torch.tensor([[8.0, 0.0, 16.0, 4.0], [13.0, 9.0, 14.0, 10.0]])]  # wide box in row 0; tiny box
    fg, bg = fgd_masks(boxes, 3, 5, 4)
    assert fg[0, 0, 2] == 0.5 and fg[0, 0, 3] == 0.5 and fg[0, 2, 3] == 1.0
    assert fg[0].gt(0).sum() == 3
    torch.testing.assert_close(bg[0].sum(), torch.tensor(1.0))


def test_fgd_masks_full_cover_gives_zero_background():
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], 2, 2, 4)
    torch.testing.assert_close(fg[0], torch.full((2, 2), 0.25))
    assert bg.sum() == 0


def test_fgd_feature_loss_hand_and_weights():
    student = torch.zeros(1, 1, 1, 2)
    teacher = torch.tensor([[[[1.0, 2.0]]]])
    fg_mask = torch.tensor([[[1.0, 0.0]]])
    bg_mask = torch.tensor([[[0.0, 1.0]]])
    spatial = torch.tensor([[[0.5, 1.5]]])
    channel = torch.tensor([[2.0]])
    fg, bg = fgd_feature_loss(student, teacher, fg_mask, bg_mask, spatial, channel, reduction="published")
    assert fg.item() == pytest.approx(1 * 0.5 * 2) and bg.item() == pytest.approx(4 * 1.5 * 2)
    fg_w, bg_w = fgd_feature_loss(student, teacher, fg_mask, bg_mask, spatial, channel, torch.tensor([[[0.5, 1.0]]]),
                                  reduction="published")
    assert fg_w.item() == pytest.approx(0.5) and bg_w.item() == pytest.approx(12.0)
    # normalized (default): the channel sum is rescaled to 256 channels (here C = 1)
    fg_n, bg_n = fgd_feature_loss(student, teacher, fg_mask, bg_mask, spatial, channel)
    assert fg_n.item() == pytest.approx(256 * 1.0) and bg_n.item() == pytest.approx(256 * 12.0)
    zero = fgd_feature_loss(teacher, teacher, fg_mask, bg_mask, spatial, channel)
    assert zero[0].item() == 0 and zero[1].item() == 0


def test_fgd_attention_and_global_losses():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ss, sc = attention_masks(s, 0.5)
    ts, tc = attention_masks(t, 0.5)
    base = fgd_attention_loss(ss, sc, ts, tc, reduction="published")
    expected = ((sc - tc).abs().sum() + (ss - ts).abs().sum()) / 2
    torch.testing.assert_close(base, expected)
    torch.testing.assert_close(fgd_attention_loss(ss, sc, ts, tc, torch.ones(2), reduction="published"), base)
    # normalized: channel sum x 256 / C, spatial sum x reference_cells(stride) / (H*W)
    cells = reference_cells(16)
    expected_n = ((sc - tc).abs().sum() * 256 / 3 + (ss - ts).abs().sum() * cells / 16) / 2
    torch.testing.assert_close(fgd_attention_loss(ss, sc, ts, tc, stride=16), expected_n)
    block = GlobalContextBlock(3)
    torch.testing.assert_close(block(s), s)  # identity at init (zero last conv)
    torch.testing.assert_close(fgd_global_loss(block(s), block(t), reduction="published"), (s - t).pow(2).sum() / 2)
    torch.testing.assert_close(fgd_global_loss(s, t, torch.tensor([0.0, 2.0]), reduction="published"),
                               (s[1] - t[1]).pow(2).sum())
    torch.testing.assert_close(fgd_global_loss(s, t, stride=16), (s - t).pow(2).sum() / 2 * 256 * cells / 48)


def test_fgd_module():
    torch.manual_seed(0)
    module = FGDDistill(4, 6, 2)
    student = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    teacher = [torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)]
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 20.0]]), torch.zeros(0, 4)]
    out = module(DistillInputs(student, teacher, [8, 16], boxes))
    assert set(out) == {"fg", "bg", "attention", "global"}
    assert all(torch.isfinite(v) for v in out.values()) and out["fg"] > 0
    sum(out.values()).backward()
    assert student[0].grad is not None and module.aligns[0].weight.grad is not None
    assert module.teacher_context[0].transform[-1].weight.grad is not None
    same = FGDDistill(6, 6, 1)
    assert isinstance(same.aligns[0], torch.nn.Identity)
    with pytest.raises(ValueError, match="boxes"):
        module(DistillInputs(student, teacher, [8, 16], boxes[:1]))
