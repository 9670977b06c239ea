"""ATSS assigner on small hand-made anchor sets (IoUs and thresholds worked out in the comments)."""
import pytest
import torch

from aidkd.models.atss import ATSSAssigner


def far_zeros(x0: float, n: int = 3) -> list[list[float]]:
    """``n`` 20x20 anchors far from every box of these tests (IoU 0)."""
    return [[x0 + 20.0 * i, 60.0, x0 + 20.0 * (i + 1), 80.0] for i in range(n)]


def test_topk_per_level_and_mean_plus_std_threshold():
    gt = torch.tensor([[0.0, 0.0, 4.0, 40.0]])  # thin box, centre (2, 20)
    level0 = [
        [-8.0, 10.0, 12.0, 30.0],  # a0: centre (2, 20), distance 0,  IoU 80/480 = 0.166667
        [-8.0, 15.0, 12.0, 35.0],  # a1: centre (2, 25), distance 5,  IoU 80/480 = 0.166667
        [-8.0, 21.0, 12.0, 41.0],  # a2: centre (2, 31), distance 11, IoU 76/484 = 0.157025
        [-2.0, -28.0, 6.0, 44.0],  # a3: centre (2, 8),  distance 12, IoU 160/576 = 0.277778 (best!), 4th nearest
    ]
    anchors = torch.tensor(level0 + far_zeros(100) + far_zeros(200))
    # topk=3: level 0 gives a0, a1, a2 (a3 is 4th by distance, so never a candidate); levels 1 and 2 give three
    # IoU-0 anchors each. Candidate IoUs: [1/6, 1/6, 0.157025, 0 x 6]
    #   mean = 0.490358 / 9 = 0.054484
    #   unbiased std = sqrt((2 * 0.112183^2 + 0.102541^2 + 6 * 0.054484^2) / 8) = sqrt(0.053495 / 8) = 0.081773
    #   threshold = 0.136257 -> a0, a1, a2 pass; all three centres lie inside the box.
    ious = torch.tensor([1 / 6, 1 / 6, 76 / 484] + [0.0] * 6)
    assert (ious.mean() + ious.std()).item() == pytest.approx(0.136257, abs=1e-5)
    matched = ATSSAssigner(topk=3)(anchors, [4, 3, 3], gt)
    assert matched.tolist() == [0, 0, 0, -1] + [-1] * 6


def test_all_candidates_below_a_high_threshold():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # centre (5, 5), distance 0, IoU 1
        [2.0, 0.0, 12.0, 10.0],  # centre (7, 5), distance 2, IoU 80/120 = 0.666667
        [0.0, 4.0, 10.0, 14.0],  # centre (5, 9), distance 4, IoU 60/140 = 0.428571
        [15.0, 15.0, 25.0, 25.0],  # centre (20, 20): not among the 3 nearest
    ])
    # candidates IoU [1, 0.666667, 0.428571]: mean 0.698413, std 0.287033, threshold 0.985446: only the first passes
    matched = ATSSAssigner(topk=3)(anchors, [4], gt)
    assert matched.tolist() == [0, -1, -1, -1]


def test_centre_must_lie_inside_the_box():
    gt = torch.tensor([[0.0, 0.0, 4.0, 40.0]])
    level0 = [
        [-8.0, 10.0, 12.0, 30.0],  # centre (2, 20): IoU 1/6, inside
        [-4.0, 10.0, 16.0, 30.0],  # centre (6, 20): IoU 80/480 = 1/6 as well, but x = 6 > 4: outside the box
    ]
    anchors = torch.tensor(level0 + far_zeros(100) + far_zeros(200))
    # candidates [1/6, 1/6, 0 x 6]: mean 0.041667, std sqrt((2 * 0.125^2 + 6 * 0.041667^2) / 7) = 0.077152,
    # threshold 0.118819 < 1/6: both pass the IoU test; the centre test drops the second.
    matched = ATSSAssigner(topk=3)(anchors, [2, 3, 3], gt)
    assert matched.tolist() == [0, -1] + [-1] * 6


def test_conflicts_go_to_the_highest_iou():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 1 with box 0, 0.666667 with box 1; centre (5, 5) inside both
        [2.0, 0.0, 12.0, 10.0],  # IoU 0.666667 with box 0, 1 with box 1; centre (7, 5) inside both
    ] + far_zeros(100, 6))
    # per box, candidates [1, 0.666667, 0 x 6]: mean 0.208333, std 0.395912, threshold 0.604245: both anchors are
    # positive for both boxes; each goes to the box it overlaps most.
    matched = ATSSAssigner(topk=8)(anchors, [8], gts)
    assert matched.tolist() == [0, 1] + [-1] * 6


def test_no_boxes_means_all_background():
    anchors = torch.tensor(far_zeros(0, 4))
    assert ATSSAssigner()(anchors, [4], torch.zeros(0, 4)).tolist() == [-1] * 4
    with pytest.raises(ValueError, match="sums to"):
        ATSSAssigner()(anchors, [3], torch.zeros(0, 4))
