"""DetectionDataset: sample format, exact resize/flip arithmetic, ignore regions, validation, collate."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aidkd.data import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    ObjectAnnotation,
    collate_fn,
    load_kitti_records,
    resize_scale,
    resized_size,
    validate_records,
)


def png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def rec(tmp_path, objs, w=200, h=100, image_id=7, name="a.png") -> ImageRecord:
    return ImageRecord(image_path=png(tmp_path / name, w, h), image_id=image_id, objects=objs,
                       source=str(tmp_path / "a.txt"), stem="a")


OBJS = [
    ObjectAnnotation("Car", (10.0, 20.0, 50.0, 60.0)),
    ObjectAnnotation("Van", (0.0, 0.0, 30.0, 30.0)),
    ObjectAnnotation("Cyclist", (100.0, 10.0, 120.0, 90.0)),
    ObjectAnnotation("DontCare", (150.0, 40.0, 160.0, 50.0)),
    ObjectAnnotation("Pedestrian", (180.0, 30.0, 200.0, 100.0)),
    ObjectAnnotation("Tram", (60.0, 0.0, 90.0, 40.0)),
]


def test_resize_rule_matches_torchvision():
    assert resize_scale(100, 200, 50, 1000) == 0.5
    assert resized_size(100, 200, 50, 1000) == (50, 100, 0.5)
    assert resized_size(100, 200, 150, 240) == (120, 240, 1.2)  # long side limits
    assert resized_size(375, 1242, 384, 1280) == (384, 1272, 1.024)
    assert resized_size(375, 1242, 600, 1000)[:2] == (302, 1000)
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    for (h, w), (mn, mx) in [((375, 1242), (384, 1280)), ((375, 1242), (600, 1000)), ((427, 640), (320, 512)),
                             ((370, 1224), (96, 320)), ((480, 640), (800, 1333))]:
        nh, nw, _ = resized_size(h, w, mn, mx)
        tr = GeneralizedRCNNTransform(mn, mx, [0.0] * 3, [1.0] * 3).eval()
        images, _ = tr([torch.zeros(3, nh, nw)])
        assert images.image_sizes == [(nh, nw)]  # the model's own resize is the identity


def test_sample_format_and_exact_numbers(tmp_path):
    ds = DetectionDataset([rec(tmp_path, OBJS)], min_size=50, max_size=1000, train=False)
    assert ds.classes == ["Car", "Pedestrian", "Cyclist"] and ds.num_classes == 4
    img, t = ds[0]
    assert img.shape == (3, 50, 100) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["boxes"].tolist() == [[5.0, 10.0, 25.0, 30.0], [50.0, 5.0, 60.0, 45.0], [90.0, 15.0, 100.0, 50.0]]
    assert t["labels"].tolist() == [1, 3, 2]
    # ignore classes (Van, DontCare, Tram) are ignore regions, never positives
    assert t["ignore_boxes"].tolist() == [[0.0, 0.0, 15.0, 15.0], [75.0, 20.0, 80.0, 25.0], [30.0, 0.0, 45.0, 20.0]]
    assert t["image_id"] == 7 and t["orig_size"] == (100, 200) and t["scale"] == 0.5 and t["flipped"] is False
    assert t["scale_xy"] == (0.5, 0.5)
    assert ds.records[0].width == 200 and ds.records[0].height == 100  # filled by validation


def test_flip_exact(tmp_path):
    ds = DetectionDataset([rec(tmp_path, OBJS)], min_size=50, max_size=1000, train=True, hflip_prob=1.0)
    img, t = ds[0]
    ref, _ = DetectionDataset([rec(tmp_path, OBJS)], min_size=50, max_size=1000, train=False)[0]
    assert t["flipped"] is True
    assert torch.equal(img, ref.flip(-1))
    assert t["boxes"].tolist() == [[75.0, 10.0, 95.0, 30.0], [40.0, 5.0, 50.0, 45.0], [0.0, 15.0, 10.0, 50.0]]
    assert t["ignore_boxes"][0].tolist() == [85.0, 0.0, 100.0, 15.0]
    # never flipped in eval, whatever hflip_prob
    ev = DetectionDataset([rec(tmp_path, OBJS)], min_size=50, max_size=1000, train=False, hflip_prob=1.0)
    assert ev[0][1]["flipped"] is False
    torch.manual_seed(0)
    half = DetectionDataset([rec(tmp_path, OBJS)], min_size=50, max_size=1000, train=True, hflip_prob=0.5)
    flips = [half[0][1]["flipped"] for _ in range(40)]
    assert 5 < sum(flips) < 35


def test_unlisted_class_is_ignore_and_crowd_is_ignore(tmp_path):
    objs = [ObjectAnnotation("car", (0, 0, 10, 10)), ObjectAnnotation("bus", (10, 10, 20, 20)),
            ObjectAnnotation("car", (20, 20, 40, 40), iscrowd=True)]
    ds = DetectionDataset([rec(tmp_path, objs, w=100, h=100)], classes=["car"], ignore_classes=[], min_size=100,
                          max_size=100)
    _, t = ds[0]
    assert t["labels"].tolist() == [1] and t["boxes"].tolist() == [[0, 0, 10, 10]]
    assert t["ignore_boxes"].tolist() == [[10, 10, 20, 20], [20, 20, 40, 40]]


def test_empty_targets_have_right_shapes(tmp_path):
    _, t = DetectionDataset([rec(tmp_path, [])], min_size=50, max_size=100)[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["ignore_boxes"].shape == (0, 4)


def test_collate(tmp_path):
    r1 = rec(tmp_path, OBJS, image_id=1, name="a.png")
    r2 = rec(tmp_path, [], w=100, h=100, image_id=2, name="b.png")
    ds = DetectionDataset([r1, r2], min_size=50, max_size=100)
    images, targets = collate_fn([ds[0], ds[1]])
    assert [tuple(i.shape) for i in images] == [(3, 50, 100), (3, 50, 50)]
    assert [t["image_id"] for t in targets] == [1, 2]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(targets) == 2


def test_validation_summary_and_skip(tmp_path, caplog):
    good = rec(tmp_path, OBJS, image_id=1, name="good.png")
    missing = ImageRecord(image_path=tmp_path / "missing.png", image_id=2, objects=[], source="m.txt")
    outside = rec(tmp_path, [ObjectAnnotation("Car", (150.0, 10.0, 260.0, 20.0), line=4)], image_id=3,
                  name="o.png")
    inverted = rec(tmp_path, [ObjectAnnotation("Car", (50.0, 10.0, 40.0, 20.0), line=2)], image_id=4, name="i.png")
    empty = ImageRecord(image_path=tmp_path / "empty.png", image_id=5, objects=[], source="e.txt")
    empty.image_path.write_bytes(b"")
    records = [good, missing, outside, inverted, empty]
    with pytest.raises(DatasetError) as e:
        DetectionDataset(records, min_size=50, max_size=100)
    msg = str(e.value)
    assert "4 problems in dataset of 5 images" in msg
    assert f"{tmp_path / 'missing.png'}: image file not found" in msg
    assert f"{tmp_path / 'a.txt'}:4: box (150, 10, 260, 20) is outside the 200x100 image o.png" in msg
    assert f"{tmp_path / 'a.txt'}:2: inverted or zero-area box" in msg
    assert f"{tmp_path / 'empty.png'}: image file is empty (0 bytes)" in msg
    assert len(e.value.problems) == 4
    assert len(validate_records(records)) == 4
    with caplog.at_level(logging.WARNING, logger="aidkd.data"):
        ds = DetectionDataset(records, min_size=50, max_size=100, skip_invalid=True)
    assert len(ds) == 1 and ds.records[0] is good and len(ds.skipped) == 4
    assert "skipped 4 of 5 images" in caplog.text


def test_summary_lists_first_20(tmp_path):
    records = [ImageRecord(image_path=tmp_path / f"{i:03d}.png", image_id=i) for i in range(25)]
    with pytest.raises(DatasetError) as e:
        DetectionDataset(records)
    msg = str(e.value)
    assert "25 problems" in msg and "019.png" in msg and "020.png" not in msg and "and 5 more" in msg


def test_duplicate_image_ids(tmp_path):
    a = rec(tmp_path, [], image_id=1, name="a.png")
    b = rec(tmp_path, [], image_id=1, name="b.png")
    with pytest.raises(DatasetError, match="duplicate image_id 1"):
        DetectionDataset([a, b])


def test_truncated_image_fails_at_getitem_with_file(tmp_path):
    r = rec(tmp_path, [], name="t.png")
    data = r.image_path.read_bytes()
    r.image_path.write_bytes(data[:-20])
    ds = DetectionDataset([r], min_size=50, max_size=100)  # the header is fine
    with pytest.raises(DatasetError, match="t.png"):
        ds[0]


def test_kitti_end_to_end(tmp_path):
    root = tmp_path / "k"
    png(root / "training" / "image_2" / "000000.png", 120, 40)
    (root / "training" / "label_2").mkdir(parents=True)
    (root / "training" / "label_2" / "000000.txt").write_text(
        "Car 0.00 0 0 10 5 40 35 1 1 1 1 1 1 1\nVan 0.00 0 0 60 5 90 35 1 1 1 1 1 1 1\n"
        "Cyclist 0.00 0 0 100 5 121 41 1 1 1 1 1 1 1\n")  # within 1 px of the 120x40 image
    ds = DetectionDataset(load_kitti_records(root, "all"), min_size=20, max_size=100)
    img, t = ds[0]
    assert img.shape == (3, 20, 60) and t["labels"].tolist() == [1, 3]
    assert t["boxes"][1].tolist() == [50.0, 2.5, 60.0, 20.0]  # clipped to the image after scaling
    assert t["ignore_boxes"].tolist() == [[30.0, 2.5, 45.0, 17.5]]
    (root / "training" / "label_2" / "000000.txt").write_text("Car 0.00 0 0 10 5 125 35 1 1 1 1 1 1 1\n")
    with pytest.raises(DatasetError, match=r"000000\.txt:1: box .* is outside the 120x40 image"):
        DetectionDataset(load_kitti_records(root, "all"), min_size=20, max_size=100)


def test_bad_arguments(tmp_path):
    r = rec(tmp_path, [])
    with pytest.raises(ValueError):
        DetectionDataset([r], classes=["Car"], ignore_classes=["Car"])
    with pytest.raises(ValueError):
        DetectionDataset([r], classes=[])


def test_training_resize_is_the_models_resize():
    """The dataset resizes as torchvision's GeneralizedRCNNTransform (what eval, predict and ONNX run)."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    from aidkd.data import resize_tensor

    img = torch.rand(3, 100, 300, generator=torch.Generator().manual_seed(0))
    ours, scale, (sx, sy) = resize_tensor(img, 48, 144)
    theirs, _ = _resize_image_and_masks(img, 48, 144)
    assert ours.shape == theirs.shape == (3, 48, 144) and scale == pytest.approx(0.48) and (sx, sy) == (0.48, 0.48)
    assert torch.allclose(ours, theirs, atol=1e-6)
    same, s1, _ = resize_tensor(ours, 48, 144)
    assert s1 == 1.0 and torch.equal(same, ours)


