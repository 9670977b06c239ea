"""benchmarks/controlled.py: the wrong-on-purpose teacher's data (subset construction), plan and subset metrics
(nothing is trained here)."""
import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ctl(load_benchmark):
    return load_benchmark("controlled")


DATA = {"num_images": 30, "seed": 0, "width": 160, "height": 64, "hard_fraction": 0.2, "val_fraction": 1 / 3,
        "subset_class": "Cyclist"}


@pytest.fixture(scope="module")
def dropped(ctl, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctl") / "data"
    return out, ctl.build_data(out, corruption="drop", relabel_as=None, **DATA)


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def test_teacher_copy_drops_the_subset_from_train_labels_only(dropped):
    out, info = dropped
    clean, teacher = out / "clean", out / "teacher"
    train = set((clean / "ImageSets" / "train.txt").read_text().split())
    val = set((clean / "ImageSets" / "val.txt").read_text().split())
    assert len(train) == 20 and len(val) == 10 and (teacher / "ImageSets" / "val.txt").read_text().split() == sorted(val)
    n_train = n_val = 0
    meta_t = json.loads((teacher / "synth_meta.json").read_text())
    for f in sorted((clean / "training" / "label_2").glob("*.txt")):
        c, t = _lines(f), _lines(teacher / "training" / "label_2" / f.name)
        cyc = sum(ln.split()[0] == "Cyclist" for ln in c)
        if f.stem in val:
            assert t == c  # evaluation labels stay clean
            n_val += cyc
        else:
            n_train += cyc
            assert t == [ln for ln in c if ln.split()[0] != "Cyclist"]  # everything else untouched, in order
        # the meta still describes the label lines one to one (no mislabels: a labelled class is the true one)
        objects = meta_t["frames"][f.stem]["objects"]
        assert len(objects) == len(t)
        assert all(o["true_cls"] == ln.split()[0] for o, ln in zip(objects, t) if not ln.startswith("DontCare"))
    assert n_train > 0 and n_val > 0, "seed 0 should give cyclists on both sides"
    assert (info["train_affected"], info["val_affected"]) == (n_train, n_val)
    assert meta_t["controlled"]["subset_class"] == "Cyclist"
    assert (teacher / "training" / "image_2").resolve() == (clean / "training" / "image_2").resolve()
    # the clean copy has no mislabels: the only label noise is the experiment's
    meta_c = json.loads((clean / "synth_meta.json").read_text())
    assert all(o["mislabel"] is None for fr in meta_c["frames"].values() for o in fr["objects"])


def test_build_data_reuses_a_matching_copy(ctl, dropped):
    out, info = dropped
    stamp = (out / "teacher" / "synth_meta.json").stat().st_mtime_ns
    assert ctl.build_data(out, corruption="drop", relabel_as=None, **DATA) == info
    assert (out / "teacher" / "synth_meta.json").stat().st_mtime_ns == stamp


def test_relabel_renames_the_class_and_keeps_the_rest(ctl, tmp_path):
    info = ctl.build_data(tmp_path / "d", corruption="relabel", relabel_as="Pedestrian", **DATA)
    clean, teacher = tmp_path / "d" / "clean", tmp_path / "d" / "teacher"
    train = set((clean / "ImageSets" / "train.txt").read_text().split())
    renamed = 0
    for stem in train:
        c, t = _lines(clean / "training" / "label_2" / f"{stem}.txt"), _lines(teacher / "training" / "label_2" /
                                                                             f"{stem}.txt")
        assert len(c) == len(t) and not any(ln.startswith("Cyclist ") for ln in t)
        for a, b in zip(c, t):
            assert a.split()[1:] == b.split()[1:]
            renamed += a.split()[0] == "Cyclist" and b.split()[0] == "Pedestrian"
    assert renamed == info["train_affected"] > 0
    with pytest.raises(ValueError, match="relabel_as"):
        ctl.corrupt_copy(clean, tmp_path / "x", "Cyclist", "relabel", None)


def test_plan_teacher_on_the_corrupted_copy_students_on_clean(ctl, tmp_path):
    args = ctl.parse_args(["--alpha", "1"])
    data = tmp_path / "data"
    prof = ctl.make_profile(args, data)
    plan = ctl.plan_experiment(prof, tmp_path / "runs", data, [0, 1, 2])
    assert [r["variant"] for r in plan][:1] == ["teacher"] and len(plan) == 1 + 3 * len(ctl.VARIANTS)
    teacher = plan[0]
    assert teacher["cfg"]["data"]["root"] == str((data / "teacher").resolve())
    students = plan[1:]
    assert {r["cfg"]["data"]["root"] for r in students} == {str(data / "clean")}
    assert len({(r["cfg"]["train"]["epochs"], r["cfg"]["train"]["lr"]) for r in students}) == 1
    aid = [r for r in students if r["variant"].startswith("kd_aid")]
    assert all(r["cfg"]["distill"]["aid"]["alpha"] == 1.0 and "_a1_seed" in r["cfg"]["output_dir"] for r in aid)
    assert all(r["key"].endswith(Path(r["cfg"]["output_dir"]).name) for r in plan)
    kd = next(r for r in students if r["variant"] == "kd")
    assert "_a1" not in kd["key"] and kd["cfg"]["distill"]["loss_scale"] == pytest.approx(0.001)
    assert kd["cfg"]["distill"]["teacher"]["checkpoint"] == str(tmp_path / "runs" / "one-stage" / "teacher" /
                                                                "model_best.pt")
    order = [(r["variant"], r["seed"]) for r in plan]
    assert order[1:7] == [("kd", 0), ("kd_aid_instance", 0), ("kd", 1), ("kd_aid_instance", 1), ("kd", 2),
                          ("kd_aid_instance", 2)]
    assert order[7:] == [("student", 0), ("student", 1), ("student", 2), ("kd_aid_level", 0), ("kd_aid_level", 1),
                         ("kd_aid_level", 2)]
    default = ctl.plan_experiment(ctl.make_profile(ctl.parse_args([]), data), tmp_path / "runs", data, [0])
    assert not any("_a0.1" in r["key"] for r in default)
    assert not any(r["cfg"]["distill"] and r["cfg"]["distill"]["aid"].get("normalize") for r in default)


def test_normalized_aid_runs_get_their_own_folders_and_results(ctl, tmp_path):
    args = ctl.parse_args(["--alpha", "3", "--aid-normalize", "--distill-scale", "1/100", "--subset-class", "Car",
                           "--subset-view", "side"])
    data = tmp_path / "data"
    plan = ctl.plan_experiment(ctl.make_profile(args, data), tmp_path / "runs", data, [0])
    aid = [r for r in plan if r["variant"].startswith("kd_aid")]
    assert [Path(r["cfg"]["output_dir"]).name for r in aid] == ["kd_aid_instance_div100_a3n_seed0",
                                                                "kd_aid_level_div100_a3n_seed0"]
    assert all(r["cfg"]["distill"]["aid"] == {"enabled": True, "granularity": r["variant"].removeprefix("kd_aid_"),
                                              "alpha": 3.0, "normalize": True} for r in aid)
    kd = next(r for r in plan if r["variant"] == "kd")  # shared with the plain-weights runs at this scale
    assert Path(kd["cfg"]["output_dir"]).name == "kd_div100_seed0" and "normalize" not in kd["cfg"]["distill"]["aid"]
    plain = ctl.parse_args(["--distill-scale", "1/100", "--subset-class", "Car", "--subset-view", "side"])
    plain_kd = next(r for r in ctl.plan_experiment(ctl.make_profile(plain, data), tmp_path / "runs", data, [0])
                    if r["variant"] == "kd")
    assert kd["cfg"] == plain_kd["cfg"]  # the same config, or the provenance check calls the shared KD run stale
    assert ctl.results_name(args) == "controlled_synth_car_side_div100_a3n"
    only = ctl.parse_args(["--variants", "kd", "kd_aid_instance"])
    assert {r["variant"] for r in ctl.plan_experiment(ctl.make_profile(only, data), tmp_path / "r", data, [0])} == {
        "teacher", "kd", "kd_aid_instance"}
    assert ctl.results_name(ctl.parse_args([])) == "controlled_synth"
    assert ctl.results_name(ctl.parse_args(["--alpha", "1"])) == "controlled_synth_a1"


def test_subset_metrics_and_paired_differences(ctl):
    m = {"coco/AP/Car": 10.0, "coco/AP/Pedestrian": 6.0, "coco/AP/Cyclist": 2.0, "voc/AP50/Car": 20.0,
         "voc/AP50/Pedestrian": 10.0, "voc/AP50/Cyclist": 4.0, "kitti/Car/moderate": 8.0,
         "kitti/Pedestrian/moderate": 4.0, "kitti/Cyclist/moderate": 1.0, "coco/AP": 6.0}
    s = ctl.subset_metrics(m, "Cyclist")
    assert s["affected"] == {"COCO AP": 2.0, "VOC AP50": 4.0, "KITTI mod.": 1.0}
    assert s["rest"] == {"COCO AP": 8.0, "VOC AP50": 15.0, "KITTI mod.": 6.0}
    assert s["Pedestrian"] == {"COCO AP": 6.0, "VOC AP50": 10.0, "KITTI mod.": 4.0}
    by_seed = {"kd": {0: s, 1: ctl.subset_metrics({**m, "coco/AP/Cyclist": 1.0}, "Cyclist")},
               "student": {0: ctl.subset_metrics({**m, "coco/AP/Cyclist": 3.0}, "Cyclist"),
                           1: ctl.subset_metrics({**m, "coco/AP/Cyclist": 3.5}, "Cyclist")}}
    d = ctl.paired(by_seed, "kd", "student")["affected/COCO AP"]
    assert d["diffs"] == [-1.0, -2.5] and d["mean"] == pytest.approx(-1.75) and d["wins"] == 0
    assert ctl.paired(by_seed, "kd", "student")["rest/COCO AP"]["mean"] == 0.0
    assert ctl.paired(by_seed, "kd", "student")["Cyclist/COCO AP"]["diffs"] == [-1.0, -2.5]
    assert math.isnan(ctl.subset_metrics({}, "Cyclist")["affected"]["COCO AP"])


def test_markdown_of_partial_results(ctl, tmp_path):
    """What an interrupted experiment writes: the finished runs' tables, the prediction, what remains."""
    args = ctl.parse_args([])
    data = tmp_path / "data"
    prof = ctl.make_profile(args, data)
    plan = ctl.plan_experiment(prof, tmp_path / "runs", data, [0, 1, 2])
    metrics = {f"coco/AP/{c}": v for c, v in zip(ctl.CLASSES, (30.0, 2.0, 1.0))}
    first = [next(r for r in plan if (r["variant"], r["seed"]) == (v, 0)) for v in ("teacher", "student", "kd")]
    finished = {r["key"]: {"metrics": dict(metrics), "seconds": 60.0} for r in first}
    finished[first[2]["key"]]["metrics"]["coco/AP/Cyclist"] = 0.5
    summ = ctl.summarize(plan, finished, "Cyclist")
    assert summ["paired"]["kd - student"]["affected/COCO AP"]["diffs"] == [-0.5]
    info = {"params": {"num_images": 240, "seed": 0, "hard_fraction": 0.2, "val_fraction": 1 / 3},
            "train_affected": 83, "val_affected": 32, "train_frames_touched": 65}
    rows = [{"class": "Car", "teacher_loss": 0.5, "found": True, "difficulty": "easy"},
            {"class": "Cyclist", "teacher_loss": 3.0, "found": False, "difficulty": "none"}]
    from aidkd.eval.instances import summarize

    md = ctl.markdown(args, prof, info, plan, finished, {}, summ, summarize(rows, 0.1), rows, "## Prediction\n", 61.0)
    assert "## Prediction" in md and "| kd - student | -0.50 (0/1; -0.5)" in md
    assert "| teacher | 30.0 | 2.0 | 1.0 |" in md
    assert f"Not run yet (budget or failure): {len(plan) - 3} of {len(plan)}" in md
    assert "| 0.1 | 0.74-0.95 |" in md and "| 1.000 |" in md  # w of Car vs Cyclist: AUC 1


def test_view_subset_drops_only_that_view_and_writes_eval_copies(ctl, tmp_path):
    """Car seen from the side: the teacher loses those cars only; AP on them and on the rest comes from val-label
    copies where the other positives (resp. the side cars) are DontCare."""
    data = tmp_path / "d"
    info = ctl.build_data(data, corruption="drop", relabel_as=None, subset_view="side", **{**DATA,
                                                                                          "subset_class": "Car"})
    assert info["params"]["subset_view"] == "side" and info["train_affected"] > 0 and info["val_affected"] > 0
    clean = data / "clean"
    meta = json.loads((clean / "synth_meta.json").read_text())["frames"]
    val = set((clean / "ImageSets" / "val.txt").read_text().split())
    side_val = 0
    for f in sorted((clean / "training" / "label_2").glob("*.txt")):
        lines, objects = _lines(f), meta[f.stem]["objects"]
        side = [ln.split()[0] == "Car" and o["view"] == "side" for ln, o in zip(lines, objects)]
        teacher = _lines(data / "teacher" / "training" / "label_2" / f.name)
        if f.stem in val:
            side_val += sum(side)
            assert teacher == lines
            aff, rest = (_lines(data / f"eval_{p}" / "training" / "label_2" / f.name) for p in ("affected", "rest"))
            for ln, s_, a, r in zip(lines, side, aff, rest):
                positive = ln.split()[0] in ctl.CLASSES
                assert a.split()[0] == (ln.split()[0] if s_ or not positive else "DontCare")
                assert r.split()[0] == ("DontCare" if s_ else ln.split()[0])
                assert a.split()[1:] == r.split()[1:] == ln.split()[1:]
        else:
            assert teacher == [ln for ln, s_ in zip(lines, side) if not s_]
    assert side_val == info["val_affected"]
    rows = [{"class": "Car", "stem": s, "label_line": i + 1} for s in sorted(val)
            for i, ln in enumerate(_lines(clean / "training" / "label_2" / f"{s}.txt")) if ln.startswith("Car ")]
    assert sum(ctl.rows_affected(rows, clean, "Car", "side")) == side_val
    assert ctl.parse_args(["--subset-class", "Car", "--subset-view", "side"]).name == "controlled_synth_car_side"
    assert ctl.parse_args([]).name == "controlled_synth"


def test_view_subset_metrics_come_from_the_eval_copies(ctl):
    clean = {"coco/AP/Car": 20.0, "coco/AP/Pedestrian": 1.0, "coco/AP/Cyclist": 0.0}
    views = {"affected": {"coco/AP/Car": 5.0}, "rest": {"coco/AP/Car": 30.0, "coco/AP/Pedestrian": 1.0,
                                                        "coco/AP/Cyclist": 2.0}}
    s = ctl.subset_metrics(clean, "Car", views=views)
    assert s["affected"]["COCO AP"] == 5.0 and s["rest"]["COCO AP"] == 30.0  # the other cars
    assert s["Car"]["COCO AP"] == 20.0  # per class: the clean labels


def test_analysis_compares_a_view_subset_with_its_own_class(ctl):
    from aidkd.eval.instances import summarize

    rows = [{"class": "Car", "teacher_loss": 3.0, "found": False, "difficulty": "easy"},   # side view: affected
            {"class": "Car", "teacher_loss": 1.0, "found": True, "difficulty": "easy"},    # rear view
            {"class": "Pedestrian", "teacher_loss": 9.0, "found": False, "difficulty": "none"}]
    lines = ctl.analysis_lines(summarize(rows, 0.1), "Car (side view)", rows, [True, False, False],
                               [False, True, False], "other Car")
    row = next(ln for ln in lines if ln.startswith("| 0.1 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4:] == [f"{math.exp(-0.1):.3f}", f"{math.exp(-0.3):.3f}", f"{math.exp(0.2):.2f}", "1.000"]
    assert "AUC of w, other Car vs Car (side view)" in "\n".join(lines)


SELECTIVE = ["--name", "controlled_synth_car_side_selective", "--subset-class", "Car", "--subset-view", "side",
             "--distill-scale", "1/10", "--seeds", "0", "1", "2", "3", "4", "--variants", "kd", "kd_weak",
             "kd_aid_instance", "student", "am", "am_aid_instance", "kd_aid_pixel", "kd_aid_pixel_a1n"]


def test_selective_variants_plan_order_folders_and_configs(ctl, tmp_path):
    from aidkd.engine.config import config_from_dict

    args = ctl.parse_args(SELECTIVE)
    data = tmp_path / "data"
    plan = ctl.plan_experiment(ctl.make_profile(args, data), tmp_path / "runs", data, args.seeds)
    assert len(plan) == 1 + 5 * 8 and ctl.results_name(args) == "controlled_synth_car_side_selective_div10"
    order = [(r["variant"], r["seed"]) for r in plan]
    seeds = range(5)
    assert order == [("teacher", 0),
                     *[(v, s) for s in seeds for v in ("kd", "kd_weak", "kd_aid_instance")],
                     *[("student", s) for s in seeds],
                     *[(v, s) for s in seeds for v in ("am", "am_aid_instance")],
                     *[(v, s) for s in seeds for v in ("kd_aid_pixel", "kd_aid_pixel_a1n")]]
    runs = {r["key"].split("/")[1]: r["cfg"] for r in plan}
    assert len(runs) == len(plan)  # one folder each
    d = {k: v["distill"] for k, v in runs.items() if v["distill"]}
    kd_methods = d["kd_div10_seed3"]["methods"]
    assert [m["name"] for m in kd_methods] == ["attention", "nonlocal"]
    assert d["kd_weak_div10_seed3"]["aid"] == {"enabled": True, "granularity": "batch", "alpha": 0.1}
    assert d["kd_weak_div10_seed3"]["methods"] == kd_methods
    am = [{"name": "attention", "params": {**kd_methods[0]["params"], "at_weight": 0.0}}]
    assert am[0]["params"]["am_weight"] == 5.6e-4 and d["am_div10_seed3"]["methods"] == am
    assert not d["am_div10_seed3"]["aid"]["enabled"]
    assert d["am_aid_instance_div10_seed3"]["methods"] == am
    assert d["am_aid_instance_div10_seed3"]["aid"] == {"enabled": True, "granularity": "instance", "alpha": 0.1}
    assert d["kd_aid_pixel_div10_seed3"]["aid"] == {"enabled": True, "granularity": "instance", "alpha": 0.1,
                                                    "global_terms": "pixel"}
    assert d["kd_aid_pixel_a1n_div10_seed3"]["aid"] == {"enabled": True, "granularity": "instance", "alpha": 1.0,
                                                        "normalize": True, "global_terms": "pixel"}
    assert all(v["distill"]["loss_scale"] == pytest.approx(0.1) for v in runs.values() if v["distill"])
    for name, cfg in runs.items():  # every config is a valid run config
        aid = config_from_dict(cfg).distill
        assert aid is None or aid.aid.alpha in (0.1, 1.0), name
    # KD and KD + AID (instance) are the runs the default variants plan: shared, not stale, across invocations
    plain = ctl.parse_args(["--subset-class", "Car", "--subset-view", "side", "--distill-scale", "1/10", "--name",
                            args.name])
    default = {r["key"]: r["cfg"] for r in ctl.plan_experiment(ctl.make_profile(plain, data), tmp_path / "runs",
                                                                data, [0])}
    for key in ("one-stage/kd_div10_seed0", "one-stage/kd_aid_instance_div10_seed0", "one-stage/student_seed0"):
        assert default[key] == next(r["cfg"] for r in plan if r["key"] == key)
    # --alpha / --aid-normalize reach the variants that do not fix them, and tag their folders
    a3 = ctl.parse_args([*SELECTIVE, "--alpha", "3"])
    keys = {r["key"].split("/")[1] for r in ctl.plan_experiment(ctl.make_profile(a3, data), tmp_path / "r", data, [0])}
    assert {"kd_weak_div10_a3_seed0", "am_aid_instance_div10_a3_seed0", "kd_aid_pixel_div10_a3_seed0",
            "kd_aid_pixel_a1n_div10_seed0", "am_div10_seed0", "kd_div10_seed0"} <= keys
    with pytest.raises(SystemExit, match="unknown variant"):
        ctl.plan_experiment(dict(ctl.make_profile(args, data), variants=["kd_nope"]), tmp_path / "r", data, [0])
    with pytest.raises(ValueError, match="attention"):
        ctl.am_only([{"name": "nonlocal", "params": {}}])


HEAD = ["--name", "controlled_synth_car_side_head", "--subset-class", "Car", "--subset-view", "side", "--seeds", "0",
        "1", "--head-method", "logit_kd", "--variants", "student", "head", "head_weak", "head_aid_instance",
        "head_aid_decoupled"]


def test_head_variants_plan_order_folders_and_configs(ctl, tmp_path):
    from aidkd.engine.config import config_from_dict

    data = tmp_path / "data"
    for extra, scale, tag in (([], 1.0, ""), (["--head-scale", "3"], 3.0, "_x3")):
        args = ctl.parse_args([*HEAD, *extra])
        plan = ctl.plan_experiment(ctl.make_profile(args, data), tmp_path / "runs", data, args.seeds)
        assert ctl.results_name(args) == "controlled_synth_car_side_head_logit_kd" + tag
        assert [(r["variant"], r["seed"]) for r in plan] == [
            ("teacher", 0), ("student", 0), ("student", 1), ("head", 0), ("head", 1),
            *[(v, s) for s in (0, 1) for v in ("head_weak", "head_aid_instance", "head_aid_decoupled")]]
        d = {r["key"].split("/")[1]: r["cfg"]["distill"] for r in plan if r["cfg"]["distill"]}
        assert sorted(d) == sorted(f"logit_kd{v}{tag}_seed{s}" for s in (0, 1)
                                   for v in ("", "_weak", "_aid_instance", "_aid_decoupled"))
        assert all(x["methods"] == [{"name": "logit_kd", "params": {}}] and x["loss_scale"] == scale
                   for x in d.values())
        assert not d[f"logit_kd{tag}_seed1"]["aid"]["enabled"]
        assert d[f"logit_kd_weak{tag}_seed1"]["aid"] == {"enabled": True, "granularity": "batch", "alpha": 0.1}
        assert d[f"logit_kd_aid_instance{tag}_seed1"]["aid"] == {"enabled": True, "granularity": "instance",
                                                                  "alpha": 0.1}
        assert d[f"logit_kd_aid_decoupled{tag}_seed1"]["aid"] == {"enabled": True, "granularity": "instance",
                                                                   "alpha": 0.1, "decoupled": True}
        assert all(config_from_dict(r["cfg"]) for r in plan)
    assert ctl.label("head_weak", args).startswith("logit_kd x the batch's mean AID weight")
    with pytest.raises(SystemExit):  # a head variant names its method
        ctl.parse_args([a for a in HEAD if a not in ("--head-method", "logit_kd")])


def test_bootstrap_interval_of_the_mean_over_seeds(ctl):
    # [0, 0, 3]: the 27 resamples' means are 0 (8 of them), 1 (12), 2 (6), 3 (1): the 5 % and 95 % points are 0, 2
    assert ctl.bootstrap_interval([0.0, 0.0, 3.0]) == [0.0, 2.0]
    assert ctl.bootstrap_interval([1.5] * 5) == [1.5, 1.5]
    assert all(math.isnan(x) for x in ctl.bootstrap_interval([1.0, 2.0]))
    lo, hi = ctl.bootstrap_interval([-1.0, 0.5, 2.0, 3.0, -0.5])
    assert -1.0 < lo < 0.8 < hi < 3.0  # around the mean 0.8, inside the values' range
    wide = [float(x) for x in range(8)]  # more than 6 seeds: fixed-seed resampling, reproducible
    assert ctl.bootstrap_interval(wide) == ctl.bootstrap_interval(wide)
    assert 1.5 < ctl.bootstrap_interval(wide)[0] < 3.5 < ctl.bootstrap_interval(wide)[1] < 5.5


def test_markdown_pairs_aid_with_the_weakening_control(ctl, tmp_path):
    args = ctl.parse_args(SELECTIVE)
    data = tmp_path / "data"
    prof = ctl.make_profile(args, data)
    plan = ctl.plan_experiment(prof, tmp_path / "runs", data, args.seeds)
    ap = {"kd": [5.0, 4.0, 6.0, 5.0, 5.0], "kd_weak": [5.5, 5.0, 6.0, 5.5, 5.0],
          "kd_aid_instance": [6.0, 5.0, 7.5, 5.0, 6.0]}
    finished = {r["key"]: {"metrics": {"coco/AP/Car": ap[r["variant"]][r["seed"]]}, "seconds": 60.0} for r in plan
                if r["variant"] in ap}
    summ = ctl.summarize(plan, finished, "Car")
    d = summ["paired"]["kd_aid_instance - kd_weak"]["affected/COCO AP"]
    assert d["diffs"] == [0.5, 0.0, 1.5, -0.5, 1.0] and d["wins"] == 3
    assert d["ci90"] == ctl.bootstrap_interval(d["diffs"]) and d["ci90"][0] < 0.5 < d["ci90"][1]
    assert set(summ["paired"]) == {"kd_weak - kd", "kd_aid_instance - kd", "kd_aid_instance - kd_weak"}
    info = {"params": {"num_images": 240, "seed": 0, "hard_fraction": 0.2, "val_fraction": 1 / 3},
            "train_affected": 83, "val_affected": 32, "train_frames_touched": 65}
    md = ctl.markdown(args, prof, info, plan, finished, {}, summ, None, None, "## Prediction\n", 61.0)
    lo, hi = d["ci90"]
    assert f"| kd_aid_instance - kd_weak | +0.50 ± 0.79 [{lo:+.2f}, {hi:+.2f}] (3/5; +0.5, +0.0, +1.5, -0.5, +1.0)" in md
    assert "| KD x the batch's mean AID weight (weakening control) | 5 |" in md
    assert ("--name controlled_synth_car_side_selective --seeds 0 1 2 3 4 --variants kd kd_weak kd_aid_instance "
            "student am am_aid_instance kd_aid_pixel kd_aid_pixel_a1n --distill-scale 1/10") in md
    assert "Not run yet (budget or failure): 26 of 41" in md
    assert f"` at commit {ctl.source_commit()}. Reproduce" in md


def test_source_commit_names_the_commit_and_uncommitted_changes(ctl, tmp_path):
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *cmd],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert ctl.source_commit(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "x")
    sha = git("rev-parse", "HEAD")
    assert ctl.source_commit(tmp_path) == sha[:12]
    (tmp_path / "new.txt").write_text("untracked files are not the code\n")
    assert ctl.source_commit(tmp_path) == sha[:12]
    (tmp_path / "f.txt").write_text("b\n")
    assert ctl.source_commit(tmp_path) == sha[:12] + " with uncommitted changes"


def test_analysis_of_a_teacher_that_finds_nothing_prints_na(ctl):
    """The strict summary JSON holds null where a value is undefined (no instance found): printed as n/a."""
    from aidkd.eval.instances import summarize

    rows = [{"class": "Car", "teacher_loss": 3.0, "found": False, "difficulty": "easy"}]
    summary = json.loads(json.dumps(summarize(rows, 0.1), allow_nan=True).replace("NaN", "null"))
    assert summary["auc_found_vs_missed"] is None
    lines = "\n".join(ctl.analysis_lines(summary, "Car", rows))
    assert "found vs missed: n/a" in lines and "| 0.1 | 0.74-0.74 | n/a | 0.741 |" in lines


def test_missing_analysis_says_when_it_runs(ctl):
    """A plan without an AID variant (the strength sweep) has a finished teacher but no analysis: the results said
    the teacher had not finished."""
    text = " ".join(ctl.analysis_lines(None, "Car", None))
    assert "AID variant" in text and "did not finish" not in text
