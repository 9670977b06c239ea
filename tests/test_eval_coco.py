"""COCO mAP through faster-coco-eval: identical to pycocotools' COCOeval, ignore regions, edge cases."""
from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest

from aidkd.data.structures import ImageRecord, ObjectAnnotation
from aidkd.eval.coco_map import coco_map, predictions_to_coco, records_to_coco, split_objects

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def rec(i, objs, w=400, h=300):
    return ImageRecord(image_path=Path(f"img{i}.png"), image_id=i, objects=objs, width=w, height=h)


def o(cls, x1, y1, x2, y2, **kw):
    return ObjectAnnotation(cls=cls, box=(x1, y1, x2, y2), **kw)


def hand_made_records():
    return [
        rec(1, [o("Car", 10, 10, 110, 60), o("Car", 150, 20, 170, 35), o("Pedestrian", 200, 50, 215, 95),
                o("DontCare", 300, 0, 400, 40), o("Van", 10, 100, 120, 200)]),
        rec(2, [o("Car", 0, 0, 300, 250), o("Cyclist", 320, 100, 350, 160, truncated=0.3, occluded=1)]),
        rec(3, []),  # no objects
        rec(4, [o("Pedestrian", 50, 50, 60, 75), o("Pedestrian", 70, 50, 82, 80),
                o("person_crowd", 100, 100, 200, 200), o("Cyclist", 5, 5, 45, 45, iscrowd=True)]),
        rec(5, [o("Car", 30, 30, 90, 70)]),  # gets no detections
    ]


def random_detections(records, seed, per_image=12):
    rng = np.random.default_rng(seed)
    dets = []
    for r in records[:4]:
        for _ in range(per_image):
            if r.objects and rng.random() < 0.6:  # jittered copy of some object (any class)
                x1, y1, x2, y2 = r.objects[rng.integers(len(r.objects))].box
                w, h = x2 - x1, y2 - y1
                x1, y1 = x1 + rng.normal(0, 0.1) * w, y1 + rng.normal(0, 0.1) * h
                w, h = w * np.exp(rng.normal(0, 0.15)), h * np.exp(rng.normal(0, 0.15))
            else:
                x1, y1 = rng.uniform(0, 350), rng.uniform(0, 250)
                w, h = rng.uniform(3, 120), rng.uniform(3, 120)
            dets.append({"image_id": r.image_id, "category_id": int(rng.integers(1, 4)),
                         "bbox": [float(x1), float(y1), float(w), float(h)], "score": float(rng.random())})
    return dets


def pycocotools_reference(gt_dict, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_dict)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"]
    per_class = []
    for k in range(prec.shape[2]):
        p = prec[:, :, k, 0, -1]
        per_class.append(float(np.mean(p[p > -1])) * 100 if (p > -1).any() else float("nan"))
    return [float(s) * 100 if s != -1 else float("nan") for s in ev.stats[:6]], per_class


def same(a, b, exact):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    # faster-coco-eval's C++ accumulate differs from pycocotools' numpy in the last bit of some precision
    # entries (measured: <= 2.3e-16 per entry); through the pycocotools backend the numbers are identical.
    return a == b if exact else abs(a - b) <= 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_equals_pycocotools(seed, backend):
    records = hand_made_records()
    dets = random_detections(records, seed)
    gt = records_to_coco(records, CLASSES)
    ours = coco_map(records, dets, CLASSES, backend=backend)
    ref_stats, ref_per_class = pycocotools_reference(gt, dets)
    for name, ref in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ref_stats):
        assert same(ours[name], ref, backend == "pycocotools"), (name, ours[name], ref)
    for cls, ref in zip(CLASSES, ref_per_class):
        assert same(ours["per_class"][cls], ref, backend == "pycocotools"), cls
    assert 0 < ours["AP50"] < 100  # a non-trivial case


