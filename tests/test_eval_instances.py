"""aidkd.eval.instances (`aidkd analyze`): per-instance teacher losses, AID weights and whether the teacher finds each
instance, checked on hand-built numbers and on a teacher whose losses and detections are monkeypatched."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from aidkd.engine.analysis import analyze, instance_rows
from aidkd.engine.config import config_from_dict
from aidkd.eval import instances as ins
from aidkd.models import build_detector, model_meta, ops, save_model_file

CLASSES = ["Car", "Pedestrian", "Cyclist"]


# ------------------------------------------------------------------------------------------------ pure pieces
def test_roc_auc_hand_cases():
    # pairs (pos, neg): (.9,.8) (.9,.1) (.3,.8) (.3,.1) -> 3 of 4 ranked right
    assert ins.roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    assert ins.roc_auc([0.5, 0.5, 0.5], [True, False, False]) == pytest.approx(0.5)  # ties count one half
    assert ins.roc_auc([1.0, 2.0], [True, False]) == 0.0
    assert math.isnan(ins.roc_auc([1.0, 2.0], [True, True]))


@pytest.mark.parametrize("height, occ, trunc, expected", [
    (45, 0, 0.0, "easy"), (45, 0, 0.2, "moderate"), (30, 1, 0.3, "moderate"), (30, 2, 0.5, "hard"),
    (24.9, 0, 0.0, "none"), (40, 3, 0.0, "none"), (40, 0, 0.6, "none")])
def test_kitti_difficulty(height, occ, trunc, expected):
    assert ins.kitti_difficulty(height, occ, trunc) == expected


def test_match_detections_uses_class_threshold_and_score():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0],
                       [60.0, 0.0, 70.0, 10.0]])
    labels = torch.tensor([1, 2, 2, 1])
    thr = [0.7, 0.5, 0.5, 0.7]
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 9.0],     # Car, IoU 0.9 with gt 0
                                  [20.0, 0.0, 30.0, 10.0],   # Car on the Pedestrian gt 1: wrong class
                                  [40.0, 0.0, 50.0, 6.0],    # Pedestrian, IoU 0.6 with gt 2, low score
                                  [60.0, 0.0, 70.0, 6.5]]),  # Car, IoU 0.65 with gt 3: below Car's 0.7
           "scores": torch.tensor([0.8, 0.9, 0.2, 0.95]), "labels": torch.tensor([1, 1, 2, 1])}
    best, score, found = ins.match_detections(gt, labels, thr, det, score_thresh=0.3)
    assert best == pytest.approx([0.9, 0.0, 0.6, 0.65])
    assert score == pytest.approx([0.8, 0.0, 0.2, 0.0])
    assert found == [True, False, False, False]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert ins.match_detections(gt, labels, thr, empty, 0.3) == ([0.0] * 4, [0.0] * 4, [False] * 4)


def _row(cls, loss, found, difficulty="moderate", hard="", mislabel=""):
    return {"class": cls, "teacher_loss": loss, "found": found, "difficulty": difficulty, "hard": hard,
            "mislabel": mislabel}


def test_summarize_means_contrast_auc_and_histograms():
    rows = [_row("Car", 0.0, True, "easy"), _row("Car", 1.0, True), _row("Pedestrian", 2.0, False, hard="blur"),
            _row("Cyclist", 10.0, False, "none", mislabel="class")]
    s = ins.summarize(rows, alpha=0.1)
    assert (s["instances"], s["found"], s["missed"]) == (4, 2, 2)
    assert list(s["by_alpha"]) == ["0.1", "0.3", "1"]
    a = s["by_alpha"]["0.1"]
    assert a["mean_found"] == pytest.approx((1 + math.exp(-0.1)) / 2)
    assert a["mean_missed"] == pytest.approx((math.exp(-0.2) + math.exp(-1.0)) / 2)
    assert a["contrast"] == pytest.approx(a["mean_found"] / a["mean_missed"])
    assert (a["min"], a["max"]) == pytest.approx((math.exp(-1.0), 1.0))
    one = s["by_alpha"]["1"]
    assert one["mean_missed"] == pytest.approx((math.exp(-2) + math.exp(-10)) / 2)
    assert s["auc_found_vs_missed"] == 1.0 and all(v["auc"] == 1.0 for v in s["by_alpha"].values())
    assert s["mean_loss_found"] == pytest.approx(0.5) and s["mean_loss_missed"] == pytest.approx(6.0)
    assert s["by_class"]["Car"]["instances"] == 2 and sum(s["by_class"]["Car"]["hist"]) == 2
    assert s["by_class"]["Car"]["hist"][-1] == 2  # w = 1 and 0.905 both in the top bin
    assert s["by_difficulty"]["none"]["hist"][3] == 1  # exp(-1) = 0.37
    assert set(s["by_difficulty"]) == {"easy", "moderate", "none"}
    flags = s["synth_flags"]
    assert flags["hard"]["instances"] == 1 and flags["hard"]["mean_weight"] == pytest.approx(math.exp(-0.2))
    assert flags["mislabel"]["auc_rest_vs_flagged"] == 1.0
    text = ins.format_summary(s)
    assert "ROC AUC of w (found vs missed): 1.000" in text and "(configured)" in text


def test_nothing_found_says_why_and_what_to_do_instead_of_nan():
    rows = [dict(_row("Car", 1.0, False), det_score=0.12), dict(_row("Car", 3.0, False), det_score=0.0)]
    s = dict(ins.summarize(rows, alpha=0.1), score_thresh=0.3)
    assert s["found"] == 0 and s["best_det_score"] == pytest.approx(0.12)
    text = ins.format_summary(s)
    assert "nan" not in text.lower()
    assert "the teacher finds none of them at score >= 0.3" in text and "best-scoring matching detection scores 0.12" \
        in text and "Train the teacher longer, or lower --score-thresh (e.g. to 0.11)" in text
    mean = (math.exp(-0.1) + math.exp(-0.3)) / 2  # the weights are still shown, per alpha
    assert f"{mean:6.3f}  (configured)" in text
    none = dict(ins.summarize([_row("Car", 1.0, False)], alpha=0.1), score_thresh=0.3)
    assert "no detection overlapping an instance" in ins.format_summary(none)


def test_summarize_configured_alpha_comes_first_without_duplicates():
    rows = [_row("Car", 1.0, True), _row("Car", 3.0, False)]
    assert list(ins.summarize(rows, alpha=0.3)["by_alpha"]) == ["0.3", "0.1", "1"]
    assert list(ins.summarize(rows, alpha=2.0)["by_alpha"]) == ["2", "0.1", "0.3", "1"]


# ------------------------------------------------------------------------------------------------ with a model
@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    m = build_detector("gfl", "resnet18", 4, min_size=64, max_size=192, fpn_channels=16)
    return save_model_file(tmp_path / "teacher.pt", m, model_meta(m, CLASSES, 64, 192, {}))


@pytest.fixture
def known_teacher(monkeypatch):
    """A teacher whose losses are 0 on cars and 5 elsewhere (cls 1/5 of it), and which detects exactly the cars."""
    seen: list = []

    def losses(model, images, feats, targets, outputs=None):
        seen[:] = targets
        return ops.TeacherLosses([torch.where(t["labels"] == 1, 0.0, 5.0) for t in targets], torch.zeros(5))

    def parts(model, images, feats, targets, outputs=None):
        per = [torch.where(t["labels"] == 1, 0.0, 5.0) for t in targets]
        return {"cls": [p / 5 for p in per], "box": [p * 4 / 5 for p in per]}

    def predict(model, images, feats, outputs=None):
        return [{"boxes": t["boxes"][t["labels"] == 1], "scores": torch.full((int((t["labels"] == 1).sum()),), 0.9),
                 "labels": t["labels"][t["labels"] == 1]} for t in seen]

    monkeypatch.setattr(ops, "teacher_losses", losses)
    monkeypatch.setattr(ops, "teacher_loss_parts", parts)
    monkeypatch.setattr(ops, "predict", predict)


def _cfg(tiny_cfg, **extra):
    return config_from_dict(tiny_cfg(model={"arch": "gfl"}, **extra))


def test_collect_rows_from_a_known_teacher(tiny_cfg, teacher_file, known_teacher, synth_root):
    cfg = _cfg(tiny_cfg)
    rows = instance_rows(cfg, teacher_file, split="val")
    assert rows and {r["class"] for r in rows} <= set(CLASSES)
    for r in rows:
        car = r["class"] == "Car"
        assert r["found"] is car and r["det_score"] == pytest.approx(0.9 if car else 0.0)
        assert r["teacher_loss"] == (0.0 if car else 5.0)
        assert r["teacher_loss_cls"] + r["teacher_loss_box"] == pytest.approx(r["teacher_loss"])
        assert r["weight"] == pytest.approx(1.0 if car else math.exp(-0.5))  # alpha 0.1, no distill section
        assert r["weight_a1"] == pytest.approx(1.0 if car else math.exp(-5.0))
        assert r["height"] == pytest.approx(r["y2"] - r["y1"])
    # the rows are the label lines of the positives: class and box as in the label file, synth flags from the meta
    meta = json.loads((synth_root / "synth_meta.json").read_text())["frames"]
    for r in rows:
        line = (synth_root / "training" / "label_2" / f"{r['stem']}.txt").read_text().splitlines()[r["label_line"] - 1]
        assert line.split()[0] == r["class"] and float(line.split()[4]) == pytest.approx(r["x1"], abs=0.01)
        m = meta[r["stem"]]["objects"][r["label_line"] - 1]
        assert r["hard"] == ";".join(m["hard"]) and r["mislabel"] == (m["mislabel"] or "")


def test_cli_writes_csv_summary_plot(tiny_cfg, teacher_file, known_teacher, tmp_path, capsys):
    import yaml

    from aidkd.cli.main import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(model={"arch": "gfl"}, distill={
        "teacher": {"checkpoint": str(teacher_file)}, "methods": [{"name": "fitnet"}], "aid": {"alpha": 0.3}})))
    out = tmp_path / "run" / "analysis"
    assert main(["analyze", str(cfg_path), "--teacher", str(teacher_file), "--student", str(teacher_file),
                 "--out", str(out)]) == 0
    with (out / "instances.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ins.COLUMNS + ins.STUDENT_COLUMNS
        rows = list(reader)
    s = json.loads((out / "summary.json").read_text())
    cars = sum(r["class"] == "Car" for r in rows)
    assert s["alpha"] == 0.3 and list(s["by_alpha"]) == ["0.3", "0.1", "1"]
    assert (s["instances"], s["found"]) == (len(rows), cars) and 0 < cars < len(rows)
    assert s["auc_found_vs_missed"] == 1.0
    assert s["by_alpha"]["0.3"]["mean_found"] == 1.0
    assert s["by_alpha"]["0.3"]["mean_missed"] == pytest.approx(math.exp(-1.5))
    assert s["student"]["found"] == cars  # the same known model as student
    assert (out / "weights.png").read_bytes()[:4] == b"\x89PNG"
    assert "ROC AUC of w (found vs missed): 1.000" in capsys.readouterr().out
    parsed = ins.read_csv(out / "instances.csv")
    assert [r["found"] for r in parsed] == [r["class"] == "Car" for r in parsed]
    assert {r["teacher_loss"] for r in parsed} == {0.0, 5.0}
    html = ins.analysis_html(out)
    assert "ROC AUC of w for found vs missed: 1.000" in html and "data:image/png;base64," in html


def test_no_instances_is_an_error(tiny_cfg, tmp_path):
    m = build_detector("gfl", "resnet18", 2, min_size=64, max_size=192, fpn_channels=16)
    tram = save_model_file(tmp_path / "tram.pt", m, model_meta(m, ["Tram"], 64, 192, {}))
    cfg = _cfg(tiny_cfg, data={"classes": ["Tram"], "ignore_classes": []})
    with pytest.raises(ValueError, match="no ground-truth instance"):
        analyze(cfg, tram, tmp_path / "a")


def test_report_shows_the_analysis_folder(tmp_path):
    from aidkd.engine.config import dump_config
    from aidkd.report import build_report

    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    dump_config(config_from_dict({"name": "run", "output_dir": str(run), "model": {"arch": "gfl"},
                                  "data": {"format": "kitti", "root": str(tmp_path / "missing")}}),
                run / "config.yaml")
    rows = [_row("Car", 0.5, True), _row("Car", 4.0, False)]
    summary = ins.summarize(rows, alpha=0.1)
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    ins.plot_weights(rows, summary, run / "analysis" / "weights.png")
    page = build_report(run).read_text()
    assert 'id="analysis"' in page and "ROC AUC of w for found vs missed: 1.000" in page
    assert f"{math.exp(-0.05):.3f}" in page  # mean w of the found instance at alpha 0.1


def test_analyze_refuses_a_folder_that_is_not_an_analysis(tiny_cfg, teacher_file, tmp_path):
    """`--out` pointing at a dataset or run folder would overwrite files there: refused before anything is read or
    written; an earlier analysis folder is replaced."""
    from aidkd.cli.main import main
    from aidkd.engine.analysis import check_analysis_folder

    data = tmp_path / "dataset"
    data.mkdir()
    (data / "summary.json").write_text("user's file")
    (data / "labels.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*dataset holds files that are not an earlier analysis \(labels.txt\)"):
        analyze(_cfg(tiny_cfg), teacher_file, data)
    assert (data / "summary.json").read_text() == "user's file"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_analysis_folder(tmp_path / "afile")
    earlier = tmp_path / "analysis"
    earlier.mkdir()
    (earlier / "instances.csv").write_text("old")
    check_analysis_folder(earlier)  # an earlier analysis may be replaced
    check_analysis_folder(tmp_path / "new")
    assert not (tmp_path / "new").exists()

    import yaml

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(model={"arch": "gfl"})))
    assert main(["analyze", str(cfg_path), "--teacher", str(teacher_file), "--out", str(data)]) == 2


def test_analyze_advice_states_the_mean_weakening_and_its_control():
    """AID measured as teacher-aware weakening: the advice gives the mean weight at the configured alpha (found and
    missed apart when both exist) and the uniformly weakened KD to compare with."""
    rows = [_row("Car", 0.0, True), _row("Car", 1.0, True), _row("Car", 4.0, False)]
    s = ins.summarize(rows, alpha=0.5)
    text = ins.weakening_advice(s)
    mean = (1 + math.exp(-0.5) + math.exp(-2.0)) / 3
    assert f"at alpha 0.5 AID scales the distillation terms by {mean:.2f} on average" in text
    assert f"{(1 + math.exp(-0.5)) / 2:.2f} on the instances the teacher finds, {math.exp(-2.0):.2f} on those" in text
    assert f"distill.loss_scale x {mean:.2f}" in text and "teacher-aware weakening" in text
    none_found = ins.weakening_advice(ins.summarize([_row("Car", 1.0, False)], alpha=0.1))
    assert "nan" not in none_found.lower() and "on the instances the teacher finds" not in none_found
