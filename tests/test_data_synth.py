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


def test_defaults_unchanged_by_the_easier_profile_options(tmp_path):
    """Pinned from the generator before `classes` / `min_t` existed: its defaults still make the same scenes."""
    root = generate_synth(tmp_path / "d", 3, seed=1)
    labels = b"".join((root / "training" / "label_2" / f"{i:06d}.txt").read_bytes() for i in range(3))
    pixels = b"".join(np.asarray(Image.open(root / "training" / "image_2" / f"{i:06d}.png")).tobytes()
                      for i in range(3))
    assert hashlib.sha256(labels).hexdigest() == "ef61ba43d8d20953bd9ee08c8aaf7f2ba806dc7b75acb6a7200e4ca20d059dba"
    assert hashlib.sha256(pixels).hexdigest() == "e0612eec42cb50c2d25ec5db0fc586601c02ffa8856a79c1e5b2bf6d4bdd91b2"


def _positive_heights(root: Path, hard: bool = False) -> list[float]:
    """Box heights of the labelled, untruncated positives (hard ones only when ``hard``) from synth_meta.json."""
    frames = json.loads((root / "synth_meta.json").read_text())["frames"]
    return [o["true_box"][3] - o["true_box"][1] for f in frames.values() for o in f["objects"]
            if o["true_cls"] in ("Car", "Pedestrian", "Cyclist") and o["truncated_exact"] == 0
            and bool(o["hard"]) == hard and o["covered"] < 0.9]


def test_easier_profile_options(tmp_path):
    easy = generate_synth(tmp_path / "easy", 40, seed=2, classes=["Car"], min_t=0.3, max_objects=6, clutter=3,
                          mislabel_fraction=0.3)
    default = generate_synth(tmp_path / "default", 40, seed=2, mislabel_fraction=0.3)
    names = {o.cls for p in (easy / "training" / "label_2").glob("*.txt") for o in parse_kitti_label_file(p)}
    assert names <= {"Car", "DontCare"} and "Car" in names
    meta = json.loads((easy / "synth_meta.json").read_text())
    assert (meta["classes"], meta["min_t"], meta["max_objects"], meta["clutter"]) == (["Car"], 0.3, 6, 3)
    objs = [o for f in meta["frames"].values() for o in f["objects"]]
    assert {o["true_cls"] for o in objs} <= {"Car", "DontCare"}
    # one class: a mislabel can only be a bad box, never a swap to a class that is not generated
    assert {o["mislabel"] for o in objs} == {None, "box"}
    assert max(len(f["objects"]) for f in meta["frames"].values()) <= 6 + 6 + 1  # objects + car occluders + group
    # t >= 0.3: an untruncated car (>= 1.4 m high, 0.28 * 96 px a metre at t = 1) is >= 0.3 * 1.4 * 26.88 px high;
    # the exceptions are the cars placed in front of a hard "small" one to occlude it (they stay near it)
    heights = _positive_heights(easy)
    assert heights and np.mean(np.array(heights) >= 0.3 * 1.4 * 0.28 * 96 - 1) > 0.95
    assert np.median(heights) > 1.2 * np.median(_positive_heights(default))
    two = generate_synth(tmp_path / "two", 20, seed=2, classes=["Pedestrian", "Cyclist"])
    assert {o.cls for p in (two / "training" / "label_2").glob("*.txt")
            for o in parse_kitti_label_file(p)} <= {"Pedestrian", "Cyclist", "DontCare"}


def test_easier_profile_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"subset of \['Car', 'Pedestrian', 'Cyclist', 'Van', 'Truck'\].*Bus"):
        generate_synth(tmp_path / "x", 1, classes=["Car", "Bus"])
    with pytest.raises(ValueError, match="min_t must be in"):
        generate_synth(tmp_path / "x", 1, min_t=1.5)
