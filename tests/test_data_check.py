"""check_dataset lists every problem with its location."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aidkd.data import DatasetError, check_dataset, combine_errors, sort_errors

CAR = "Car 0.00 0 0 1 1 10 10 1 1 1 1 1 1 1"


def png(path: Path, w: int = 40, h: int = 20) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8) + 90).save(path)
    return path.read_bytes()


def broken_kitti(tmp_path) -> Path:
    """A KITTI root with nine problems of seven kinds."""
    root = tmp_path / "k"
    img, lbl = root / "training" / "image_2", root / "training" / "label_2"
    for i in range(6):
        png(img / f"00000{i}.png")
    lbl.mkdir(parents=True)
    (lbl / "000000.txt").write_text(CAR + "\n")
    (lbl / "000001.txt").write_text(CAR + "\nCar 0 0 0 1 1 10\nTrain 0 0 0 1 1 10 10 1 1 1 1 1 1 1\n")
    (lbl / "000002.txt").write_text("Car 0.00 0 0 1 1 45 10 1 1 1 1 1 1 1\n")  # outside the 40x20 image
    (lbl / "000003.txt").write_text(CAR + "\n")
    (img / "000003.png").write_bytes((img / "000003.png").read_bytes()[:-30])  # truncated
    (lbl / "000004.txt").write_text(CAR + "\n")
    (img / "000004.png").write_bytes(b"")
    # 000005.png has no label; 000006.txt has no image
    (lbl / "000006.txt").write_text("")
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("000000\n000001\n000042\n")
    (root / "ImageSets" / "val.txt").write_text("000001\n000002\n")
    return root


def test_kitti_every_problem(tmp_path):
    root = broken_kitti(tmp_path)
    errs = check_dataset(root)
    assert all(isinstance(e, DatasetError) for e in errs)
    got = sorted(f"{Path(e.file).name}:{e.line}" for e in errs)
    assert got == sorted([
        "000001.txt:2", "000001.txt:3", "000002.txt:1", "000003.png:None", "000004.png:None",
        "000005.png:None", "000006.txt:None", "train.txt:3", "val.txt:1",
    ]), [e.format() for e in errs]
    text = "\n".join(e.format() for e in errs)
    assert "000001.txt:2: expected 15 fields, got 7" in text
    assert "000001.txt:3: unknown class 'Train'" in text
    assert "000002.txt:1: box (1, 1, 45, 10) is outside the 40x20 image" in text
    assert re.search(r"000003\.png: .*truncated", text)
    assert "000004.png: image file is empty" in text
    assert "000005.png: image has no label file" in text
    assert "000006.txt: label file has no image" in text
    assert "train.txt:3: frame '000042' has neither an image nor a label file" in text
    assert "val.txt:1: frame '000001' is in both train.txt (line 2) and val.txt" in text


def test_coco_every_problem(tmp_path):
    imgdir = tmp_path / "imgs"
    png(imgdir / "a.png", 40, 20)
    png(imgdir / "b.png", 40, 20)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 41, "height": 20},
                   {"id": 3, "file_name": "c.png", "width": 40, "height": 20},
                   {"id": 3, "file_name": "d.png", "width": 40, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
                        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5]},
                        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5]},
                        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5]},
                        {"id": 5, "image_id": 1, "category_id": 1}],
        "categories": [{"id": 1, "name": "car"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    errs = check_dataset(ann, fmt="auto", image_dir=imgdir)
    located = sorted(e.location for e in errs if e.location)
    assert located == ["annotations[1].image_id", "annotations[2].category_id", "annotations[3].bbox",
                       "annotations[4].bbox", "images[3].id"]
    files = sorted(Path(e.file).name for e in errs if not e.location)
    assert files == ["b.png", "c.png"]  # size mismatch, missing image


def test_clean_dataset_and_combine(tmp_path):
    root = tmp_path / "k"
    png(root / "training" / "image_2" / "000000.png")
    (root / "training" / "label_2").mkdir(parents=True)
    (root / "training" / "label_2" / "000000.txt").write_text(CAR + "\n")
    assert check_dataset(root) == []
    errs = [DatasetError("a", file="f", line=1), DatasetError("b", file="g", location="x")]
    c = combine_errors(errs, what="thing")
    assert str(c) == "f:1: 2 problems in thing:\n  f:1: a\n  g [x]: b" and c.problems == errs


def test_train_reports_every_problem_of_data_check(tmp_path, capsys):
    """`train` runs the same full check as `aidkd data check`: every problem, the same messages, the root named."""
    from aidkd.cli.main import main
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import train

    root = broken_kitti(tmp_path)
    expected = [e.format() for e in sort_errors(check_dataset(root))]
    assert len(expected) == 9
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "data": {"format": "kitti", "root": str(root)},
                            "model": {"fpn_channels": 16}})
    with pytest.raises(DatasetError) as e:
        train(cfg)
    assert [p.format() for p in e.value.problems] == expected
    assert str(e.value).startswith(f"{root}: 9 problems in {root}")
    assert all(line in str(e.value) for line in expected)
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run2'}\ndata: {{format: kitti, root: {root}}}\n")
    assert main(["train", str(path)]) == 2
    out = "".join(capsys.readouterr().err.split())  # errors go to stderr; whitespace-free: rich wraps long lines
    assert [line for line in expected if "".join(line.split()) not in out] == []