def test_eval_dataset_gives_original_images(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(path)
    rec = ImageRecord(image_path=path, image_id=1, objects=[ObjectAnnotation("Car", (20.0, 10.0, 60.0, 50.0))])
    img, t = DetectionDataset([rec], min_size=50, max_size=1000, resize=False)[0]
    assert img.shape == (3, 100, 200) and t["scale"] == 1.0 and t["scale_xy"] == (1.0, 1.0)
    assert t["boxes"].tolist() == [[20.0, 10.0, 60.0, 50.0]]
    img2, t2 = DetectionDataset([rec], min_size=50, max_size=1000)[0]
    assert img2.shape == (3, 50, 100) and t2["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]


def test_uint8_samples_keep_the_original_image_and_pixels(tmp_path):
    """``uint8=True``: the decoded image as it is, boxes in its pixels; resize_sample then makes the CPU-resized
    sample (the flip aside, which the CPU path applies after the resize)."""
    from aidkd.data import resize_sample

    r = rec(tmp_path, OBJS)
    img, t = DetectionDataset([r], min_size=50, max_size=1000, train=False, resize=False, uint8=True)[0]
    assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(np.array(Image.open(r.image_path)))
                                                    .permute(2, 0, 1))
    assert t["boxes"].tolist() == [[10.0, 20.0, 50.0, 60.0], [100.0, 10.0, 120.0, 90.0], [180.0, 30.0, 200.0, 100.0]]
    assert t["ignore_boxes"][0].tolist() == [0.0, 0.0, 30.0, 30.0] and (t["scale"], t["scale_xy"]) == (1.0, (1.0, 1.0))
    flip, ft = DetectionDataset([r], min_size=50, max_size=1000, train=True, hflip_prob=1.0, resize=False,
                                uint8=True)[0]
    assert torch.equal(flip, img.flip(-1)) and ft["boxes"][0].tolist() == [150.0, 20.0, 190.0, 60.0]
    ref_img, ref = DetectionDataset([r], min_size=50, max_size=1000, train=False)[0]
    out_img, out = resize_sample(img, t, 50, 1000)
    assert torch.equal(out_img, ref_img) and torch.equal(out["boxes"], ref["boxes"])
    assert torch.equal(out["ignore_boxes"], ref["ignore_boxes"])
    assert (out["scale"], out["scale_xy"], out["orig_size"]) == (ref["scale"], ref["scale_xy"], ref["orig_size"])
    with pytest.raises(ValueError, match="resize=False with uint8=True"):
        DetectionDataset([r], uint8=True)
