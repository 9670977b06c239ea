"""VOC mAP@0.5 (all-point AP) with ignore regions: hand-worked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aidkd.eval.voc import box_iou, voc_ap, voc_map

E = np.zeros((0, 4))


def run(gt, gl, ign, db, ds, dl, k=1, names=None, iou=0.5):
    """single image helper"""
    return voc_map([np.array(gt, float).reshape(-1, 4)], [np.array(gl, int)],
                   [np.array(ign, float).reshape(-1, 4)] if ign is not None else None,
                   [np.array(db, float).reshape(-1, 4)], [np.array(ds, float)], [np.array(dl, int)],
                   num_classes=k, iou=iou, class_names=names)


G1, G2 = [0, 0, 10, 10], [20, 0, 30, 10]


def test_perfect():
    r = run([G1, G2], [1, 1], None, [G1, G2], [0.9, 0.8], [1, 1])
    assert r["mAP"] == pytest.approx(100.0)


def test_tp_fp_tp_ranking():
    # ranking: TP (0.9), FP (0.8), TP (0.7); 2 gts
    # recall 0.5, 0.5, 1.0 ; precision 1, 1/2, 2/3 ; envelope 1, 2/3, 2/3
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6 = 83.33 %
    r = run([G1, G2], [1, 1], None, [G1, [50, 50, 60, 60], G2], [0.9, 0.8, 0.7], [1, 1, 1])
    assert r["per_class"][1] == pytest.approx(500 / 6)


def test_fp_below_all_tps_costs_nothing():
    r = run([G1, G2], [1, 1], None, [G1, G2, [50, 50, 60, 60]], [0.9, 0.8, 0.1], [1, 1, 1])
    assert r["mAP"] == pytest.approx(100.0)


def test_duplicate_is_fp():
    # ranking: TP on G1 (0.9), duplicate on G1 (0.8) = FP, TP on G2 (0.7) -> same as above: 83.33 %
    r = run([G1, G2], [1, 1], None, [G1, [0, 0, 10, 9], G2], [0.9, 0.8, 0.7], [1, 1, 1])
    assert r["mAP"] == pytest.approx(500 / 6)


def test_iou_threshold_inclusive():
    # det (0,0,10,5) on gt (0,0,10,10): IoU = 50/100 = 0.5 -> a match (VOC: ovmax >= 0.5)
    assert run([G1], [1], None, [[0, 0, 10, 5]], [0.9], [1])["mAP"] == pytest.approx(100.0)
    # (0,0,10,4.9): IoU 0.49 -> FP, gt missed -> AP 0
    assert run([G1], [1], None, [[0, 0, 10, 4.9]], [0.9], [1])["mAP"] == 0.0


def test_detection_on_ignore_region_is_neither_tp_nor_fp():
    # top-scored detection exactly on an ignore box: dropped -> AP stays 100 %
    ign = [[50, 50, 60, 60]]
    r = run([G1, G2], [1, 1], ign, [[50, 50, 60, 60], G1, G2], [0.95, 0.9, 0.8], [1, 1, 1])
    assert r["mAP"] == pytest.approx(100.0)
    # without the ignore box it is a FP ranked first: precision 0, 1/2, 2/3 -> envelope 2/3 at both recall steps
    # AP = 0.5 * 2/3 + 0.5 * 2/3 = 66.67 %
    r = run([G1, G2], [1, 1], None, [[50, 50, 60, 60], G1, G2], [0.95, 0.9, 0.8], [1, 1, 1])
    assert r["mAP"] == pytest.approx(200 / 3)
    # an ignore box only overlapping by IoU 25/175 < 0.5 does not help
    r = run([G1, G2], [1, 1], [[55, 55, 65, 65]], [[50, 50, 60, 60], G1, G2], [0.95, 0.9, 0.8], [1, 1, 1])
    assert r["mAP"] == pytest.approx(200 / 3)


def test_ignore_region_never_a_positive():
    # an ignore box without detection is no FN: one gt found -> 100 %
    assert run([G1], [1], [[50, 50, 60, 60]], [G1], [0.9], [1])["mAP"] == pytest.approx(100.0)


def test_gt_match_takes_precedence_over_ignore():
    # detection matches gt G1 and lies on an ignore box too: a TP
    r = run([G1], [1], [G1], [G1], [0.9], [1])
    assert r["mAP"] == pytest.approx(100.0)


def test_per_class_and_mean_over_classes_with_gt():
    # class 1 (car): perfect -> 100; class 2 (ped): 2 gts, one found, no FP -> recall 0.5 at precision 1 -> 50;
    # class 3 (cyc): no gt -> nan, left out. mAP = (100 + 50) / 2 = 75; a class-3 detection changes nothing.
    r = run([G1, G2, [40, 0, 50, 10]], [1, 2, 2], None, [G1, G2, [70, 0, 80, 10]], [0.9, 0.8, 0.7], [1, 2, 3],
            k=3, names=["car", "ped", "cyc"])
    assert r["per_class"]["car"] == pytest.approx(100.0)
    assert r["per_class"]["ped"] == pytest.approx(50.0)
    assert math.isnan(r["per_class"]["cyc"])
    assert r["mAP"] == pytest.approx(75.0)


def test_multi_image_ranking_and_tensors():
    # image 0: gt G1 found at 0.6; image 1: gt G1 found at 0.9, FP at 0.7; image 2: nothing at all
    # global ranking: TP 0.9, FP 0.7, TP 0.6 -> 83.33 % (as test_tp_fp_tp_ranking)
    t = torch.tensor
    r = voc_map(
        [t([G1]), t([G1]), torch.zeros(0, 4)], [t([1]), t([1]), t([], dtype=torch.int64)],
        [torch.zeros(0, 4)] * 3,
        [t([G1], dtype=torch.float32), t([G1, [50, 50, 60, 60]], dtype=torch.float32), torch.zeros(0, 4)],
        [t([0.6]), t([0.9, 0.7]), t([])], [t([1]), t([1, 1]), t([], dtype=torch.int64)], num_classes=1)
    assert r["mAP"] == pytest.approx(500 / 6)


def test_no_detections_and_no_gt():
    assert run([G1], [1], None, E, [], [])["mAP"] == 0.0
    assert math.isnan(run(E, [], None, E, [], [])["mAP"])


def test_validation():
    with pytest.raises(ValueError, match="label"):
        run([G1], [1], None, [G1], [0.9], [0])
    with pytest.raises(ValueError, match="label"):
        run([G1], [2], None, [G1], [0.9], [1])
    with pytest.raises(ValueError):
        voc_map([E], [[]], None, [E, E], [[], []], [[], []], num_classes=1)


def test_voc_ap_and_iou_helpers():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]), [[50 / 150, 0.0]])
