import math

import pytest
import torch

from aidkd.distill import AIDWeighting, aid_weights, box_cell_owner, instance_pixel_weights


def test_aid_weights_values_range_monotonic():
    losses = torch.tensor([0.0, 0.5, 1.0, 2.0, 10.0, 100.0])
    w = aid_weights(losses)
    torch.testing.assert_close(w, torch.exp(-0.1 * losses))
    assert w[0] == 1.0 and (w > 0).all() and (w <= 1).all()
    assert (w[1:] < w[:-1]).all()
    assert aid_weights(torch.tensor([-3.0])).item() == 1.0  # negative losses clamp to 0
    assert aid_weights(torch.tensor([2.0]), alpha=0.5).item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError):
        aid_weights(losses, alpha=-1.0)


def test_aid_weights_detached():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not aid_weights(losses).requires_grad


def test_pixel_weights_background_and_single_box():
    boxes = [torch.tensor([[8.0, 0.0, 24.0, 8.0]])]  # stride 4 -> cell centres x 10, 14, 18, 22; y 2, 6
    pw = instance_pixel_weights(boxes, [torch.tensor([0.5])], 4, 8, 4)
    expected = torch.ones(4, 8)
    expected[0:2, 2:6] = 0.5
    torch.testing.assert_close(pw[0], expected)


def test_pixel_weights_centre_rule_is_half_open():
    # cell centres at 2, 6, 10 (stride 4); box [2, 2, 6, 6] contains centre 2 but not 6
    pw = instance_pixel_weights([torch.tensor([[2.0, 2.0, 6.0, 6.0]])], [torch.tensor([0.3])], 3, 3, 4)
    expected = torch.ones(3, 3)
    expected[0, 0] = 0.3
    torch.testing.assert_close(pw[0], expected)


def test_pixel_weights_overlap_smaller_box_wins_regardless_of_order():
    big = [0.0, 0.0, 32.0, 32.0]
    small = [8.0, 8.0, 16.0, 16.0]
    for order in ([big, small], [small, big]):
        weights = torch.tensor([0.9, 0.2]) if order[0] is big else torch.tensor([0.2, 0.9])
        pw = instance_pixel_weights([torch.tensor(order)], [weights], 4, 4, 8)
        expected = torch.full((4, 4), 0.9)
        expected[1, 1] = 0.2
        torch.testing.assert_close(pw[0], expected)


def test_pixel_weights_tiny_box_claims_its_centre_cell():
    # box [9, 17, 11, 19] contains no centre of stride-8 cells (4, 12, 20, ...); its centre (10, 18) -> cell (2, 1)
    pw = instance_pixel_weights([torch.tensor([[9.0, 17.0, 11.0, 19.0]])], [torch.tensor([0.4])], 4, 4, 8)
    expected = torch.ones(4, 4)
    expected[2, 1] = 0.4
    torch.testing.assert_close(pw[0], expected)
    # inside a larger box that covers the cell, the tiny box claims nothing (the larger box keeps its cell)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [9.0, 17.0, 11.0, 19.0]])
    pw = instance_pixel_weights([boxes], [torch.tensor([0.8, 0.4])], 4, 4, 8)
    torch.testing.assert_close(pw[0], torch.full((4, 4), 0.8))


def test_tiny_box_does_not_take_the_only_cell_of_a_box_covering_it():
    """A 4x4 box inside a 64x64 box at stride 64: the big box covers the one cell's centre, so it keeps it (the
    tiny box used to claim it, leaving the big box no cell at all on that level)."""
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 10.0, 14.0, 14.0]])]
    weights = [torch.tensor([0.9, 0.2])]
    pw = instance_pixel_weights(boxes, weights, 2, 2, 64)
    torch.testing.assert_close(pw[0], torch.tensor([[0.9, 1.0], [1.0, 1.0]]))
    # order does not matter
    pw = instance_pixel_weights([boxes[0].flip(0)], [weights[0].flip(0)], 2, 2, 64)
    assert pw[0, 0, 0] == pytest.approx(0.9)


def test_competing_tiny_boxes_smallest_wins_and_free_cells_are_claimed():
    """Boxes covering no cell centre claim their centre cell where no box covers it; among claimants the smallest
    wins, whatever the order."""
    tiny = torch.tensor([[70.0, 70.0, 80.0, 80.0], [72.0, 72.0, 76.0, 76.0], [10.0, 70.0, 14.0, 74.0]])
    weights = torch.tensor([0.5, 0.3, 0.7])
    for order in ([0, 1, 2], [2, 1, 0]):
        pw = instance_pixel_weights([tiny[order]], [weights[order]], 2, 2, 64)
        # cell (1, 1): claimed by boxes 0 and 1 -> the smaller (1) wins; cell (1, 0): box 2 alone
        torch.testing.assert_close(pw[0], torch.tensor([[1.0, 1.0], [0.7, 0.3]]))


