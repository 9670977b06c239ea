"""A COCO root (annotations/instances_{train,val}*.json beside their image folders) as `data.root` and as
`aidkd data check ROOT --format coco`; a root that is not one says what to set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aidkd.cli.main import main
from aidkd.data import DatasetError, check_dataset
from aidkd.engine.config import config_from_dict
from aidkd.engine.datamodule import DetectionDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _coco_split(root: Path, name: str, image_folder: Path, ids: list[int]) -> None:
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in ids],
            "annotations": [{"id": i, "image_id": i, "category_id": 3, "bbox": [2, 3, 10, 8], "iscrowd": 0,
                             "area": 80} for i in ids],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(data))
    image_folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(np.full((30, 40, 3), 100, np.uint8)).save(image_folder / f"{i}.jpg")


def _kitti(root: Path) -> Path:
    (root / "training" / "image_2").mkdir(parents=True)
    (root / "training" / "label_2").mkdir(parents=True)
    Image.new("RGB", (64, 32)).save(root / "training" / "image_2" / "000000.png")
    (root / "training" / "label_2" / "000000.txt").write_text(
        "Car 0.00 0 -1.0 2.0 3.0 30.0 20.0 1.5 1.6 3.9 1.0 1.7 20.0 0.0\n")
    return root


def test_find_coco_split_layouts(tmp_path):
    from aidkd.data import find_coco_split

    a = tmp_path / "a"  # COCO's own layout
    _coco_split(a, "train2017", a / "train2017", [1, 2])
    _coco_split(a, "val2017", a / "val2017", [3])
    assert find_coco_split(a, "train") == (a / "annotations" / "instances_train2017.json", a / "train2017")
    assert find_coco_split(a, "val") == (a / "annotations" / "instances_val2017.json", a / "val2017")
    b = tmp_path / "b"  # images/<split>
    _coco_split(b, "val", b / "images" / "val", [3])
    assert find_coco_split(b, "val") == (b / "annotations" / "instances_val.json", b / "images" / "val")
    with pytest.raises(DatasetError, match=r"no annotations/instances_train\*\.json .*set data\.train_ann .*"
                                           r"data\.train_images"):
        find_coco_split(b, "train")
    (b / "images" / "val").rename(b / "elsewhere")
    with pytest.raises(DatasetError, match=r"no image folder for annotations/instances_val\.json \(looked for val, "
                                           r"images/val\)"):
        find_coco_split(b, "val")
    with pytest.raises(DatasetError, match="looks like a KITTI dataset"):
        find_coco_split(_kitti(tmp_path / "k"), "train")


def test_coco_root_config_trains_on_the_found_files(tmp_path):
    """format: coco with only a root (was a TypeError deep in resolve_classes)."""
    root = tmp_path / "coco"
    _coco_split(root, "train2017", root / "train2017", [1, 2, 5])
    _coco_split(root, "val2017", root / "val2017", [7])
    cfg = config_from_dict({"data": {"format": "coco", "root": str(root)}}).data
    dm = DetectionDataModule(cfg)
    assert dm.classes == ["person", "car"]
    dm.setup("fit")
    assert sorted(r.image_id for r in dm.train_set.records) == [1, 2, 5]
    assert [r.image_id for r in dm.val_set.records] == [7]
    # the resolved files are in the config a run writes (config.yaml)
    assert cfg.train_ann == str(root / "annotations" / "instances_train2017.json")
    assert cfg.val_images == str(root / "val2017")


def test_coco_root_errors_name_the_keys(tmp_path):
    root = tmp_path / "coco"
    _coco_split(root, "val2017", root / "val2017", [7])
    cfg = config_from_dict({"data": {"format": "coco", "root": str(root)}}).data
    with pytest.raises(DatasetError, match=r"coco: no annotations/instances_train\*\.json .*set data\.train_ann"):
        DetectionDataModule(cfg)
    with pytest.raises(ValueError, match=r"data\.train_ann and data\.train_images are required .* or data\.root"):
        DetectionDataModule(config_from_dict({"data": {"format": "coco"}}).data)
    kitti = config_from_dict({"data": {"format": "coco", "root": str(_kitti(tmp_path / "k"))}}).data
    with pytest.raises(DatasetError, match=r"looks like a KITTI dataset .*set data\.format: kitti"):
        DetectionDataModule(kitti)


def test_data_check_takes_a_coco_root(tmp_path, capsys):
    root = tmp_path / "coco"
    _coco_split(root, "train2017", root / "train2017", [1, 2])
    _coco_split(root, "val2017", root / "val2017", [3])
    assert check_dataset(root, fmt="coco") == []
    assert main(["data", "check", str(root), "--format", "coco"]) == 0
    assert "3 images (0 without boxes); 3 boxes: car 3" in capsys.readouterr().out
    (root / "val2017" / "3.jpg").unlink()  # the val split is checked too
    problems = check_dataset(root, fmt="coco")
    assert len(problems) == 1 and "3.jpg" in str(problems[0])
    assert main(["data", "check", str(_kitti(tmp_path / "k")), "--format", "coco"]) == 2
    assert "looks like a KITTI dataset" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty), "--format", "coco"]) == 2
    out = capsys.readouterr().err
    assert "no annotations/instances_train*.json" in out and "pass an instances json as ROOT" in out
    assert "Is a directory" not in out


@pytest.mark.skipif(not (SHARED / "coco_mini").is_dir(), reason="shared/data not present")
def test_shared_coco_mini_and_kitti_roots(capsys):
    cfg = config_from_dict({"data": {"format": "coco", "root": str(SHARED / "coco_mini")}}).data
    dm = DetectionDataModule(cfg)
    assert len(dm.classes) > 10 and cfg.val_images == str(SHARED / "coco_mini" / "val2017")
    kitti = config_from_dict({"data": {"format": "coco", "root": str(SHARED / "kitti_object_101")}}).data
    with pytest.raises(DatasetError, match="looks like a KITTI dataset"):
        DetectionDataModule(kitti)
    assert main(["data", "check", str(SHARED / "coco_mini"), "--format", "coco"]) == 0
    assert "159 images" in capsys.readouterr().out


def test_data_check_detects_a_coco_root_without_format(tmp_path, capsys):
    root = tmp_path / "coco"
    _coco_split(root, "train2017", root / "train2017", [1, 2])
    _coco_split(root, "val2017", root / "val2017", [3])
    assert main(["data", "check", str(root)]) == 0
    assert "3 images (0 without boxes); 3 boxes: car 3" in capsys.readouterr().out
