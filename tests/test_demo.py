"""`aidkd demo`: the README's main command. Its plan, reuse and summaries (pure or with a fake `train`) and a
--quick run end to end."""
import json

import pytest
import torch

from aidkd.data import generate_synth, load_kitti_records
from aidkd.engine import demo
from aidkd.engine.config import config_from_dict, dump_config
from aidkd.engine.demo import (
    AIDWeightLog,
    data_folder,
    demo_configs,
    results_table,
    row_names,
    run_demo,
    summarize_aid,
)


def test_demo_plan(tmp_path):
    cfgs = demo_configs(tmp_path)
    assert list(cfgs) == ["teacher", "student", "kd", "kd_aid", "head_aid"]
    t, s = cfgs["teacher"], cfgs["student"]
    assert t["train"]["epochs"] > s["train"]["epochs"], "the teacher needs the longer schedule to be the better model"
    # the teacher is the costlier model: ResNet-18 with a 64-channel FPN vs MobileNetV3-small with 32 channels
    assert (t["model"]["backbone"], t["model"]["fpn_channels"]) == ("resnet18", 64)
    assert (s["model"]["backbone"], s["model"]["fpn_channels"]) == ("mobilenet_v3_small", 32)
    for name in ("student", "kd", "kd_aid", "head_aid"):  # one schedule, one model, one data setting for every student run
        assert cfgs[name]["train"] == s["train"] and cfgs[name]["model"] == s["model"]
        assert cfgs[name]["data"] == dict(t["data"], hflip=0.0)  # one teacher-loss cache entry an image
    for raw in cfgs.values():  # one validation, at the end of a cosine schedule
        assert raw["train"]["val_every"] == raw["train"]["epochs"] and raw["train"]["scheduler"] == "cosine"
    assert cfgs["kd"]["distill"]["aid"]["enabled"] is False and cfgs["kd_aid"]["distill"]["aid"]["enabled"] is True
    assert cfgs["kd"]["distill"]["loss_scale"] == cfgs["kd_aid"]["distill"]["loss_scale"] < 1
    assert cfgs["kd_aid"]["distill"]["teacher"]["checkpoint"] == str(tmp_path / "teacher" / "model_best.pt")
    head = cfgs["head_aid"]["distill"]  # the head method, normalised like the detection loss, with the same AID
    assert [m["name"] for m in head["methods"]] == ["cross_head"] and head["loss_scale"] == 1.0
    assert head["aid"] == cfgs["kd_aid"]["distill"]["aid"] and head["teacher"] == cfgs["kd_aid"]["distill"]["teacher"]
    # the easy profile: cars only, near (large) objects; generated and evaluated classes agree
    assert t["data"]["classes"] == t["data"]["synth"]["classes"] == ["Car"] and t["data"]["synth"]["min_t"] > 0
    assert t["data"]["root"] == str(data_folder(tmp_path)) and data_folder(tmp_path).parent == tmp_path / "data"
    for raw in cfgs.values():
        config_from_dict(raw)  # every config is valid
    assert demo_configs(tmp_path, arch="retinanet")["student"]["model"]["kwargs"] == {"anchor_size": 16}
    assert demo_configs(tmp_path)["student"]["model"]["arch"] == "gfl"
    quick = demo_configs(tmp_path, quick=True)
    assert quick["teacher"]["data"]["synth"]["num_images"] < t["data"]["synth"]["num_images"]
    assert data_folder(tmp_path, quick=True) != data_folder(tmp_path)


def test_data_folder_follows_the_generator_settings(tmp_path, monkeypatch):
    before = data_folder(tmp_path)
    monkeypatch.setattr(demo, "DEMO_SYNTH", dict(demo.DEMO_SYNTH, min_t=0.4))
    assert data_folder(tmp_path) != before  # a changed profile never reuses scenes made for the old one


