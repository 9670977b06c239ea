"""COCO reader, remapping, json-located errors, COCO-traffic filter. Fixtures are written to tmp_path."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aidkd.data import (
    DatasetError,
    DetectionDataset,
    check_dataset,
    default_image_dir,
    load_coco_records,
    make_coco_traffic,
    scan_coco,
)

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def base_json() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 11, "file_name": "b.jpg", "width": 32, "height": 40},
            {"id": 12, "file_name": "c.jpg", "width": 50, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [5, 5, 4, 4], "iscrowd": 0, "area": 16},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 32, 40], "iscrowd": 1, "area": 1280},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [3, 4, 5, 6], "iscrowd": 0, "area": 30},
            {"id": 5, "image_id": 12, "category_id": 7, "bbox": [10, 10, 20, 10], "iscrowd": 0, "area": 200},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "truck"}],
    }


def write_coco(tmp: Path, data: dict, images: bool = True, name: str = "instances_val.json") -> Path:
    ann = tmp / "annotations" / name
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    if images:
        d = default_image_dir(ann)
        d.mkdir(parents=True, exist_ok=True)
        for im in data["images"]:
            arr = np.full((im["height"], im["width"], 3), 128, np.uint8)
            Image.fromarray(arr).save(d / im["file_name"], quality=90)
    return ann


def test_default_image_dir():
    assert default_image_dir("/d/annotations/instances_val2017.json") == Path("/d/val2017")
    assert default_image_dir("/d/x/my.json") == Path("/d/x")


def test_load_all_categories_sorted_by_id(tmp_path):
    ann = write_coco(tmp_path, base_json())
    recs, names = load_coco_records(ann)
    assert names == ["person", "car", "truck"]
    assert [r.image_id for r in recs] == [10, 11, 12]
    r = recs[0]
    assert r.image_path == tmp_path / "val" / "a.jpg" and (r.width, r.height) == (64, 48)
    assert r.source == str(ann) and r.stem == "a"
    assert [(o.cls, o.box) for o in r.objects] == [("car", (1.0, 2.0, 11.0, 22.0)), ("person", (5.0, 5.0, 9.0, 9.0))]
    crowd = [o for o in recs[1].objects if o.iscrowd]
    assert len(crowd) == 1 and crowd[0].cls == "truck" and crowd[0].location == "annotations[2]"


def test_subset_and_contiguous_remap(tmp_path):
    ann = write_coco(tmp_path, base_json())
    recs, names = load_coco_records(ann, tmp_path / "val", categories=["truck", "car"])
    assert names == ["truck", "car"]
    # person dropped (background for this subset), iscrowd truck kept as ignore region
    assert [o.cls for o in recs[0].objects] == ["car"]
    assert sorted((o.cls, o.iscrowd) for o in recs[1].objects) == [("car", False), ("truck", True)]
    ds = DetectionDataset(recs, classes=names, ignore_classes=[], min_size=48, max_size=64)
    _, t = ds[1]  # image 11: 32x40 -> scale min(48/32, 64/40) = 1.5 -> 48x60
    assert t["labels"].tolist() == [2]
    assert t["boxes"].tolist() == [[4.5, 6.0, 12.0, 15.0]]
    assert t["ignore_boxes"].tolist() == [[0.0, 0.0, 48.0, 60.0]]
    _, t = ds[2]
    assert t["labels"].tolist() == [1]  # truck -> label 1
    with pytest.raises(DatasetError, match="requested category 'bus' is not in the json"):
        load_coco_records(ann, categories=["bus"])


@pytest.mark.parametrize("mutate, location, needle", [
    (lambda d: d["annotations"][3].pop("bbox"), "annotations[3].bbox", "missing key 'bbox'"),
    (lambda d: d["images"][1].pop("width"), "images[1].width", "missing key 'width'"),
    (lambda d: d.pop("categories"), "categories", "missing key 'categories'"),
    (lambda d: d["annotations"][4].update(image_id=99), "annotations[4].image_id", "dangling image_id 99"),
    (lambda d: d["images"][2].update(id=10), "images[2].id", "duplicate image id 10"),
    (lambda d: d["annotations"][1].update(bbox=[1, float("nan"), 2, 2]), "annotations[1].bbox", "non-finite"),
    (lambda d: d["annotations"][1].update(bbox=[1, 1, float("inf"), 2]), "annotations[1].bbox", "non-finite"),
    (lambda d: d["annotations"][0].update(bbox=[30, 2, -10, 20]), "annotations[0].bbox", "negative width"),
    (lambda d: d["annotations"][0].update(bbox=[60, 2, 10, 20]), "annotations[0].bbox", "outside the 64x48 image"),
    (lambda d: d["annotations"][2].update(category_id=42), "annotations[2].category_id", "unknown category_id 42"),
    (lambda d: d["annotations"][2].update(id=1), "annotations[2].id", "duplicate annotation id 1"),
    (lambda d: d["images"][0].update(id="10"), "images[0].id", "must be an integer"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0].bbox", "list of 4 numbers"),
])
def test_errors_name_json_location(tmp_path, mutate, location, needle):
    data = base_json()
    mutate(data)
    ann = write_coco(tmp_path, data, images=False)
    with pytest.raises(DatasetError) as e:
        load_coco_records(ann, tmp_path)
    locs = [p.location for p in e.value.problems]
    assert location in locs
    hit = e.value.problems[locs.index(location)]
    assert hit.file == str(ann) and needle in hit.message
    assert f"{ann} [{location}]: " in str(e.value)
    # collect mode drops the affected image only
    errors: list[DatasetError] = []
    recs, _ = load_coco_records(ann, tmp_path, errors=errors)
    assert errors and len(recs) <= 3


def test_json_syntax_error_names_line(tmp_path):
    ann = tmp_path / "x.json"
    ann.write_text('{\n "images": [],\n "annotations": [,]\n}')
    with pytest.raises(DatasetError) as e:
        load_coco_records(ann, tmp_path)
    assert e.value.line == 3 and str(e.value).startswith(f"{ann}:3: invalid json")
    ann.write_bytes(b'{"images": "\xff"}')
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        load_coco_records(ann, tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_coco_records(tmp_path / "nope.json", tmp_path)


def test_size_mismatch_names_image(tmp_path):
    data = base_json()
    ann = write_coco(tmp_path, data)
    data["images"][0]["width"] = 65
    ann.write_text(json.dumps(data))
    errs = check_dataset(ann, fmt="coco")
    assert len(errs) == 1
    assert errs[0].file == str(tmp_path / "val" / "a.jpg")
    assert "image is 64x48 (WxH) but" in errs[0].message and "declares 65x48" in errs[0].message
    recs, names = load_coco_records(ann)
    with pytest.raises(DatasetError, match="a.jpg: image is 64x48"):
        DetectionDataset(recs, classes=names, ignore_classes=[], min_size=32, max_size=64)


# ------------------------------------------------------------------------------------------------ hypothesis
@st.composite
def broken_json(draw):
    """(data, expected location) for one structural problem."""
    d = base_json()
    kind = draw(st.sampled_from(["missing", "dangling", "dup_image", "nan", "neg", "badtype", "garbage"]))
    if kind == "missing":
        sec, keys = draw(st.sampled_from([("images", ["id", "file_name", "width", "height"]),
                                          ("annotations", ["id", "image_id", "category_id", "bbox"]),
                                          ("categories", ["id", "name"])]))
        i = draw(st.integers(0, len(d[sec]) - 1))
        k = draw(st.sampled_from(keys))
        del d[sec][i][k]
        return d, f"{sec}[{i}].{k}"
    if kind == "dangling":
        i = draw(st.integers(0, 4))
        d["annotations"][i]["image_id"] = draw(st.integers(13, 10**12) | st.integers(-100, 9))
        return d, f"annotations[{i}].image_id"
    if kind == "dup_image":
        i, j = sorted(draw(st.lists(st.integers(0, 2), min_size=2, max_size=2, unique=True)))
        d["images"][j]["id"] = d["images"][i]["id"]
        return d, f"images[{j}].id"
    if kind in ("nan", "neg"):
        i = draw(st.integers(0, 4))
        b = d["annotations"][i]["bbox"]
        k = draw(st.integers(0, 3) if kind == "nan" else st.integers(2, 3))
        b[k] = draw(st.sampled_from([math.nan, math.inf, -math.inf])) if kind == "nan" else \
            -draw(st.floats(0.01, 1e6))
        return d, f"annotations[{i}].bbox"
    if kind == "badtype":
        sec, key = draw(st.sampled_from([("images", "id"), ("images", "width"), ("images", "height"),
                                         ("annotations", "image_id"), ("annotations", "category_id"),
                                         ("annotations", "bbox"), ("annotations", "id"), ("categories", "id")]))
        i = draw(st.integers(0, len(d[sec]) - 1))
        d[sec][i][key] = draw(st.sampled_from(["1", None, True, [1], {"a": 1}, 1.5, -3]))
        if key in ("id", "image_id", "category_id") and d[sec][i][key] == -3:
            d[sec][i][key] = "x"
        return d, f"{sec}[{i}].{key}"
    # garbage anywhere: any json value replaces any field; only the exception type is checked
    sec = draw(st.sampled_from(["images", "annotations", "categories"]))
    i = draw(st.integers(0, len(d[sec]) - 1))
    key = draw(st.sampled_from(sorted(d[sec][i])))
    value = draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                              max_leaves=6))
    d[sec][i][key] = value
    return d, None


@HYP
@given(case=broken_json())
def test_hyp_malformed_coco_always_dataset_error(tmp_path, case):
    data, location = case
    ann = tmp_path / "annotations" / "instances_x.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    try:
        load_coco_records(ann, tmp_path)
    except DatasetError as e:
        assert e.file == str(ann)
        if location is not None:
            assert location in [p.location for p in e.problems]
    else:
        assert location is None  # garbage that happened to be valid (e.g. a new area value)
    errors: list[DatasetError] = []
    load_coco_records(ann, tmp_path, errors=errors)
    assert all(isinstance(e, DatasetError) for e in errors)


@HYP
@given(cut=st.integers(0, 10_000), junk=st.binary(max_size=8))
def test_hyp_cut_json_is_dataset_error(tmp_path, cut, junk):
    text = json.dumps(base_json(), indent=1).encode()
    cut = cut % len(text)
    ann = tmp_path / "cut.json"
    data = text[:cut] + junk
    ann.write_bytes(data)
    try:
        load_coco_records(ann, tmp_path)
    except DatasetError as e:
        assert e.file == str(ann)
    else:  # junk completed the json again (e.g. the missing closing brace)
        assert json.loads(data) == base_json()


def test_scan_lists_every_problem(tmp_path):
    d = base_json()
    d["annotations"][0]["bbox"] = [1, 1, -1, 1]
    d["annotations"][4]["image_id"] = 77
    d["images"][1]["height"] = 0
    ann = write_coco(tmp_path, d, images=False)
    locs = sorted(e.location for e in scan_coco(ann).errors)
    assert locs == ["annotations[0].bbox", "annotations[4].image_id", "images[1].height"]


# ------------------------------------------------------------------------------------------------ traffic
def traffic_json() -> dict:
    cats = [(1, "person"), (2, "bicycle"), (3, "car"), (10, "traffic light"), (14, "parking meter"), (17, "cat"),
            (18, "dog"), (44, "bottle"), (62, "chair")]
    imgs = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, 7)]
    anns = [
        (1, 1, 1), (2, 1, 3), (3, 1, 44),  # image 1: person, car, bottle -> kept (car); bottle dropped
        (4, 2, 1), (5, 2, 14),  # image 2: person + parking meter only -> dropped (no trigger class)
        (6, 3, 10), (7, 3, 17),  # image 3: traffic light + cat -> kept; cat kept only in the 13-class variant
        (8, 4, 62),  # image 4: chair -> dropped
        (9, 5, 2), (10, 5, 18),  # image 5: bicycle + dog -> kept
    ]
    annotations = [{"id": a, "image_id": im, "category_id": c, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25}
                   for a, im, c in anns]
    return {"images": imgs, "annotations": annotations, "categories": [{"id": i, "name": n} for i, n in cats]}


def test_coco_traffic_11_and_13(tmp_path):
    src = tmp_path / "instances.json"
    src.write_text(json.dumps(traffic_json()))
    out = tmp_path / "out" / "traffic11.json"
    stats = make_coco_traffic(src, out, variant=11)
    d = json.loads(out.read_text())
    assert sorted(im["id"] for im in d["images"]) == [1, 3, 5]
    assert sorted(a["id"] for a in d["annotations"]) == [1, 2, 6, 9]
    assert [c["name"] for c in d["categories"]] == ["person", "bicycle", "car", "traffic light", "parking meter"]
    assert "info" in d and "licenses" not in d
    assert stats["images"] == 3 and stats["annotations"] == 4
    d13 = json.loads(Path(make_coco_traffic(src, tmp_path / "t13.json", variant=13)["out"]).read_text())
    assert sorted(a["id"] for a in d13["annotations"]) == [1, 2, 6, 7, 9, 10]
    assert [c["name"] for c in d13["categories"]][-2:] == ["cat", "dog"]
    # info/licenses kept when present; the result is a valid COCO json for our reader and pycocotools
    src2 = traffic_json()
    src2["info"], src2["licenses"] = {"description": "mine"}, [{"id": 1, "name": "x"}]
    src.write_text(json.dumps(src2))
    make_coco_traffic(src, out)
    d = json.loads(out.read_text())
    assert d["info"] == {"description": "mine"} and d["licenses"] == [{"id": 1, "name": "x"}]
    recs, names = load_coco_records(out, tmp_path)
    assert [r.image_id for r in recs] == [1, 3, 5]
    assert names == ["person", "bicycle", "car", "traffic light", "parking meter"]
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    res = coco.loadRes([{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.9}])
    assert len(res.getAnnIds()) == 1
    with pytest.raises(ValueError):
        make_coco_traffic(src, out, variant=12)


def test_coco_traffic_rejects_bad_input(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 44, "name": "bottle"}]}))
    with pytest.raises(DatasetError, match="none of the traffic categories"):
        make_coco_traffic(src, tmp_path / "o.json")
    d = traffic_json()
    del d["annotations"][2]["category_id"]
    src.write_text(json.dumps(d))
    with pytest.raises(DatasetError) as e:
        make_coco_traffic(src, tmp_path / "o.json")
    assert e.value.location == "annotations[2]"
    d = copy.deepcopy(traffic_json())
    src.write_text(json.dumps(d)[:-3])
    with pytest.raises(DatasetError, match="invalid json"):
        make_coco_traffic(src, tmp_path / "o.json")


@HYP
@given(img=st.integers(0, 2), dw=st.integers(-5, 5), dh=st.integers(-5, 5))
def test_hyp_declared_size_mismatch(tmp_path, img, dw, dh):
    data = base_json()
    ann = write_coco(tmp_path, data)  # images on disk have the declared sizes
    entry = data["images"][img]
    entry["width"] = max(1, entry["width"] + dw)
    entry["height"] = max(1, entry["height"] + dh)
    changed = (dw != 0 and entry["width"] != base_json()["images"][img]["width"]) or \
        (dh != 0 and entry["height"] != base_json()["images"][img]["height"])
    ann.write_text(json.dumps(data))
    image_file = str(tmp_path / "val" / entry["file_name"])
    errs = check_dataset(ann, fmt="coco")
    assert all(isinstance(e, DatasetError) for e in errs)
    size_errs = [e for e in errs if e.file == image_file]
    assert bool(size_errs) == changed
    if changed:
        assert "declares" in size_errs[0].message
        errors: list[DatasetError] = []
        recs, names = load_coco_records(ann, errors=errors)  # shrinking may also put boxes outside
        recs = [r for r in recs if str(r.image_path) == image_file]
        if recs:
            with pytest.raises(DatasetError) as e:
                DetectionDataset(recs, classes=names, ignore_classes=[], min_size=32, max_size=64)
            assert image_file in str(e.value)
