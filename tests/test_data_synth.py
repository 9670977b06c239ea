"""Synthetic driving scenes: determinism, KITTI layout, label / field consistency."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aidkd.data import (
    KITTI_CLASSES,
    DetectionDataset,
    check_dataset,
    generate_synth,
    load_kitti_records,
    parse_kitti_label_file,
    render_scene,
    split_stems,
)
from aidkd.data.synth import occlusion_level


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "s"
    t = time.perf_counter()
    generate_synth(root, 40, seed=3, hard_fraction=0.3, mislabel_fraction=0.1)
    assert time.perf_counter() - t < 20  # ~10 ms an image; generous for a loaded CI box
    return root


def test_layout_and_split(synth):
    imgs = sorted((synth / "training" / "image_2").glob("*.png"))
    lbls = sorted((synth / "training" / "label_2").glob("*.txt"))
    assert [p.stem for p in imgs] == [p.stem for p in lbls] == [f"{i:06d}" for i in range(40)]
    train = (synth / "ImageSets" / "train.txt").read_text().split()
    val = (synth / "ImageSets" / "val.txt").read_text().split()
    assert (len(train), len(val)) == (32, 8) and (train, val) == split_stems([p.stem for p in imgs], 0.2, seed=3)
    im = Image.open(imgs[0])
    assert im.size == (320, 96) and im.mode == "RGB"
    assert check_dataset(synth) == []
    assert [r.stem for r in load_kitti_records(synth, "val")] == val


def test_deterministic_bytes(synth, tmp_path):
    again = generate_synth(tmp_path / "again", 40, seed=3, hard_fraction=0.3, mislabel_fraction=0.1)
    assert digest(again) == digest(synth)
    other = generate_synth(tmp_path / "other", 3, seed=4)
    assert (other / "training" / "image_2" / "000000.png").read_bytes() != \
        (synth / "training" / "image_2" / "000000.png").read_bytes()
    # image i depends only on (seed, i): a shorter run is a prefix; a rerun removes stale frames
    prefix = generate_synth(tmp_path / "again", 5, seed=3, hard_fraction=0.3, mislabel_fraction=0.1)
    assert len(list((prefix / "training" / "image_2").glob("*.png"))) == 5
    for i in range(5):
        name = f"training/label_2/{i:06d}.txt"
        assert (prefix / name).read_bytes() == (synth / name).read_bytes()


def test_labels_consistent(synth):
    meta = json.loads((synth / "synth_meta.json").read_text())["frames"]
    counts: dict[str, int] = {}
    n_occ = n_trunc = n_hard = n_mis = 0
    for lbl in sorted((synth / "training" / "label_2").glob("*.txt")):
        objs = parse_kitti_label_file(lbl, image_size=(320, 96), box_tolerance=0.0)  # strictly inside
        metas = meta[lbl.stem]["objects"]
        assert len(objs) == len(metas)
        for o, m in zip(objs, metas):
            assert o.cls in KITTI_CLASSES
            counts[o.cls] = counts.get(o.cls, 0) + 1
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 96
            if o.cls == "DontCare":
                assert (o.truncated, o.occluded, o.alpha) == (-1.0, -1, -10.0)
                continue
            assert 0.0 <= o.truncated <= 1.0 and o.occluded in (0, 1, 2)
            h, w, length, _x, _y, z, _ry = o.extra
            assert h > 0 and w > 0 and length > 0 and z > 0
            assert o.occluded == occlusion_level(m["covered"])
            n_occ += o.occluded > 0
            n_hard += bool(m["hard"])
            n_mis += m["mislabel"] is not None
            if m["mislabel"] == "class":
                assert o.cls != m["true_cls"] and o.box == tuple(m["true_box"])
            elif m["mislabel"] == "box":
                assert o.cls == m["true_cls"] and o.box != tuple(m["true_box"])
            else:
                assert o.cls == m["true_cls"] and o.box == tuple(m["true_box"])
            if o.truncated > 0 and m["mislabel"] != "box":  # truncation only at the image border
                n_trunc += 1
                assert x1 <= 0.0 or y1 <= 0.0 or x2 >= 320 or y2 >= 96
            if o.occluded > 0:  # something drawn later overlaps it
                later = [mm["true_box"] for mm in metas if mm["order"] > m["order"]]
                later += [c["box"] for c in meta[lbl.stem]["occluders"] if c["order"] > m["order"]]
                bx = m["true_box"]
                assert any(b[0] < bx[2] and bx[0] < b[2] and b[1] < bx[3] and bx[1] < b[3] for b in later)
    for cls in ("Car", "Pedestrian", "Cyclist", "DontCare"):
        assert counts.get(cls, 0) > 5, counts
    assert counts.get("Van", 0) + counts.get("Truck", 0) > 0
    assert n_occ > 0 and n_trunc > 0 and n_hard > 0 and n_mis > 0


def test_wide_range_of_scales_and_colours(synth):
    heights, colours = [], []
    for lbl in sorted((synth / "training" / "label_2").glob("*.txt")):
        im = np.asarray(Image.open(synth / "training" / "image_2" / f"{lbl.stem}.png"), dtype=np.float32)
        for o in parse_kitti_label_file(lbl):
            if o.cls == "Car":
                x1, y1, x2, y2 = (round(v) for v in o.box)
                heights.append(y2 - y1)
                colours.append(im[y1:y2, x1:x2].reshape(-1, 3).mean(0))
    heights = np.array(heights)
    assert heights.min() <= 10 and heights.max() >= 35
    assert np.std(np.array(colours), axis=0).mean() > 15  # cars are not one colour


def test_render_scene_seeded_and_dataset_loads(synth):
    a = render_scene(np.random.default_rng(5))
    b = render_scene(np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (96, 320, 3) and a[0].dtype == np.uint8
    big = render_scene(1, width=160, height=64, max_objects=4)
    assert big[0].shape == (64, 160, 3)
    ds = DetectionDataset(load_kitti_records(synth, "train"), min_size=96, max_size=320, train=True)
    img, t = ds[0]
    assert img.shape == (3, 96, 320) and t["boxes"].shape[1] == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_synth(tmp_path / "x", 1, hard_fraction=1.5)
    with pytest.raises(ValueError):
        generate_synth(tmp_path / "x", 1, width=8)