def test_pixel_weights_stride_handling():
    box = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    w = [torch.tensor([0.5])]
    for stride, size, covered in ((4, 8, 4), (8, 4, 2), (16, 2, 1), (32, 1, 1)):
        pw = instance_pixel_weights(box, w, size, size, stride)
        expected = torch.ones(size, size)
        expected[:covered, :covered] = 0.5
        torch.testing.assert_close(pw[0], expected, msg=f"stride {stride}")


def test_pixel_weights_boxes_partly_or_fully_outside_the_map():
    boxes = torch.tensor([[24.0, 24.0, 100.0, 100.0],  # partly outside: covers cells (3, 3) only
                          [200.0, 5.0, 260.0, 7.0]])    # fully outside, no centre -> clamped centre cell (0, 3)
    pw = instance_pixel_weights([boxes], [torch.tensor([0.5, 0.25])], 4, 4, 8)
    expected = torch.ones(4, 4)
    expected[3, 3] = 0.5
    expected[0, 3] = 0.25
    torch.testing.assert_close(pw[0], expected)


def test_pixel_weights_batch_and_empty_images():
    boxes = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    pw = instance_pixel_weights(boxes, [torch.zeros(0), torch.tensor([0.7])], 2, 2, 8)
    assert pw.shape == (2, 2, 2)
    torch.testing.assert_close(pw[0], torch.ones(2, 2))
    assert pw[1, 0, 0].item() == pytest.approx(0.7) and pw[1].sum().item() == pytest.approx(3.7)
    with pytest.raises(ValueError):
        instance_pixel_weights(boxes, [torch.zeros(0)], 2, 2, 8)


def test_box_cell_owner_ties_go_to_lower_index():
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    owner = box_cell_owner(boxes, 2, 2, 8)
    assert owner.tolist() == [[0, -1], [-1, -1]]


SHAPES = [(8, 8), (4, 4), (2, 2)]
STRIDES = [8, 16, 32]
BOXES = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 16.0, 16.0]]), torch.zeros(0, 4)]
LOSSES = [torch.tensor([1.0, 3.0]), torch.zeros(0)]


def test_aid_weighting_instance():
    pixel, image, level = AIDWeighting("instance").make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    assert level is None and len(pixel) == 3
    assert [tuple(p.shape) for p in pixel] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    w1, w3 = math.exp(-0.1), math.exp(-0.3)
    torch.testing.assert_close(image, torch.tensor([(w1 + w3) / 2, 1.0]))
    p0 = pixel[0][0]
    assert p0[1, 1].item() == pytest.approx(w3) and p0[0, 0].item() == pytest.approx(w1)
    assert p0[5, 5].item() == 1.0 and pixel[0][1].eq(1).all()


def test_aid_weighting_image():
    pixel, image, level = AIDWeighting("image", alpha=0.2).make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    assert level is None
    expected = torch.tensor([math.exp(-0.2 * 2.0), 1.0])
    torch.testing.assert_close(image, expected)
    for p in pixel:
        torch.testing.assert_close(p, expected[:, None, None].expand_as(p))


def test_aid_weighting_level():
    per_level = torch.tensor([0.0, 1.0, 5.0])
    pixel, image, level = AIDWeighting("level").make(None, per_level, BOXES, SHAPES, STRIDES, 2)
    assert pixel is None and image is None
    torch.testing.assert_close(level, torch.exp(-0.1 * per_level))
    with pytest.raises(ValueError, match="per_level_losses"):
        AIDWeighting("level").make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)


def test_aid_weighting_validation():
    with pytest.raises(ValueError, match="granularity"):
        AIDWeighting("box")
    with pytest.raises(ValueError, match="alpha"):
        AIDWeighting(alpha=-0.1)
    with pytest.raises(ValueError, match="image 0"):
        AIDWeighting().make([torch.tensor([1.0]), torch.zeros(0)], None, BOXES, SHAPES, STRIDES, 2)
    with pytest.raises(ValueError, match="batch"):
        AIDWeighting().make(LOSSES, None, BOXES, SHAPES, STRIDES, 3)


def test_aid_stats():
    stats = AIDWeighting().stats(LOSSES)
    assert stats["instance_w_max"] == pytest.approx(math.exp(-0.1))
    assert stats["instance_w_min"] == pytest.approx(math.exp(-0.3))
    assert stats["instance_w_count"] == 2
    assert "image_w_mean" in AIDWeighting("image").stats(LOSSES)
    assert AIDWeighting().stats([torch.zeros(0)]) == {}