def test_gt_dict_from_records():
    gt = records_to_coco(hand_made_records(), CLASSES)
    assert [c["name"] for c in gt["categories"]] == CLASSES and [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert {"info", "licenses", "images", "annotations"} <= set(gt)
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    img1 = by_img[1]
    assert [a["category_id"] for a in img1 if not a["iscrowd"]] == [1, 1, 2]
    # DontCare and Van: class-agnostic ignore regions = a crowd box in each of the 3 categories
    assert sorted(a["category_id"] for a in img1 if a["iscrowd"]) == [1, 1, 2, 2, 3, 3]
    assert img1[0]["bbox"] == [10.0, 10.0, 100.0, 50.0] and img1[0]["area"] == 5000.0
    # image 4: an unlisted class -> 3 crowd boxes; a Cyclist crowd -> one Cyclist crowd box
    crowd4 = sorted(a["category_id"] for a in by_img[4] if a["iscrowd"])
    assert crowd4 == [1, 2, 3, 3]
    assert 3 not in by_img
    pos, ign = split_objects(hand_made_records()[3].objects, CLASSES)
    assert [lab for _, lab in pos] == [2, 2] and [lab for _, lab in ign] == [None, 3]


def test_perfect_detections_and_ignore_regions():
    records = hand_made_records()
    preds = {}
    for r in records:
        pos, _ = split_objects(r.objects, CLASSES)
        preds[r.image_id] = {"boxes": np.array([ob.box for ob, _ in pos]).reshape(-1, 4),
                             "scores": np.linspace(0.9, 0.5, len(pos)), "labels": np.array([lab for _, lab in pos])}
    base = coco_map(records, preds, CLASSES)
    assert base["AP"] == pytest.approx(100.0) and base["AP50"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in base["per_class"].values())
    # extra top-scored detections on the DontCare area, the Van and the crowd regions are not penalised ...
    p1 = preds[1]
    preds[1] = {"boxes": np.vstack([[[310, 5, 390, 35], [10, 100, 120, 200]], p1["boxes"]]),
                "scores": np.concatenate([[0.99, 0.98], p1["scores"]]), "labels": np.concatenate([[1, 2], p1["labels"]])}
    p4 = preds[4]
    preds[4] = {"boxes": np.vstack([[[120, 120, 160, 170], [5, 5, 45, 45]], p4["boxes"]]),
                "scores": np.concatenate([[0.99, 0.99], p4["scores"]]), "labels": np.concatenate([[2, 3], p4["labels"]])}
    assert coco_map(records, preds, CLASSES)["AP"] == pytest.approx(100.0)
    # ... but the same detection on empty road is a FP
    preds[3] = {"boxes": np.array([[310, 5, 390, 35]]), "scores": np.array([0.99]), "labels": np.array([1])}
    assert coco_map(records, preds, CLASSES)["per_class"]["Car"] < 100.0


def test_no_detections_no_gt_and_missing_info():
    records = hand_made_records()
    r = coco_map(records, [], CLASSES)
    assert r["AP"] == 0.0 and r["per_class"]["Car"] == 0.0
    r = coco_map(records, [], CLASSES, backend="pycocotools")
    assert r["AP"] == 0.0
    # only images without objects: nothing to measure -> nan
    r = coco_map([rec(1, []), rec(2, [])], {1: {"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [1]}},
                 CLASSES)
    assert math.isnan(r["AP"]) and math.isnan(r["per_class"]["Car"])
    # a plain COCO dict without "info" / "licenses" / "area" / "iscrowd" (not modified by the call)
    gt = {"images": [{"id": 7, "width": 100, "height": 100}], "categories": [{"id": 3, "name": "car"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 50, 40]}]}
    before = copy.deepcopy(gt)
    for backend in ("faster_coco_eval", "pycocotools"):
        r = coco_map(gt, [{"image_id": 7, "category_id": 3, "bbox": [10, 10, 50, 40], "score": 0.9}],
                     backend=backend)
        assert r["AP"] == pytest.approx(100.0) and r["per_class"] == {"car": pytest.approx(100.0)}
        assert math.isnan(r["APs"]) and r["APm"] == pytest.approx(100.0)  # 50x40 = 2000 px: medium
    assert gt == before
    # labels mapped to category ids
    r = coco_map(gt, {7: {"boxes": [[10, 10, 60, 50]], "scores": [0.9], "labels": [1]}}, label_to_category={1: 3})
    assert r["AP"] == pytest.approx(100.0)


def test_errors():
    records = hand_made_records()
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_map(records, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], CLASSES)
    with pytest.raises(ValueError, match="classes"):
        coco_map(records, [])
    with pytest.raises(ValueError, match="duplicate"):
        records_to_coco([rec(1, []), rec(1, [])], CLASSES)


def test_predictions_to_coco_xyxy_to_xywh():
    out = predictions_to_coco({3: {"boxes": np.array([[1.0, 2.0, 11.0, 22.0]]), "scores": [0.5], "labels": [2]}})
    assert out == [{"image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