def test_results_table():
    m = {"coco/AP": 20.04, "coco/AP50": 40.0, "coco/AP/Car": 30.0, "coco/AP/Pedestrian": 10.0, "voc/mAP50": 38.0,
         "kitti/moderate_mAP": 33.3}
    results = {"teacher": {"metrics": m, "seconds": 80.2, "reused": True},
               "student": {"metrics": {"coco/AP": 5.0}, "seconds": 30.4, "reused": False}}
    lines = results_table(results, {"teacher": "T"}, ["Car"]).splitlines()
    assert lines[0] == "| run | COCO AP | AP50 | VOC mAP@0.5 | KITTI moderate mAP | train s |"
    assert lines[2] == "| T | 20.0 | 40.0 | 38.0 | 33.3 | reused |"
    assert lines[3] == "| student | 5.0 | nan | nan | nan | 30 |"
    two = results_table(results, None, ["Car", "Pedestrian"]).splitlines()
    assert two[0].startswith("| run | COCO AP | AP50 | AP Car | AP Pedestrian | VOC") and two[1] == "|---" * 8 + "|"
    assert two[2].split(" | ")[3:5] == ["30.0", "10.0"]


def test_row_names(tmp_path):
    names = row_names(demo_configs(tmp_path, quick=True))
    assert names["teacher"] == "teacher (resnet18, 1 epoch)"
    assert names["student"] == "student (mobilenet_v3_small, 1 epoch) alone"
    assert row_names(demo_configs(tmp_path))["teacher"].endswith(f"{demo.EPOCHS[False][0]} epochs)")


def test_summarize_aid(tmp_path):
    root = generate_synth(tmp_path / "s", 6, seed=0, classes=["Car"], min_t=0.3, mislabel_fraction=0.5,
                          hard_fraction=0.5)
    kinds = demo._instance_kinds(root, ["Car"])
    records = {r.image_id: r for r in load_kitti_records(root, "train") + load_kitti_records(root, "val")}
    assert {i: len(k) for i, k in kinds.items()} == {i: sum(o.cls == "Car" for o in r.objects)
                                                    for i, r in records.items()}
    log = AIDWeightLog()
    weight_of = {"clean": 0.9, "hard": 0.5, "mislabelled": 0.2}
    for image_id, k in kinds.items():
        log.per_image[image_id] = [weight_of[x] for x in k]
        log.weights += log.per_image[image_id]
    s = summarize_aid(log, root, ["Car"])
    flat = [x for k in kinds.values() for x in k]
    assert s["instances"] == len(flat) > 0 and s["below_0.5"] == flat.count("mislabelled")
    assert s["min"] == min(log.weights) and s["max"] == max(log.weights)
    assert s["mean"] == pytest.approx(sum(log.weights) / len(flat))
    assert next(iter(s["by_kind"])) == "clean" and set(s["by_kind"]) <= {"clean", "hard", "mislabelled"}
    for kind, v in s["by_kind"].items():
        assert v == {"instances": flat.count(kind), "mean": pytest.approx(weight_of[kind])}
    log.per_image[next(iter(kinds))].append(1.0)  # instances that do not match the metadata: no breakdown
    assert "by_kind" not in summarize_aid(log, root, ["Car"])
    assert summarize_aid(AIDWeightLog(), root, ["Car"]) == {"instances": 0}
    text = demo.aid_summary_text(s)
    assert f"{s['instances']} ground-truth instances" in text and f"mean {s['mean']:.3f}" in text


def _fake_train(tmp_path, calls, interrupt_at=None):
    """A `train` that records its calls and writes what a run writes; ``interrupt_at``: the run name that is
    stopped as Ctrl-C stops a run (config and checkpoint written, no final metrics, SystemExit)."""

    def fake_train(cfg, extra_callbacks=(), overwrite=False, resume=None, resume_hint=None):
        calls.append((cfg.name, "resume" if resume else "overwrite" if overwrite else "new", resume_hint))
        out = tmp_path / "demo" / cfg.name
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        if cfg.name == interrupt_at:
            (out / "checkpoints").mkdir(exist_ok=True)
            torch.save({}, out / "checkpoints" / "interrupted.ckpt")
            raise SystemExit(1)
        metrics = {"coco/AP": float(len(calls))}
        (out / "final_metrics.json").write_text(json.dumps(metrics))
        torch.save({}, out / "model_best.pt")
        return metrics

    return fake_train