def test_aid_stats_log_teacher_losses_and_quantiles():
    losses = [torch.tensor([1.0, 3.0, 2.0]), torch.tensor([4.0]), torch.zeros(0)]
    stats = AIDWeighting(alpha=0.5).stats(losses)
    assert stats["teacher_loss_mean"] == pytest.approx(2.5)
    assert (stats["teacher_loss_min"], stats["teacher_loss_max"]) == (1.0, 4.0)
    assert stats["teacher_loss_q50"] == pytest.approx(2.5)  # linear interpolation between 2 and 3
    assert stats["teacher_loss_q10"] == pytest.approx(1.3) and stats["teacher_loss_q90"] == pytest.approx(3.7)
    assert stats["teacher_loss_count"] == 4
    assert stats["instance_w_q50"] == pytest.approx((math.exp(-0.5 * 2) + math.exp(-0.5 * 3)) / 2)
    assert stats["instance_w_max"] == pytest.approx(math.exp(-0.5))


def test_aid_stats_level_logs_the_weights_it_applies():
    """With ``level`` only level weights are applied: log those (and the per-level D^T), not instance weights."""
    stats = AIDWeighting("level").stats(LOSSES, torch.tensor([0.0, 10.0]))
    assert stats["level_w_min"] == pytest.approx(math.exp(-1)) and stats["level_w_max"] == 1.0
    assert stats["teacher_loss_level_max"] == 10.0 and stats["level_w_count"] == 2
    assert not any(k.startswith("instance_w") for k in stats)


def test_aid_remembers_last_instance_weights():
    aid = AIDWeighting()
    assert aid.instance_weights_of_last_batch(0) is None
    aid.make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    torch.testing.assert_close(aid.instance_weights_of_last_batch(0), torch.exp(-0.1 * LOSSES[0]))
    assert aid.instance_weights_of_last_batch(1).numel() == 0 and aid.instance_weights_of_last_batch(2) is None
    assert aid == AIDWeighting()  # runtime state is not configuration


# ------------------------------------------------------------------ normalize: only the weights' contrast acts
def test_normalized_instance_weights_average_one_and_keep_their_ratios():
    losses = [torch.tensor([1.0, 3.0]), torch.tensor([10.0]), torch.zeros(0)]
    boxes = [BOXES[0], torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)]
    plain = AIDWeighting(alpha=1.0).instance_weights(losses)
    pixel, image, _ = AIDWeighting(alpha=1.0, normalize=True).make(losses, None, boxes, SHAPES, STRIDES, 3)
    raw = torch.exp(-torch.tensor([1.0, 3.0, 10.0]))
    expected = raw / raw.mean()
    normed = AIDWeighting(alpha=1.0, normalize=True).instance_weights(losses)
    torch.testing.assert_close(torch.cat(normed), expected)
    assert torch.cat(normed).mean().item() == pytest.approx(1.0)
    # the ratio between two instances (the contrast) is the plain weights' ratio
    assert (normed[0][0] / normed[1][0]).item() == pytest.approx((plain[0][0] / plain[1][0]).item())
    assert pixel[0][0, 1, 1].item() == pytest.approx(expected[1].item())  # the small box's cells
    assert pixel[0][0, 5, 5].item() == 1.0  # background keeps 1
    torch.testing.assert_close(image, torch.stack([expected[:2].mean(), expected[2], torch.tensor(1.0)]))
    assert AIDWeighting(alpha=1.0, normalize=True).stats(losses)["instance_w_mean"] == pytest.approx(1.0)


def test_normalized_level_and_image_weights_average_one():
    per_level = torch.tensor([0.0, 1.0, 5.0])
    _, _, level = AIDWeighting("level", alpha=0.5, normalize=True).make(None, per_level, BOXES, SHAPES, STRIDES, 2)
    raw = torch.exp(-0.5 * per_level)
    torch.testing.assert_close(level, raw / raw.mean())
    assert AIDWeighting("level", alpha=0.5, normalize=True).stats(None, per_level)["level_w_mean"] == pytest.approx(1)
    _, image, _ = AIDWeighting("image", alpha=0.2, normalize=True).make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    raw = torch.tensor([math.exp(-0.2 * 2.0), 1.0])
    torch.testing.assert_close(image, raw / raw.mean())


