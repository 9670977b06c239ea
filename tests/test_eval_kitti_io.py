"""KITTI prediction files and directory evaluation."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from aidkd.data.structures import DatasetError
from aidkd.eval.kitti_ap import Detection
from aidkd.eval.kitti_io import (
    evaluate_kitti_dirs,
    evaluate_kitti_dirs_full,
    format_kitti_table,
    format_prediction_line,
    read_kitti_predictions,
    write_kitti_predictions,
)

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def label_line(cls, box, trunc=0.0, occ=0):
    x1, y1, x2, y2 = box
    return f"{cls} {trunc:.2f} {occ} -1.57 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 1.50 1.60 3.90 1.00 1.50 20.00 0.00\n"


def test_write_read_round_trip(tmp_path):
    pred = {"boxes": torch.tensor([[10.0, 20.0, 110.5, 70.25], [0.0, 0.0, 5.0, 30.0]]),
            "scores": torch.tensor([0.9, 0.123456789]), "labels": torch.tensor([1, 2])}
    path = write_kitti_predictions(tmp_path / "sub" / "000001.txt", pred, CLASSES)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    f = lines[0].split()
    assert len(f) == 16
    # type trunc occ alpha | bbox | h w l | x y z | rot_y | score  (unknowns as the devkit expects them)
    assert f[0] == "Car" and f[1:4] == ["-1", "-1", "-10.00"]
    assert [float(v) for v in f[4:8]] == [10.0, 20.0, 110.5, 70.25]
    assert f[8:15] == ["-1", "-1", "-1", "-1000", "-1000", "-1000", "-10"]
    assert float(f[15]) == pytest.approx(0.9)
    dets = read_kitti_predictions(path)
    assert dets[0].cls == "Car" and dets[0].box == (10.0, 20.0, 110.5, 70.25) and dets[0].alpha == -10.0
    assert dets[0].score == pytest.approx(0.9)  # a float32 tensor: 0.89999998
    assert dets[1].cls == "Pedestrian" and dets[1].score == pytest.approx(0.123456789, abs=1e-8)


def test_write_other_inputs(tmp_path):
    p = write_kitti_predictions(tmp_path / "a.txt", [Detection("Cyclist", (1, 2, 3, 4), 0.5), ("Car", (0, 0, 9, 9), 0.25),
                                                     (2, np.array([1.0, 1.0, 2.0, 2.0]), 0.1)], CLASSES)
    assert [d.cls for d in read_kitti_predictions(p)] == ["Cyclist", "Car", "Pedestrian"]
    empty = write_kitti_predictions(tmp_path / "b.txt", {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}, CLASSES)
    assert empty.read_text() == "" and read_kitti_predictions(empty) == []
    with pytest.raises(ValueError, match="label"):
        write_kitti_predictions(tmp_path / "c.txt", {"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [4]}, CLASSES)
    with pytest.raises(ValueError, match="class_names"):
        write_kitti_predictions(tmp_path / "c.txt", {"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [1]})
    assert format_prediction_line("Person sitting", (0, 0, 1, 1), 0.5).startswith("Person%20sitting -1 -1 ")


@pytest.mark.parametrize("line, match", [
    ("Car -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10", "expected 16 fields"),
    ("Car -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10 0.5 7", "expected 16 fields"),
    ("Car -1 -1 -10 1 2 abc 4 -1 -1 -1 -1000 -1000 -1000 -10 0.5", "not a number"),
    ("Car -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10 nan", "not finite"),
    ("Car -1 -1 -10 5 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10 0.5", "x2 < x1"),
])
def test_malformed_prediction_lines(tmp_path, line, match):
    good = "Car -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10 0.5"
    path = tmp_path / "000007.txt"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DatasetError, match=match) as e:
        read_kitti_predictions(path)
    assert e.value.file == str(path) and e.value.line == 3
    assert "000007.txt:3:" in str(e.value)


def _make_dirs(tmp_path, n_cars=41):
    """41 cars over 3 frames, all found (-> Car 100 %); frame 000002 has a pedestrian nobody found and no
    prediction file at all; a DontCare region with a detection inside it in frame 000000."""
    gt, pr = tmp_path / "label_2", tmp_path / "pred"
    gt.mkdir()
    pr.mkdir()
    boxes = [(5.0 + 30 * (i % 40), 100.0 + 60 * (i // 40), 30.0 + 30 * (i % 40), 150.0 + 60 * (i // 40))
             for i in range(n_cars)]
    (gt / "000000.txt").write_text("".join(label_line("Car", b) for b in boxes[:20])
                                   + "DontCare -1 -1 -10 0.00 300.00 100.00 370.00 -1 -1 -1 -1000 -1000 -1000 -10\n")
    (gt / "000001.txt").write_text("".join(label_line("Car", b) for b in boxes[20:]))
    (gt / "000002.txt").write_text(label_line("Pedestrian", (10, 10, 30, 80)))
    write_kitti_predictions(pr / "000000.txt", [("Car", b, 0.5 + 0.01 * i) for i, b in enumerate(boxes[:20])]
                            + [("Car", (10, 310, 60, 360), 0.99)])
    write_kitti_predictions(pr / "000001.txt", [("Car", b, 0.3 + 0.001 * i) for i, b in enumerate(boxes[20:])])
    return gt, pr


def test_evaluate_dirs(tmp_path):
    gt, pr = _make_dirs(tmp_path)
    res = evaluate_kitti_dirs(gt, pr)
    assert list(res) == ["Car", "Pedestrian", "Cyclist"]
    assert res["Car"] == {"easy": 100.0, "moderate": 100.0, "hard": 100.0}
    assert res["Pedestrian"] == {"easy": 0.0, "moderate": 0.0, "hard": 0.0}  # a gt, no prediction file
    assert all(math.isnan(v) for v in res["Cyclist"].values())
    full = evaluate_kitti_dirs_full(gt, pr)
    assert full.num_gt["Car"]["moderate"] == 41
    table = format_kitti_table(res)
    assert "| Car | 100.00 | 100.00 | 100.00 |" in table and "| Cyclist | n/a | n/a | n/a |" in table
    assert "| **mean** | 50.00 | 50.00 | 50.00 |" in table
    assert format_kitti_table(full) == table
    # restricted to some frames
    part = evaluate_kitti_dirs(gt, pr, stems=["000000", "000001"])
    assert math.isnan(part["Pedestrian"]["easy"])


def test_evaluate_dirs_errors(tmp_path):
    gt, pr = _make_dirs(tmp_path)
    (pr / "000099.txt").write_text("")
    with pytest.raises(DatasetError, match="no label file") as e:
        evaluate_kitti_dirs(gt, pr)
    assert "000099.txt" in str(e.value)
    (pr / "000099.txt").unlink()
    with pytest.raises(DatasetError, match="not a directory"):
        evaluate_kitti_dirs(gt, tmp_path / "missing")
    (pr / "000001.txt").write_text("Car 1 2 3\n")
    with pytest.raises(DatasetError) as e:
        evaluate_kitti_dirs(gt, pr)
    assert e.value.line == 1 and e.value.file.endswith("000001.txt")
    (gt / "000001.txt").write_text("Car 0.00 0 -1.57 10 20 30\n")  # malformed label: the data reader's error
    with pytest.raises(DatasetError) as e:
        evaluate_kitti_dirs(gt, pr)
    assert e.value.file.endswith("000001.txt") and e.value.line == 1


def test_label_files_without_predictions_are_counted_in_a_warning(tmp_path, caplog):
    gt, pr = _make_dirs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aidkd.eval"):
        evaluate_kitti_dirs(gt, pr)
    assert "1 of 3 label files have no prediction file" in caplog.text and "000002.txt" in caplog.text
    assert "--split FILE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aidkd.eval"):
        evaluate_kitti_dirs(gt, pr, stems=["000000", "000001"])
    assert "no prediction file" not in caplog.text


def test_eval_kitti_cli_split_file(tmp_path, capsys):
    from aidkd.cli.main import main

    gt, pr = _make_dirs(tmp_path)
    split = tmp_path / "val.txt"
    split.write_text("000000\n000001\n")
    out = tmp_path / "r.json"
    assert main(["eval-kitti", str(gt), str(pr), "--split", str(split), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["Car"]["moderate"] == 100.0 and res["Pedestrian"]["easy"] is None  # the miss is out of the split
    assert main(["eval-kitti", str(gt), str(pr), "--json", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["Pedestrian"]["easy"] == 0.0


def test_class_names_with_spaces_round_trip(tmp_path):
    path = write_kitti_predictions(tmp_path / "p.txt", [("fire hydrant", (1, 2, 3, 4), 0.5),
                                                         ("100%\tsure", (1, 2, 3, 4), 0.25), ("Car", (1, 2, 3, 4), 0.1)])
    first = path.read_text().splitlines()[0]
    assert first.split()[0] == "fire%20hydrant" and len(first.split()) == 16
    assert [d.cls for d in read_kitti_predictions(path)] == ["fire hydrant", "100%\tsure", "Car"]
    with pytest.raises(ValueError, match="empty"):
        write_kitti_predictions(tmp_path / "q.txt", [("", (1, 2, 3, 4), 0.5)])