@pytest.fixture
def no_analysis(monkeypatch):
    monkeypatch.setattr("aidkd.engine.demo.analyze_teacher", lambda raw, out_dir: {
        "instances": 2, "found": 1, "score_thresh": 0.3, "alpha": 0.1, "mean_w_found": 0.9, "mean_w_missed": 0.8,
        "auc": 1.0, "folder": str(out_dir)})  # the fake teacher file cannot be analysed


def test_reuse_and_fresh(tmp_path, monkeypatch, no_analysis):
    """The demo owns its folder: a second run reuses every finished stage of the same configuration; --fresh, or a
    changed teacher config, trains it again and, with it, KD and KD + AID (fake `train`)."""
    calls = []
    monkeypatch.setattr("aidkd.engine.run.train", _fake_train(tmp_path, calls))
    out = tmp_path / "demo"
    first = run_demo(out, quick=True)
    assert [c[:2] for c in calls] == [(n, "overwrite") for n in ("teacher", "student", "kd", "kd_aid", "head_aid")]
    assert not any(r["reused"] for r in first.values())
    calls.clear()
    second = run_demo(out, quick=True)
    assert calls == [] and all(r["reused"] for r in second.values())
    assert {n: r["metrics"] for n, r in second.items()} == {n: r["metrics"] for n, r in first.items()}
    assert (out / "results.md").read_text().count("| reused |") == 5
    (out / "data" / "keep.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "data" / "keep.txt").write_text("x")
    run_demo(out, quick=True, fresh=True)
    assert [c[0] for c in calls] == ["teacher", "student", "kd", "kd_aid", "head_aid"]
    assert not (out / "data" / "keep.txt").exists()
    calls.clear()
    monkeypatch.setattr(demo, "EPOCHS", {True: (2, 1), False: demo.EPOCHS[False]})
    printed = []
    monkeypatch.setattr(demo.console, "print", lambda *a, **k: printed.append(str(a[0]) if a else ""))
    run_demo(out, quick=True)
    assert [c[0] for c in calls] == ["teacher", "kd", "kd_aid", "head_aid"], "the student does not depend on it"
    assert any(line.endswith("teacher: the run there is of another configuration") for line in printed)
    assert any(line.endswith("kd: its teacher was trained again") for line in printed)
    calls.clear()
    (out / "student" / "final_metrics.json").write_text("{}")  # a run stopped before its validation, no checkpoint
    run_demo(out, quick=True)
    assert [c[:2] for c in calls] == [("student", "overwrite")]


def test_an_interrupted_demo_resumes_where_it_stopped(tmp_path, monkeypatch, no_analysis):
    """A second `aidkd demo` resumes the half-trained teacher (never overwrites it) and the interrupt message says
    to run the demo again, not `--resume FILE` which `aidkd demo` does not take."""
    calls = []
    monkeypatch.setattr("aidkd.engine.run.train", _fake_train(tmp_path, calls, interrupt_at="teacher"))
    out = tmp_path / "demo"
    with pytest.raises(SystemExit):
        run_demo(out, quick=True)
    assert [c[:2] for c in calls] == [("teacher", "overwrite")]
    assert calls[0][2] == f"run `aidkd demo --quick --out {out}` again to resume the demo"
    calls.clear()
    monkeypatch.setattr("aidkd.engine.run.train", _fake_train(tmp_path, calls))
    run_demo(out, quick=True)
    assert [c[:2] for c in calls] == [("teacher", "resume"), ("student", "overwrite"), ("kd", "overwrite"),
                                      ("kd_aid", "overwrite"), ("head_aid", "overwrite")]
    assert demo.demo_command(demo.Path(demo.DEFAULT_OUT), False, "fcos") == "aidkd demo --arch fcos"


def test_torch_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, threads in ((0.2, 4), (1.6, 2), (3.4, 1), (9.0, 1)):
        monkeypatch.setattr(demo.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert demo.cpu_threads() == (threads, 4, load)


def same(a: dict, b: dict) -> bool:
    """Equal metrics, NaN included (an AP of a size range without boxes is NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.timeout(300)
def test_quick_demo_writes_the_table(tmp_path, capsys):
    results = run_demo(tmp_path, quick=True)
    assert list(results) == ["teacher", "student", "kd", "kd_aid", "head_aid"]
    for r in results.values():
        assert 0.0 <= r["metrics"]["coco/AP"] <= 100.0 and r["seconds"] > 0 and r["reused"] is False
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| run | COCO AP") and table[2].startswith("| teacher (resnet18, 1 epoch) |")
    assert len([line for line in table if line.startswith("|")]) == 2 + 5
    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()
    for name in results:
        assert (tmp_path / name / "model_best.pt").exists()
    # one AID weight per training instance of the last epoch (one epoch: every training image once)
    records = load_kitti_records(data_folder(tmp_path, quick=True), "train")
    s = results["kd_aid"]["aid_weights"]
    assert s["instances"] == sum(o.cls == "Car" for r in records for o in r.objects) > 0
    assert 0.0 < s["min"] <= s["mean"] <= s["max"] <= 1.0
    assert sum(v["instances"] for v in s["by_kind"].values()) == s["instances"]
    # the teacher's findings on the validation split (aidkd analyze): every val instance counted once
    a = results["kd_aid"]["teacher_analysis"]
    val = load_kitti_records(data_folder(tmp_path, quick=True), "val")
    assert a["instances"] == sum(o.cls == "Car" for r in val for o in r.objects) > 0
    assert 0 <= a["found"] <= a["instances"] and (tmp_path / "kd_aid" / "analysis" / "instances.csv").exists()
    captured = capsys.readouterr()
    printed = captured.out
    assert f"aidkd report {tmp_path}" in printed.replace("\n", "") and "results.md" in printed
    assert demo.teacher_analysis_text(a) in printed
    assert printed.startswith("torch threads: ")
    # outside a terminal every run prints one line per epoch (one epoch each here), on stderr like all progress
    assert [line.split(":")[0] for line in captured.err.splitlines() if ": epoch 1/1  loss " in line] == list(results)
    # a second run reuses every finished stage, with its numbers and AID weights
    again = run_demo(tmp_path, quick=True)
    for name in results:
        assert again[name]["reused"] and same(again[name]["metrics"], results[name]["metrics"]), name
    assert again["kd_aid"]["aid_weights"] == s


def test_demo_heads_benchmark_changes_only_the_method_and_scale(tmp_path, load_benchmark):
    heads = load_benchmark("demo_heads")
    kd_aid = demo_configs(tmp_path)["kd_aid"]
    raw = heads.head_config(kd_aid, "logit_kd", tmp_path)
    assert raw["distill"]["methods"] == [{"name": "logit_kd", "params": {}}] and raw["distill"]["loss_scale"] == 1.0
    assert raw["output_dir"] == str(tmp_path / "logit_kd_aid") and kd_aid["distill"]["methods"] == demo.KD_METHODS
    same_keys = ("model", "train", "data", "seed")
    assert {k: raw[k] for k in same_keys} == {k: kd_aid[k] for k in same_keys}
    assert raw["distill"]["aid"] == kd_aid["distill"]["aid"] and config_from_dict(raw)
    assert demo.HEAD_METHODS[0]["name"] in heads.METHODS