def test_normalize_leaves_nothing_to_normalise_alone():
    """No instances, or only infinite losses (weights 0): nothing is divided by zero and no weight appears."""
    aid = AIDWeighting(alpha=1.0, normalize=True)
    assert [w.numel() for w in aid.instance_weights([torch.zeros(0), torch.zeros(0)])] == [0, 0]
    torch.testing.assert_close(aid.instance_weights([torch.tensor([math.inf, math.inf])])[0], torch.zeros(2))
    _, image, _ = aid.make([torch.zeros(0), torch.zeros(0)], None, [torch.zeros(0, 4)] * 2, SHAPES, STRIDES, 2)
    torch.testing.assert_close(image, torch.ones(2))
    assert AIDWeighting(alpha=1.0) == AIDWeighting(alpha=1.0, normalize=False)  # off by default


def test_aid_weighting_batch_is_one_weight_on_every_term():
    """The weakening control: the batch's mean instance weight on every pixel and image, background included."""
    pixel, image, level = AIDWeighting("batch", alpha=0.2).make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    mean = (math.exp(-0.2) + math.exp(-0.6)) / 2  # the batch's two instances; the empty image adds none
    assert level is None
    torch.testing.assert_close(image, torch.full((2,), mean))
    for p in pixel:
        torch.testing.assert_close(p, torch.full_like(p, mean))
    empty = AIDWeighting("batch").make([torch.zeros(0)] * 2, None, [torch.zeros(0, 4)] * 2, SHAPES, STRIDES, 2)
    assert empty.image_weights.eq(1).all() and all(p.eq(1).all() for p in empty.pixel_weights)
    # normalised, a single weight divided by its mean is 1: KD itself
    _, image, _ = AIDWeighting("batch", alpha=0.2, normalize=True).make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    torch.testing.assert_close(image, torch.ones(2))
    assert AIDWeighting("batch", alpha=0.2).stats(LOSSES)["batch_w_mean"] == pytest.approx(mean)


def test_global_terms_pixel_hands_the_pixel_maps_to_the_global_terms():
    weights = AIDWeighting("instance").make(LOSSES, None, BOXES, SHAPES, STRIDES, 2)
    assert AIDWeighting("instance").location_weights(weights) is None  # default: the image mean
    assert AIDWeighting("instance", global_terms="pixel").location_weights(weights) is weights.pixel_weights
    level = AIDWeighting("level", global_terms="pixel")
    assert level.location_weights(level.make(None, torch.ones(3), BOXES, SHAPES, STRIDES, 2)) is None
    with pytest.raises(ValueError, match="global_terms"):
        AIDWeighting(global_terms="box")


def test_all_levels_at_once_equal_each_level_and_image_alone():
    """The batched map of every level (one op set for all levels) against ``box_cell_owner`` of each image and level
    on its own: random boxes, tiny ones (they claim their centre cell), ones off the map, and padded batches."""
    from aidkd.distill.base import box_cell_owner_levels, split_levels

    gen = torch.Generator().manual_seed(0)
    shapes, strides = [(12, 40), (6, 20), (3, 10), (2, 5), (1, 3)], [8, 16, 32, 64, 128]
    for _ in range(50):
        counts = torch.randint(0, 7, (3,), generator=gen).tolist()
        boxes = []
        for n in counts:
            xy = torch.rand(n, 2, generator=gen) * torch.tensor([360.0, 110.0]) - 20
            boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=gen) ** 3 * 200], dim=1))
        padded = torch.zeros(3, max(counts), 4)
        valid = torch.zeros(3, max(counts), dtype=torch.bool)
        for b, bx in enumerate(boxes):
            padded[b, :len(bx)], valid[b, :len(bx)] = bx, True
        owners = split_levels(box_cell_owner_levels(padded, valid, shapes, strides), shapes)
        for (h, w), s, owner in zip(shapes, strides, owners):
            for b, bx in enumerate(boxes):
                assert torch.equal(owner[b], box_cell_owner(bx, h, w, s))


def test_instance_maps_of_five_levels_cost_the_ops_of_one():
    """AID's instance maps were built level by level (~75 aten ops per level and step, each a kernel launch on a
    GPU): all levels now share one batched op set, so five levels launch no more kernels than one."""
    from tests.conftest import OpCounter

    weighting = AIDWeighting("instance")
    shapes, strides = [(12, 40), (6, 20), (3, 10), (2, 5), (1, 3)], [8, 16, 32, 64, 128]
    counts = {}
    for levels in (1, 5):
        weighting.make(LOSSES, None, BOXES, shapes[:levels], strides[:levels], 2)  # constants built once
        with OpCounter() as c:
            weighting.make(LOSSES, None, BOXES, shapes[:levels], strides[:levels], 2)
        counts[levels] = c.kernels
    assert counts[5] == counts[1] < 100, counts
