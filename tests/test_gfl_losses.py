"""GFL losses and box codings against values worked out by hand."""
import math

import pytest
import torch

from aidkd.models.gfl_losses import (
    DistributionFocalLoss,
    GIoULoss,
    QualityFocalLoss,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)

LN2 = math.log(2.0)
LN3 = math.log(3.0)


def test_qfl_single_element_positive():
    # logit 0 -> sigmoid 0.5; target quality 1.0:
    # BCE = -log(0.5) = ln 2 = 0.693147; modulator |1 - 0.5|^2 = 0.25 -> 0.173287
    loss = quality_focal_loss(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.25 * LN2, abs=1e-6)
    # target equal to the prediction (0.5): modulator 0 -> no loss at all
    loss = quality_focal_loss(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_qfl_two_classes_positive_and_negative():
    logits = torch.tensor([[0.0, LN3]] * 2)  # sigmoids 0.5 and 0.75
    labels = torch.tensor([1, -1])  # location 0 positive for class 1, location 1 negative
    quality = torch.tensor([0.5, 0.9])  # the negative's quality is ignored
    loss = quality_focal_loss(logits, labels, quality, beta=2.0)
    # class 0 (target 0):  BCE = ln 2 = 0.693147, modulator 0.5^2 = 0.25              -> 0.173287
    # class 1, positive (target 0.5): BCE = -(0.5 ln 0.75 + 0.5 ln 0.25) = 0.836988,
    #                                 modulator |0.5 - 0.75|^2 = 0.0625               -> 0.052312
    # class 1, negative (target 0):   BCE = -ln 0.25 = 1.386294, modulator 0.75^2 = 0.5625 -> 0.779791
    bce_pos = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    expected = [0.25 * LN2 + 0.0625 * bce_pos, 0.25 * LN2 + 0.5625 * math.log(4.0)]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.225599, 0.953078], abs=1e-6)
    assert QualityFocalLoss(beta=2.0)(logits, labels, quality).tolist() == pytest.approx(expected, abs=1e-6)


def test_qfl_gradient_pushes_score_towards_quality():
    logits = torch.tensor([[0.0]], requires_grad=True)
    quality_focal_loss(logits, torch.tensor([0]), torch.tensor([0.9])).sum().backward()
    assert logits.grad.item() < 0  # sigmoid 0.5 < 0.9: gradient descent raises the logit


def test_dfl_between_bins():
    # reg_max 4: probabilities p = [0.1, 0.2, 0.4, 0.2, 0.1] (logits = log p, softmax gives p back).
    # target 2.3: 0.7 * -log p2 + 0.3 * -log p3 = 0.7 * 0.916291 + 0.3 * 1.609438 = 1.124235
    p = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    loss = distribution_focal_loss(p.log(), torch.tensor([2.3]))
    assert loss.item() == pytest.approx(0.7 * -math.log(0.4) + 0.3 * -math.log(0.2), abs=1e-5)
    assert loss.item() == pytest.approx(1.124235, abs=1e-5)
    # an integer target puts all the weight on its own bin: -log p2 = 0.916291
    assert DistributionFocalLoss()(p.log(), torch.tensor([2.0])).item() == pytest.approx(-math.log(0.4), abs=1e-6)


def test_dfl_gradient_targets_the_two_bin_distribution():
    # DFL = cross-entropy against the soft label 0.7 * e2 + 0.3 * e3, so d/dlogits = softmax - soft label:
    # [0.1, 0.2, 0.4 - 0.7, 0.2 - 0.3, 0.1] = [0.1, 0.2, -0.3, -0.1, 0.1]; it vanishes at p = (0, 0, 0.7, 0.3, 0),
    # whose integral is the target 2.3.
    logits = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]]).log().requires_grad_()
    distribution_focal_loss(logits, torch.tensor([2.3])).sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([0.1, 0.2, -0.3, -0.1, 0.1], abs=1e-5)


def test_integral_is_the_expected_distance():
    # the same p for all four sides: 0*0.1 + 1*0.2 + 2*0.4 + 3*0.2 + 4*0.1 = 2.0; a one-hot on bin 3 gives 3.0
    p = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1]).log()
    onehot = torch.full((5,), -1e4)
    onehot[3] = 0.0
    logits = torch.cat([p, p, onehot, p])[None]  # [1, 4 * 5]
    assert integral(logits, reg_max=4)[0].tolist() == pytest.approx([2.0, 2.0, 3.0, 2.0], abs=1e-5)


def test_giou_hand_boxes():
    giou = GIoULoss()
    # overlapping: A = [0,0,2,2], B = [1,1,3,3]; intersection 1, union 7, enclosing 3x3 = 9
    # GIoU = 1/7 - (9 - 7)/9 = 0.142857 - 0.222222 = -0.079365 -> loss 1.079365
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert giou(a, b).item() == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-5)
    # disjoint: [0,0,1,1] and [2,0,3,1]; IoU 0, union 2, enclosing 3 -> GIoU = -1/3 -> loss 1.333333
    c, d = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert giou(c, d).item() == pytest.approx(4 / 3, abs=1e-5)
    assert giou(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_box_distance_round_trip_and_clamp():
    point = torch.tensor([[5.0, 5.0]])
    box = torch.tensor([[2.0, 3.0, 10.0, 6.0]])
    # left 5-2 = 3, top 5-3 = 2, right 10-5 = 5, bottom 6-5 = 1
    assert bbox2distance(point, box).tolist() == [[3.0, 2.0, 5.0, 1.0]]
    assert distance2bbox(point, bbox2distance(point, box)).tolist() == box.tolist()
    # with reg_max 4 the right side is clamped to 4 - 0.1 (the reference implementations' eps)
    assert bbox2distance(point, box, max_distance=4).tolist()[0] == pytest.approx([3.0, 2.0, 3.9, 1.0])
    assert bbox2distance(point, box, max_distance=4, eps=0.01).tolist()[0] == pytest.approx([3.0, 2.0, 3.99, 1.0])
