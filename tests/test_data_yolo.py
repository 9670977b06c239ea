"""YOLO (Ultralytics) datasets: data.yaml, pixel boxes from normalised labels, file:line errors, data check,
training and evaluation with `format: yolo`, and `predict --format yolo` read back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from aidkd.data import DatasetError, DetectionDataset, check_dataset, load_yolo_records, parse_yolo_label_file
from aidkd.data.convert import convert_dataset
from aidkd.data.yolo import read_data_yaml, yolo_label_path

NAMES = ["car", "person", "bike"]


def image(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(w * h)  # some texture, for detections to be found on it
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_yaml(root: Path, **data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"path": ".", "train": "images/train", "val": "images/val", "names": list(NAMES), **data}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def small(tmp_path: Path, **data) -> Path:
    """train: a.png 64x48 (two boxes), b.jpg 80x40 (no label file); val: c.png 64x48 (empty label), d.png 100x50
    (a box and a polygon)."""
    root = tmp_path / "yolo"
    image(root / "images/train/a.png", 64, 48)
    label(root / "labels/train/a.txt", "0 0.5 0.5 0.25 0.5\n1 0.125 0.25 0.25 0.5\n")
    image(root / "images/train/b.jpg", 80, 40)
    image(root / "images/val/c.png", 64, 48)
    label(root / "labels/val/c.txt", "")
    image(root / "images/val/d.png", 100, 50)
    label(root / "labels/val/d.txt", "2 0.1 0.2 0.2 0.4\n\n1 0.5 0.2 0.7 0.6 0.6 0.9\n")
    return write_yaml(root, **data)


def boxes(records) -> dict:
    return {r.image_path.name: [(o.cls, tuple(round(v, 6) for v in o.box)) for o in r.objects] for r in records}


# ----------------------------------------------------------------------------------------------------- reading


def test_reads_pixel_boxes(tmp_path):
    data_yaml = small(tmp_path)
    train, classes = load_yolo_records(data_yaml, "train")
    assert classes == NAMES
    assert boxes(train) == {"a.png": [("car", (24.0, 12.0, 40.0, 36.0)), ("person", (0.0, 0.0, 16.0, 24.0))],
                            "b.jpg": []}  # no label file: no boxes
    assert [(r.width, r.height) for r in train] == [(64, 48), (80, 40)]
    assert [r.image_id for r in train] == [0, 1] and [r.stem for r in train] == ["a", "b"]
    assert [o.line for o in train[0].objects] == [1, 2]
    val, _ = load_yolo_records(data_yaml.parent, "val")  # the folder holding data.yaml
    # the polygon (0.5, 0.2) (0.7, 0.6) (0.6, 0.9) is its enclosing box
    assert boxes(val) == {"c.png": [], "d.png": [("bike", (0.0, 0.0, 20.0, 20.0)), ("person", (50.0, 10.0, 70.0, 45.0))]}


def test_names_as_index_mapping_and_numeric_stems(tmp_path):
    root = tmp_path / "d"
    image(root / "images/train/000007.png", 40, 20)
    image(root / "images/train/000003.png", 40, 20)
    label(root / "labels/train/000003.txt", "2 0.5 0.5 0.5 0.5\n")
    (root / "images/val").mkdir()
    write_yaml(root, names={0: "car", "1": "person", 2: "bike"}, nc=3)
    records, classes = load_yolo_records(root, "train")
    assert classes == NAMES
    assert [r.image_id for r in records] == [3, 7]  # numeric stems are the ids
    assert boxes(records)["000003.png"] == [("bike", (10.0, 5.0, 30.0, 15.0))]


@pytest.mark.parametrize("names, message", [
    ({0: "car", 2: "bike"}, "number the classes 0, 1, 2, ... without gaps; missing [1]"),
    ({"a": "car"}, "keys of names must be class indices"),
    ({-1: "car"}, "without gaps; got [-1]"),
    (["car", "car"], "duplicate class name 'car'"),
    ("car", "names must be a list or an {index: name} mapping"),
    ([], "missing key 'names'"),
])
def test_bad_names(tmp_path, names, message):
    small(tmp_path, names=names)
    with pytest.raises(DatasetError, match="names") as e:
        load_yolo_records(tmp_path / "yolo" / "data.yaml", "train")
    assert message in str(e.value) and str(e.value).startswith(str(tmp_path / "yolo" / "data.yaml"))


def test_data_yaml_problems(tmp_path):
    data_yaml = small(tmp_path, nc=4)
    with pytest.raises(DatasetError, match=r"data.yaml \[nc\]: nc is 4 but names has 3 classes"):
        read_data_yaml(data_yaml)
    data_yaml.write_text("path: .\ntrain: images/train\nval: [images/val\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"data.yaml:4: invalid YAML"):
        read_data_yaml(data_yaml)
    write_yaml(data_yaml.parent, val=None)
    with pytest.raises(DatasetError, match=r"data.yaml \[val\]: missing key 'val'"):
        read_data_yaml(data_yaml)
    write_yaml(data_yaml.parent, val="images/nowhere")
    with pytest.raises(DatasetError, match=r"\[val\]: .*images/nowhere not found"):
        read_data_yaml(data_yaml)
    data_yaml.unlink()
    (data_yaml.parent / "coco8.yaml").write_text("names: [a]\n")
    with pytest.raises(DatasetError, match="no data.yaml in this folder .it holds coco8.yaml: pass that file"):
        read_data_yaml(data_yaml.parent)


def test_roboflow_style_paths_and_image_lists(tmp_path):
    """``../train/images`` beside data.yaml, and a .txt list of images (relative to the list's folder)."""
    root = tmp_path / "rf"
    image(root / "train/images/x.png", 20, 10)
    label(root / "train/labels/x.txt", "0 0.5 0.5 1 1\n")
    image(root / "valid/images/y.png", 20, 10)
    (root / "val.txt").write_text("./valid/images/y.png\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: val.txt\nnames: [car]\n")
    train, _ = load_yolo_records(root, "train")
    val, _ = load_yolo_records(root, "val")
    assert boxes(train) == {"x.png": [("car", (0.0, 0.0, 20.0, 10.0))]}
    assert [r.image_path for r in val] == [root / "valid/images/y.png"]
    assert yolo_label_path("/d/images/s/images/a.b.jpg") == Path("/d/images/s/labels/a.b.txt")
    assert yolo_label_path("/d/x/a.png") == Path("/d/x/a.txt")


BAD_LINES = [
    ("0 0.5 0.5 0.2", "expected 5 (class x_center y_center width height) fields, or a polygon"),
    ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 (class x_center y_center width height) fields"),  # a prediction line
    ("3 0.5 0.5 0.2 0.2", "class index 3 out of range: data.yaml names 3 classes (0..2)"),
    ("-1 0.5 0.5 0.2 0.2", "class index -1 out of range"),
    ("1.5 0.5 0.5 0.2 0.2", "class index must be an integer, got '1.5'"),
    ("car 0.5 0.5 0.2 0.2", "field 1 (class) is not a number: 'car'"),
    ("1_0 0.5 0.5 0.2 0.2", "field 1 (class) is not a number: '1_0'"),
    ("2 0.1 0.1 0.2 y 0.3 0.5", "field 5 (y) is not a number: 'y'"),
    ("0 0.5 x 0.2 0.2", "field 3 (y_center) is not a number: 'x'"),
    ("0 0.5 0.5 nan 0.2", "field 4 (width) is not finite"),
    ("0 1.2 0.5 0.2 0.2", "x_center 1.2 is outside [0, 1]"),
    ("0 0.5 0.5 0.2 -0.1", "height -0.1 is outside [0, 1]"),
    ("0 0.95 0.5 0.2 0.2", "box (0.85, 0.4, 1.05, 0.6) (x1 y1 x2 y2, normalised) is outside the image"),
    ("0 0.5 0.5 0 0.2", "zero-area box"),
    ("0 0.5 0.5 1.05 0.5", "width 1.05 is outside [0, 1]"),  # 1.6 px more than the 64 px wide image
    ("1 0.1 0.1 0.2 0.2 1.3 0.5", "polygon coordinate 5 (1.3) is outside [0, 1]"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_label_line_names_file_and_line(tmp_path, line, message):
    small(tmp_path)
    lbl = label(tmp_path / "yolo/labels/train/a.txt", "0 0.5 0.5 0.25 0.5\n" + line + "\n")
    with pytest.raises(DatasetError) as e:
        load_yolo_records(tmp_path / "yolo", "train")
    assert (e.value.file, e.value.line) == (str(lbl), 2)
    assert str(e.value).startswith(f"{lbl}:2: ") and message in str(e.value)


def test_tolerance_is_one_pixel(tmp_path):
    small(tmp_path)
    label(tmp_path / "yolo/labels/train/a.txt", "0 0.5 0.5 1.01 0.5\n")  # 0.32 px outside the 64 px image
    records, _ = load_yolo_records(tmp_path / "yolo", "train")
    assert records[0].objects[0].box == pytest.approx((-0.32, 12.0, 64.32, 36.0))


def test_missing_and_corrupt_images_and_skip_invalid(tmp_path):
    data_yaml = small(tmp_path)
    (data_yaml.parent / "train.txt").write_text("./images/train/a.png\n./images/train/gone.png\n"
                                                "./images/train/b.jpg\n./images/train/a.png\n")
    write_yaml(data_yaml.parent, train="train.txt")
    (data_yaml.parent / "images/train/b.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError) as e:
        load_yolo_records(data_yaml, "train")
    text = str(e.value)
    assert "3 problems in YOLO dataset" in text
    assert f"{data_yaml.parent / 'train.txt'}:2: image {data_yaml.parent / 'images/train/gone.png'} not found" in text
    assert f"{data_yaml.parent / 'train.txt'}:4: image {data_yaml.parent / 'images/train/a.png'} listed twice" in text
    assert f"{data_yaml.parent / 'images/train/b.jpg'}: unreadable image header" in text
    errors: list = []
    records, _ = load_yolo_records(data_yaml, "train", errors=errors)  # the --skip-invalid policy
    assert [r.image_path.name for r in records] == ["a.png"] and len(errors) == 3


def test_class_subset_and_ignore_classes(tmp_path):
    data_yaml = small(tmp_path)
    records, classes = load_yolo_records(data_yaml, "train", classes=["person"], ignore_classes=["car"])
    assert classes == ["person"]
    ds = DetectionDataset(records, classes, ["car"], min_size=48, max_size=64, resize=False)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 16.0, 24.0]] and target["labels"].tolist() == [1]
    assert target["ignore_boxes"].tolist() == [[24.0, 12.0, 40.0, 36.0]]
    dropped, _ = load_yolo_records(data_yaml, "val", classes=["person"])  # bike: background
    assert boxes(dropped)["d.png"] == [("person", (50.0, 10.0, 70.0, 45.0))]
    with pytest.raises(DatasetError, match=r"requested class 'truck' is not in names \(car, person, bike\)"):
        load_yolo_records(data_yaml, "train", classes=["truck"])


# ------------------------------------------------------------------------------------------------- data check


def test_data_check_lists_every_problem(tmp_path, capsys):
    from aidkd.cli.main import main

    data_yaml = small(tmp_path, test="images/val")  # test == val: its images are in two splits
    assert main(["data", "check", str(data_yaml.parent), "--format", "yolo"]) == 1
    out = capsys.readouterr().out
    assert out.count("is in both the val and the test split") == 2
    write_yaml(data_yaml.parent)
    label(data_yaml.parent / "labels/val/c.txt", "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n0 0.5\n")
    errs = check_dataset(data_yaml, fmt="yolo")
    lbl = str(data_yaml.parent / "labels/val/c.txt")
    assert [(e.file, e.line) for e in errs] == [(lbl, 2), (lbl, 3)]
    assert [e.format() for e in check_dataset(data_yaml, fmt="auto")] == [e.format() for e in errs]
    label(data_yaml.parent / "labels/val/c.txt", "")
    assert main(["data", "check", str(data_yaml), "--format", "yolo"]) == 0
    out = capsys.readouterr().out
    assert "4 images (2 without boxes); 4 boxes: person 2, bike 1, car 1" in out and "dataset OK" in out


def test_format_mismatch_is_named(tmp_path, synth_root):
    from aidkd.engine.config import ConfigError, config_from_dict
    from aidkd.engine.datamodule import DetectionDataModule

    cfg = config_from_dict({"data": {"format": "yolo", "root": str(synth_root)}})
    with pytest.raises(DatasetError, match="holds scenes aidkd generated .* but data.format is yolo"):
        DetectionDataModule(cfg.data)
    data_yaml = small(tmp_path)
    cfg = config_from_dict({"data": {"format": "kitti", "root": str(data_yaml.parent)}})
    with pytest.raises(DatasetError, match=r"looks like a YOLO dataset \(data.yaml\) .* set data.format: yolo"):
        DetectionDataModule(cfg.data).setup()
    with pytest.raises(ConfigError, match="looks like yolo data"):
        config_from_dict({"data": {"root": str(data_yaml)}})


# ------------------------------------------------------------------------------- training, evaluation, predict


def test_train_and_evaluate_on_yolo_data_as_on_the_same_kitti_data(tmp_path, tiny_cfg, synth_root):
    """The same scenes in YOLO layout give the same samples as in KITTI layout; a run on them trains, validates with
    COCO metrics and evaluates to its final metrics."""
    from aidkd.data.kitti import KITTI_CLASSES, KITTI_DEFAULT_CLASSES, KITTI_DEFAULT_IGNORE
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.datamodule import DetectionDataModule
    from aidkd.engine.run import evaluate, train

    convert_dataset(synth_root, tmp_path / "as_yolo", "kitti", "yolo")
    data_yaml = tmp_path / "as_yolo" / "data.yaml"
    assert read_data_yaml(data_yaml).names == list(KITTI_CLASSES)
    yolo_data = {"format": "yolo", "root": str(data_yaml), "classes": list(KITTI_DEFAULT_CLASSES),
                 "ignore_classes": list(KITTI_DEFAULT_IGNORE)}
    cfg = config_from_dict(tiny_cfg("yolo", data=yolo_data, train={"epochs": 1, "max_steps": 2}))
    metrics = train(cfg)
    assert "coco/AP" in metrics and not any(k.startswith("kitti") for k in metrics)
    model = Path(cfg.output_dir) / "model_best.pt"
    assert model.is_file()

    kitti_cfg = config_from_dict(tiny_cfg("kitti", data={"format": "kitti"}, eval={"kitti": False}))
    yolo_dm, kitti_dm = DetectionDataModule(cfg.data), DetectionDataModule(kitti_cfg.data)
    for split in ("train", "val"):
        a, b = yolo_dm.make_dataset(split, train=False), kitti_dm.make_dataset(split, train=False)
        assert [r.image_path.name for r in a.records] == [r.image_path.name for r in b.records]
        for i in range(len(a)):
            (ia, ta), (ib, tb) = a[i], b[i]
            assert torch.equal(ia, ib) and torch.equal(ta["labels"], tb["labels"])
            assert torch.allclose(ta["boxes"], tb["boxes"], atol=1e-3)
            assert torch.allclose(ta["ignore_boxes"], tb["ignore_boxes"], atol=1e-3)
    assert evaluate(cfg, model) == pytest.approx(metrics, abs=1e-6, nan_ok=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A RetinaNet for (person, bike) with a few confident detections per image."""
    from tests.conftest import confident_retinanet_file

    return confident_retinanet_file(tmp_path_factory.mktemp("model") / "model.pt", ["person", "bike"], 48, 100)


def test_predict_writes_yolo_labels_that_read_back(tmp_path, model_file):
    from aidkd.data.images import read_image
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.predict import detect, predict_command
    from aidkd.models import load_detector

    data_yaml = small(tmp_path)
    cfg = config_from_dict({"data": {"format": "yolo", "root": str(data_yaml), "classes": ["person", "bike"],
                                     "min_size": 48, "max_size": 100}})
    out = tmp_path / "pred"
    assert predict_command(cfg, model_file, out, score_thresh=0.3) == 2  # the val split; format yolo by default
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["c.txt", "d.txt"]
    model, _ = load_detector(model_file, classes=["person", "bike"])
    n = 0
    for name in ("c", "d"):
        img = read_image(data_yaml.parent / f"images/val/{name}.png")
        want = detect(model, img, 0.3)
        got = parse_yolo_label_file(out / "labels" / f"{name}.txt", NAMES, img.size, with_score=True)
        assert len(got) == len(want["boxes"])
        # class indices are data.yaml's (person 1, bike 2), not the model's label order
        assert [o.cls for o in got] == [["person", "bike"][lab - 1] for lab in want["labels"].tolist()]
        assert torch.allclose(torch.tensor([o.box for o in got]), want["boxes"], atol=1e-3)
        assert [o.score for o in got] == pytest.approx(want["scores"].tolist(), abs=1e-5)
        n += len(got)
    assert n > 0
    lines = (out / "labels" / "d.txt").read_text().splitlines()
    assert len(lines[0].split()) == 6 and lines[0].split()[0] in ("1", "2")
    # a folder of images and no YOLO data: class indices are the model's (0..K-1)
    cfg = config_from_dict({"data": {"format": "synth", "classes": ["person", "bike"], "min_size": 48,
                                     "max_size": 100}})
    out2 = tmp_path / "pred2"
    predict_command(cfg, model_file, out2, source=str(data_yaml.parent / "images/val"), score_thresh=0.3,
                    fmt="yolo")
    again = (out2 / "labels" / "d.txt").read_text().splitlines()
    assert [line.split()[1:] for line in again] == [line.split()[1:] for line in lines]
    assert [int(line.split()[0]) for line in again] == [int(line.split()[0]) - 1 for line in lines]


# ------------------------------------------------------------------------------------------------ data convert


def all_boxes(root, fmt) -> dict:
    """``{split: {image name: [(class, box rounded to 0.01 px)]}}`` of a dataset, read as training reads it."""
    from aidkd.data import load_coco_records, load_kitti_records

    if fmt == "kitti":
        splits = {s: load_kitti_records(root, split=s, read_sizes=True) for s in ("train", "val")}
    elif fmt == "yolo":
        splits = {s: load_yolo_records(root, split=s)[0] for s in read_data_yaml(root).splits}
    else:
        splits = {p.stem[len("instances_"):]: load_coco_records(p)[0]
                  for p in sorted((root / "annotations").glob("*.json"))}
    return {s: {r.image_path.name: sorted((o.cls, o.iscrowd, tuple(round(v, 2) for v in o.box)) for o in r.objects)
                for r in records} for s, records in splits.items()}


def test_convert_round_trip_keeps_every_box(tmp_path, synth_root, capsys):
    from aidkd.cli.main import main

    want = all_boxes(synth_root, "kitti")
    assert sum(len(b) for split in want.values() for b in split.values()) > 50
    assert main(["data", "convert", str(synth_root), str(tmp_path / "y"), "--to", "yolo"]) == 0  # --from: found
    assert "(yolo, images linked): train 16, val 4 images" in capsys.readouterr().out
    assert (tmp_path / "y/images/val").is_dir() and (tmp_path / "y/labels/train").is_dir()
    assert all_boxes(tmp_path / "y", "yolo") == want
    convert_dataset(tmp_path / "y", tmp_path / "c", "yolo", "coco", copy=True)
    assert all_boxes(tmp_path / "c", "coco") == want
    assert not (tmp_path / "c/val").iterdir().__next__().is_symlink()
    convert_dataset(tmp_path / "c", tmp_path / "k", "coco", "kitti")
    assert all_boxes(tmp_path / "k", "kitti") == want
    assert sorted(p.name for p in (tmp_path / "k/ImageSets").iterdir()) == ["train.txt", "val.txt"]


def test_convert_refuses_what_it_cannot_do(tmp_path, synth_root):
    data_yaml = small(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(DatasetError, match="must be a new or empty folder"):
        convert_dataset(data_yaml, tmp_path / "full", "yolo", "coco")
    with pytest.raises(DatasetError, match="inside the source dataset"):
        convert_dataset(data_yaml, data_yaml.parent / "out", "yolo", "coco")
    with pytest.raises(DatasetError, match=r"classes \['bike', 'car', 'person'\] are not KITTI classes"):
        convert_dataset(data_yaml, tmp_path / "k", "yolo", "kitti")
    label(data_yaml.parent / "labels/val/c.txt", "7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="c.txt:1: class index 7 out of range"):
        convert_dataset(data_yaml, tmp_path / "c", "yolo", "coco")
    assert not (tmp_path / "c").exists() and not (tmp_path / "k").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert (tmp_path / "full" / "x").read_text() == "mine"


def test_convert_coco_crowd_regions(tmp_path):
    import json

    from aidkd.data import load_kitti_records

    root = tmp_path / "coco"
    image(root / "val/a.png", 40, 20)
    (root / "annotations").mkdir()
    (root / "annotations/instances_val.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.png", "width": 40, "height": 20}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [2, 4, 10, 8], "iscrowd": 0},
                        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [20, 0, 20, 20], "iscrowd": 1}],
        "categories": [{"id": 3, "name": "Car"}]}))
    convert_dataset(root, tmp_path / "y", "coco", "yolo")
    assert (tmp_path / "y/labels/val/a.txt").read_text() == "0 0.175 0.4 0.25 0.4\n"  # the crowd region left out
    convert_dataset(root / "annotations/instances_val.json", tmp_path / "k", "coco", "kitti")
    (rec,) = load_kitti_records(tmp_path / "k", split="val")
    assert [(o.cls, o.box) for o in rec.objects] == [("Car", (2.0, 4.0, 12.0, 12.0)), ("DontCare", (20.0, 0.0, 40.0, 20.0))]


def test_data_check_detects_the_layout_without_format(tmp_path, capsys):
    """Without --format a YOLO folder is checked as YOLO (it was read as a KITTI root and refused)."""
    from aidkd.cli.main import main

    data_yaml = small(tmp_path)
    assert main(["data", "check", str(data_yaml.parent)]) == 0
    assert "dataset OK" in capsys.readouterr().out
