"""DetectionEvaluator: accumulation over batches, flat metric names, empty images, KITTI on/off."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aidkd.data.structures import ImageRecord, ObjectAnnotation
from aidkd.eval.evaluator import DetectionEvaluator, format_metrics_table

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def scene():
    """4 images: 41 cars + 2 pedestrians + a Van + a DontCare over images 0-1, an empty image 2, image 3 one car."""
    recs = []
    cars = [ObjectAnnotation("Car", (5.0 + 30 * (i % 20), 100.0 + 60 * (i // 20), 30.0 + 30 * (i % 20),
                                     150.0 + 60 * (i // 20))) for i in range(40)]
    recs.append(ImageRecord(Path("0.png"), 0, cars[:20] + [
        ObjectAnnotation("Pedestrian", (700, 50, 720, 110)),
        ObjectAnnotation("Van", (620, 200, 700, 260)),
        ObjectAnnotation("DontCare", (0, 0, 100, 40), truncated=-1, occluded=-1)], width=800, height=400))
    recs.append(ImageRecord(Path("1.png"), 1, cars[20:] + [ObjectAnnotation("Pedestrian", (700, 50, 725, 120))],
                            width=800, height=400))
    recs.append(ImageRecord(Path("2.png"), 2, [], width=800, height=400))
    recs.append(ImageRecord(Path("3.png"), 3, [ObjectAnnotation("Car", (100, 100, 200, 160))], width=800,
                            height=400))
    return recs


def perfect(rec, extra=()):
    pos = [(o.box, CLASSES.index(o.cls) + 1) for o in rec.objects if o.cls in CLASSES] + list(extra)
    n = len(pos)
    return {"boxes": torch.tensor([b for b, _ in pos], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
            "labels": torch.tensor([lab for _, lab in pos], dtype=torch.int64)}


def test_perfect_predictions_all_metrics(tmp_path):
    recs = scene()
    ev = DetectionEvaluator(recs, CLASSES, kitti=True)
    # two batches, image ids as tensors; on the Van and in the DontCare: extra Car detections, never penalised
    ev.update(torch.tensor([0, 1]), [perfect(recs[0], [((620, 200, 700, 260), 1), ((10, 5, 60, 35), 1)]),
                                     perfect(recs[1])])
    ev.update([2, 3], [perfect(recs[2]), perfect(recs[3])])
    m = ev.compute()
    expected_keys = (
        ["coco/AP", "coco/AP50", "coco/AP75", "coco/APs", "coco/APm", "coco/APl"]
        + [f"coco/AP/{c}" for c in CLASSES] + ["voc/mAP50"] + [f"voc/AP50/{c}" for c in CLASSES]
        + [f"kitti/{c}/{d}" for c in CLASSES for d in ("easy", "moderate", "hard")] + ["kitti/moderate_mAP"])
    assert list(m) == expected_keys
    assert m["coco/AP"] == pytest.approx(100.0) and m["coco/AP50"] == pytest.approx(100.0)
    assert m["voc/mAP50"] == pytest.approx(100.0) and math.isnan(m["voc/AP50/Cyclist"])
    # KITTI (devkit R40, see test_eval_kitti_ap): 41 cars all found -> 100; the 2 pedestrians, both found, give
    # 2 thresholds (test_pedestrian_r40_with_two_gts_by_hand) -> precision[0] = precision[1] = 1 -> 1/40 = 2.5 %
    assert m["kitti/Car/easy"] == pytest.approx(100.0)
    assert m["kitti/Pedestrian/moderate"] == pytest.approx(2.5)
    assert math.isnan(m["kitti/Cyclist/hard"])
    assert m["kitti/moderate_mAP"] == pytest.approx((100.0 + 2.5) / 2)
    assert ev.kitti_result is not None and ev.kitti_result.num_gt["Car"]["moderate"] == 41
    table = format_metrics_table(m)
    assert "| coco/AP | 100.00 |" in table and "| voc/AP50/Cyclist | n/a |" in table


def test_pedestrian_r40_with_two_gts_by_hand():
    # getThresholds with n_gt=2, v=[0.9, 0.8]: i=0: l=0.5, r=1.0, cur=0 -> keep (cur=1/40);
    # i=1 (last) -> keep. 2 thresholds, precision 1 -> AP_R40 = precision[1] / 40 = 2.5 %
    from aidkd.eval.kitti_ap import get_thresholds

    assert get_thresholds([0.9, 0.8], 2) == [0.9, 0.8]


def test_unseen_images_and_restrict_to_seen():
    recs = scene()
    ev = DetectionEvaluator(recs, CLASSES, kitti=False)
    ev.update([3], [perfect(recs[3])])
    assert len(ev) == 1
    all_imgs = ev.compute()
    assert "kitti/moderate_mAP" not in all_imgs
    assert all_imgs["voc/AP50/Car"] == pytest.approx(100 / 41)  # 1 of 41 cars found at precision 1
    seen = ev.compute(restrict_to_seen=True)
    assert seen["voc/AP50/Car"] == pytest.approx(100.0) and math.isnan(seen["voc/AP50/Pedestrian"])
    assert seen["voc/mAP50"] == pytest.approx(100.0) and seen["coco/AP"] == pytest.approx(100.0)
    # a second update of an image replaces its predictions
    ev.update([3], [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}])
    assert ev.compute(restrict_to_seen=True)["voc/AP50/Car"] == 0.0
    ev.reset()
    assert len(ev) == 0 and ev.compute()["coco/AP"] == 0.0


def test_only_empty_images():
    recs = [ImageRecord(Path("a.png"), 10, []), ImageRecord(Path("b.png"), 11, [])]
    ev = DetectionEvaluator(recs, CLASSES, kitti=True)
    ev.update([10], [{"boxes": [[0, 0, 50, 50]], "scores": [0.9], "labels": [1]}])
    m = ev.compute()
    assert all(math.isnan(v) for v in m.values())


def test_validation():
    recs = scene()
    with pytest.raises(ValueError, match="KITTI"):
        DetectionEvaluator(recs, ["car", "person"], kitti=True)
    with pytest.raises(ValueError, match="duplicate"):
        DetectionEvaluator(recs + [recs[0]], CLASSES)
    ev = DetectionEvaluator(recs, CLASSES)
    with pytest.raises(KeyError):
        ev.update([42], [perfect(recs[0])])
    with pytest.raises(ValueError, match="labels"):
        ev.update([0], [{"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [0]}])
    with pytest.raises(ValueError):
        ev.update([0, 1], [perfect(recs[0])])


def test_scored_detections_keeps_scored_classes_in_original_pixels():
    """The boxes validation and the report score: score >= threshold, never label 0 (background), divided by the
    dataset's per-axis factors."""
    import torch

    from aidkd.eval.evaluator import scored_detections

    pred = {"boxes": torch.tensor([[10.0, 20, 30, 40], [0, 0, 8, 8], [2, 4, 6, 8]]),
            "scores": torch.tensor([0.9, 0.01, 0.5]), "labels": torch.tensor([1, 2, 0])}
    keep, det = scored_detections(pred, {"scale": 3.0, "scale_xy": (2.0, 4.0)}, 0.05)
    assert keep.tolist() == [True, False, False]
    assert det["boxes"].tolist() == [[5.0, 5.0, 15.0, 10.0]]
    assert det["scores"].tolist() == [pytest.approx(0.9)] and det["labels"].tolist() == [1]
    _, det = scored_detections(pred, {"scale": 2.0}, 0.0)  # no per-axis factors: the one scale
    assert det["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0], [0.0, 0.0, 4.0, 4.0]]
