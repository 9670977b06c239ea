"""benchmarks/accuracy.py's plan, scheduling order and aggregation (pure Python: nothing is trained here)."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from aidkd.engine.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acc(load_benchmark):
    return load_benchmark("accuracy")


@pytest.fixture
def plan(acc, tmp_path):
    prof = acc.load_profile("synth_cpu")
    return acc.plan_runs(prof, tmp_path, ["one-stage", "two-stage"], [0, 1, 2])


def test_plan_has_every_variant_per_seed_and_shared_schedule(acc, plan, tmp_path):
    assert len(plan) == 2 * (2 + 3 * len(acc.DEFAULT_VARIANTS))
    keys = [r["key"] for r in plan]
    assert len(set(keys)) == len(keys)
    students = [r for r in plan if r["variant"] in acc.SEED_VARIANTS]
    # same schedule and learning rate for every student run of a family, as the issue asks
    for fam in ("one-stage", "two-stage"):
        scheds = {(r["cfg"]["train"]["epochs"], r["cfg"]["train"]["lr"]) for r in students if r["family"] == fam}
        assert len(scheds) == 1
    kd = next(r for r in plan if r["key"] == "one-stage/kd_aid_level_seed1")
    assert kd["cfg"]["distill"]["aid"] == {"enabled": True, "granularity": "level", "alpha": 0.1}
    assert kd["cfg"]["distill"]["teacher"]["checkpoint"] == str(tmp_path / "one-stage" / "teacher" / "model_best.pt")
    plain = next(r for r in plan if r["key"] == "two-stage/kd_seed2")
    assert plain["cfg"]["distill"]["aid"]["enabled"] is False
    selfkd = next(r for r in plan if r["key"] == "two-stage/self_kd_aid_seed0")
    assert selfkd["cfg"]["distill"]["teacher"]["checkpoint"].endswith("two-stage/self_teacher/model_best.pt")
    assert selfkd["cfg"]["model"]["backbone"] == next(
        r for r in plan if r["key"] == "two-stage/self_teacher")["cfg"]["model"]["backbone"]


def test_pkd_variants_distil_with_pkd_alone_and_with_aid(acc, tmp_path):
    prof = acc.load_profile("synth_cpu")
    prof["variants"] = ["student", "pkd", "pkd_aid"]
    plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0])
    pkd = next(r for r in plan if r["key"] == "one-stage/pkd_seed0")
    pkd_aid = next(r for r in plan if r["key"] == "one-stage/pkd_aid_seed0")
    for run, aid in ((pkd, False), (pkd_aid, True)):
        d = run["cfg"]["distill"]
        assert d["methods"] == [{"name": "pkd", "params": {}}]
        assert d["aid"]["enabled"] is aid and d["aid"]["granularity"] == "instance"
        assert d["teacher"]["checkpoint"] == str(tmp_path / "one-stage" / "teacher" / "model_best.pt")
        assert config_from_dict(run["cfg"]).distill.methods[0].name == "pkd"  # a valid run config
    prof["families"]["one-stage"]["pkd_methods"] = [{"name": "pkd", "pkd_weight": 2.0}]
    plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0])
    pkd = next(r for r in plan if r["key"] == "one-stage/pkd_seed0")
    assert pkd["cfg"]["distill"]["methods"] == [{"name": "pkd", "params": {"pkd_weight": 2.0}}]


def test_head_variants_distil_with_their_head_method_where_it_applies(acc, tmp_path):
    """ld / logit_kd / cross_head alone, + AID (instance; decoupled for ld) and + PKD, at head_scale (not
    distill_scale); ld and cross_head are planned for the one-stage family (GFL) only."""
    prof = dict(acc.load_profile("synth_cpu"), distill_scale="1/1000", head_scale="1/2")
    prof["variants"] = ["student", *acc.HEAD_VARIANTS]
    plan = acc.plan_runs(prof, tmp_path, ["one-stage", "two-stage"], [0])
    by_key = {r["key"]: r for r in plan}
    expected = {"ld": (["ld"], False, None), "ld_aid": (["ld"], True, None),
                "ld_aid_decoupled": (["ld"], True, True), "logit_kd": (["logit_kd"], False, None),
                "logit_kd_aid": (["logit_kd"], True, None), "cross_head": (["cross_head"], False, None),
                "cross_head_aid": (["cross_head"], True, None), "pkd_ld": (["pkd", "ld"], False, None),
                "pkd_logit_kd": (["pkd", "logit_kd"], False, None),
                "pkd_cross_head": (["pkd", "cross_head"], False, None)}
    for variant, (methods, aid, decoupled) in expected.items():
        d = by_key[f"one-stage/{variant}_div2_seed0"]["cfg"]["distill"]
        assert [m["name"] for m in d["methods"]] == methods, variant
        assert d["aid"]["enabled"] is aid and d["aid"].get("decoupled") is decoupled and d["loss_scale"] == 0.5
        cfg = config_from_dict(by_key[f"one-stage/{variant}_div2_seed0"]["cfg"])  # a valid run config
        assert cfg.distill.aid.decoupled is bool(decoupled)
    two_stage = {r["variant"] for r in plan if r["family"] == "two-stage"}
    assert two_stage == {"teacher", "student", "logit_kd", "logit_kd_aid", "pkd_logit_kd"}
    prof["families"]["one-stage"]["head_params"] = {"ld": {"ld_weight": 1.0}}
    plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0])
    ld = next(r for r in plan if r["key"] == "one-stage/ld_div2_seed0")
    assert ld["cfg"]["distill"]["methods"] == [{"name": "ld", "params": {"ld_weight": 1.0}}]


def test_scheduler_starts_teachers_first_and_waits_for_them(acc, plan):
    pending = list(plan)
    first, blocked = acc.next_ready(pending, {}, {})
    assert first["key"] == "one-stage/teacher" and blocked == []
    pending.remove(first)
    order = []
    for _ in range(3):
        run, _ = acc.next_ready(pending, {}, {})
        pending.remove(run)
        order.append(run["key"])
    assert order == ["one-stage/self_teacher", "two-stage/teacher", "two-stage/self_teacher"]
    # nothing distilled may start before its teacher finished; the students alone may
    run, _ = acc.next_ready(pending, {}, {})
    assert run["key"] == "one-stage/student_seed0"
    ready_after_teacher, _ = acc.next_ready([r for r in pending if r["variant"] != "student"],
                                            {"one-stage/teacher": {}}, {})
    assert ready_after_teacher["key"] == "one-stage/kd_seed0"
    # a failed teacher blocks exactly the runs that need it
    _, blocked = acc.next_ready(pending, {}, {"two-stage/self_teacher": "boom"})
    assert {r["key"] for r in blocked} == {f"two-stage/self_kd_aid_seed{s}" for s in range(3)}


def test_aggregate_mean_std_and_delta(acc, plan):
    fake = {"one-stage/student_seed0": 10.0, "one-stage/student_seed1": 12.0, "one-stage/student_seed2": 14.0,
            "one-stage/kd_seed0": 13.0, "one-stage/kd_seed1": 13.0}
    finished = {k: {"metrics": {"coco/AP": v, "voc/mAP50": 2 * v}, "seconds": 1.0} for k, v in fake.items()}
    summary = acc.aggregate(plan, finished)["one-stage"]
    assert summary["student"]["coco/AP"]["mean"] == pytest.approx(12.0)
    assert summary["student"]["coco/AP"]["std"] == pytest.approx(2.0)  # sample std
    assert summary["kd"]["n"] == 2 and summary["kd"]["coco/AP"]["delta_vs_student"] == pytest.approx(1.0)
    assert summary["kd"]["voc/mAP50"]["delta_vs_student"] == pytest.approx(2.0)
    assert math.isnan(summary["kd"]["kitti/moderate_mAP"]["mean"])


def test_paired_differences_by_seed(acc, plan):
    ap = {"student": [10.0, 20.0, 30.0], "kd": [11.0, 21.0, 29.0], "kd_aid_instance": [12.0, 23.0, 31.0]}
    finished = {f"one-stage/{v}_seed{s}": {"metrics": {"coco/AP": x}, "seconds": 1.0}
                for v, xs in ap.items() for s, x in enumerate(xs)}
    fam = acc.aggregate(plan, finished)["one-stage"]
    # the unpaired std of the student is 10, the paired difference's spread is what matters
    vs_student = fam["kd_aid_instance"]["coco/AP"]["paired_vs_student"]
    assert vs_student["mean"] == pytest.approx(2.0) and vs_student["std"] == pytest.approx(1.0)
    assert vs_student["wins"] == 3 and vs_student["n"] == 3
    vs_kd = fam["kd_aid_instance"]["coco/AP"]["paired_vs_kd"]
    assert vs_kd["mean"] == pytest.approx((1 + 2 + 2) / 3) and vs_kd["wins"] == 3
    assert fam["kd"]["coco/AP"]["paired_vs_student"]["wins"] == 2
    md = "\n".join(acc.paired_table(fam, [("coco/AP", "COCO AP")]))
    assert "| KD+AID (instance) − student | +2.00 ± 1.00 (3/3) |" in md


def test_small_synth_configs_use_the_profile_models(acc, load_benchmark):
    """configs/synth_* (benchmarks/make_configs.py) and the synth_cpu profile describe the same detectors."""
    mk = load_benchmark("make_configs")
    fams = acc.load_profile("synth_cpu")["families"]
    assert fams["two-stage"]["student"]["kwargs"] == mk.SYNTH_KWARGS["frcnn"]
    assert fams["two-stage"]["teacher"]["kwargs"] == mk.SYNTH_KWARGS["frcnn"]
    assert "kwargs" not in fams["one-stage"]["student"] and "gfl" not in mk.SYNTH_KWARGS


def test_scale_parsing_and_folder_tags(acc):
    assert acc.parse_scale("1/30") == pytest.approx(1 / 30) and acc.parse_scale(0.1) == pytest.approx(0.1)
    assert [acc.scale_tag(s) for s in (1.0, 1 / 30, 0.01, 2.0, 0.4)] == ["", "div30", "div100", "x2", "x0.4"]
    for bad in ("0", "-1", "abc", "1/0"):
        with pytest.raises(SystemExit, match="scale"):
            acc.parse_scale(bad)


def test_scaled_plan_shares_teachers_and_students_only(acc, tmp_path):
    prof = acc.load_profile("synth_cpu")
    base = {r["key"]: r for r in acc.plan_runs(prof, tmp_path, ["two-stage"], [0])}
    scaled = {r["key"]: r for r in acc.plan_runs(prof, tmp_path, ["two-stage"], [0], 1 / 30)}
    shared = set(base) & set(scaled)
    assert shared == {"two-stage/teacher", "two-stage/self_teacher", "two-stage/student_seed0"}
    for k in shared:  # same folder and config: trained once for every scale
        assert base[k]["cfg"] == scaled[k]["cfg"]
    kd = scaled["two-stage/kd_div30_seed0"]
    assert kd["cfg"]["distill"]["loss_scale"] == pytest.approx(1 / 30) and kd["scale"] == pytest.approx(1 / 30)
    assert kd["cfg"]["output_dir"].endswith("two-stage/kd_div30_seed0")
    assert base["two-stage/kd_seed0"]["cfg"]["distill"]["loss_scale"] == 1.0
    # the method weights themselves stay method.md's: the scale is one global factor
    assert kd["cfg"]["distill"]["methods"] == base["two-stage/kd_seed0"]["cfg"]["distill"]["methods"]


def test_sweep_table_pairs_each_scale_with_the_student(acc, tmp_path):
    prof = acc.load_profile("synth_cpu")
    summaries = {}
    for sc, kd_ap in ((1.0, [1.0, 2.0, 3.0]), (0.1, [12.0, 13.0, 13.0])):
        plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0, 1, 2], sc)
        finished = {r["key"]: {"metrics": {"coco/AP": x, "coco/AP50": 2 * x}, "seconds": 1.0}
                    for v, xs in (("student", [10.0, 11.0, 12.0]), ("kd", kd_ap))
                    for s, x in enumerate(xs) for r in plan if r["variant"] == v and r["seed"] == s}
        summaries[sc] = acc.aggregate(plan, finished)

    args = SimpleNamespace(argv=["--distill-scale", "1", "1/10"])
    md = acc.sweep_markdown(prof, summaries, args)
    assert "| – | student alone | 3 | 11.0 ± 1.0 | 22.0 ± 2.0 |" in md
    assert "| 1 | KD | 3 | 2.0 ± 1.0 (-9.0, 0/3) |" in md
    assert "| 1/10 | KD | 3 | 12.7 ± 0.6 (+1.7, 3/3) |" in md


def test_initial_weights_resolve_from_the_repo_and_must_exist(acc, tmp_path):
    import yaml

    prof = acc.load_profile("kitti101_cpu")
    plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0])
    weights = {r["variant"]: r["cfg"]["model"]["weights"] for r in plan}
    assert weights["teacher"] == str(REPO / "runs/accuracy/synth_cpu/one-stage/teacher/model_best.pt")
    assert weights["student"] == weights["kd"] == weights["self_teacher"]  # every student starts from one model
    prof["families"]["one-stage"]["student"]["weights"] = "runs/accuracy/no_such_profile/model.pt"
    prof.pop("split")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(SystemExit, match="initial weights not found: .*no_such_profile"):
        acc.main(["--profile", str(path), "--only", "one-stage", "--dry-run", "--runs-dir", str(tmp_path / "r"),
                  "--results-dir", str(tmp_path / "res")])


def test_results_name_no_machine_path(acc):
    text = f'{{"runs_dir": "{acc.REPO}/runs/accuracy/x", "root": "{acc.REPO.parent}/shared/data/kitti"}}'
    assert acc.portable(text) == '{"runs_dir": "runs/accuracy/x", "root": "../shared/data/kitti"}'


def _finish(run, ckpt_text=None, config=True):
    """Make a run folder look finished by an earlier version of the benchmark: final metrics and the config.yaml its
    training wrote, no provenance record (and, for a teacher, a checkpoint with this content)."""
    from aidkd.engine.config import config_from_dict, dump_config

    out = Path(run["cfg"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "final_metrics.json").write_text('{"coco/AP": 1.0}')
    if config:
        dump_config(config_from_dict(run["cfg"]), out / "config.yaml")
    if ckpt_text is not None:
        (out / "model_best.pt").write_text(ckpt_text)


def test_finished_runs_from_other_settings_are_stale(acc, plan, caplog):
    by_key = {r["key"]: r for r in plan}
    teacher, kd, student = by_key["one-stage/teacher"], by_key["one-stage/kd_seed0"], by_key["one-stage/student_seed0"]
    _finish(teacher, "teacher v1")
    for r in (kd, student):
        _finish(r)
    # folders from before provenance was recorded: checked by their config.yaml, their inputs recorded as they are
    with caplog.at_level("WARNING"):
        assert acc.stale_runs(plan) == {}
    assert "its config is checked" in caplog.text
    rec_path = Path(kd["cfg"]["output_dir"]) / acc.PROVENANCE
    rec = acc.json.loads(rec_path.read_text())
    assert rec["inputs"]["distill.teacher"] == acc.hashlib.sha256(b"teacher v1").hexdigest()
    assert rec["config"]["train"]["epochs"] == kd["cfg"]["train"]["epochs"]
    assert "output_dir" not in rec["config"]
    assert acc.stale_runs(plan) == {}  # unchanged: nothing stale

    # a retrained teacher (same config, other weights) makes its distilled students stale, not the student alone
    (Path(teacher["cfg"]["output_dir"]) / "model_best.pt").write_text("teacher v2")
    assert acc.stale_runs(plan) == {"one-stage/kd_seed0": "differs in inputs.distill.teacher"}

    # a changed profile setting makes that run stale, and everything distilled from it
    plan2 = [dict(r, cfg=acc.copy.deepcopy(r["cfg"])) for r in plan]
    next(r for r in plan2 if r["key"] == "one-stage/teacher")["cfg"]["train"]["epochs"] = 99
    stale = acc.stale_runs(plan2)
    assert stale["one-stage/teacher"] == "differs in config.train.epochs"
    assert stale["one-stage/kd_seed0"] == "its teacher one-stage/teacher is stale"
    assert "one-stage/student_seed0" not in stale

    # settings added to the code after a run was recorded are not held against it
    rec = acc.json.loads((Path(student["cfg"]["output_dir"]) / acc.PROVENANCE).read_text())
    del rec["config"]["train"]["grad_clip"]
    (Path(student["cfg"]["output_dir"]) / acc.PROVENANCE).write_text(acc.json.dumps(rec))
    assert "one-stage/student_seed0" not in acc.stale_runs(plan)


def test_legacy_folders_are_checked_by_their_config_yaml(acc, plan):
    by_key = {r["key"]: r for r in plan}
    student, other = by_key["two-stage/student_seed1"], by_key["two-stage/student_seed2"]
    trained = dict(student, cfg=acc.copy.deepcopy(student["cfg"]))
    trained["cfg"]["train"]["lr"] = 0.123  # what the profile said when it was trained
    _finish(trained)
    _finish(other, config=False)
    stale = acc.stale_runs(plan)
    assert stale["two-stage/student_seed1"] == "differs in config.train.lr"
    assert stale["two-stage/student_seed2"] == "no record of its config"
    assert not (Path(student["cfg"]["output_dir"]) / acc.PROVENANCE).exists()  # a mismatch is not recorded


def test_main_refuses_stale_runs_unless_asked_to_retrain(acc, tmp_path):
    runs = tmp_path / "r"
    common = ["--profile", "synth_cpu", "--only", "one-stage", "--seeds", "0", "--runs-dir", str(runs),
              "--results-dir", str(tmp_path / "res")]
    prof = acc.load_profile("synth_cpu")
    plan = acc.plan_runs(prof, runs, ["one-stage"], [0])
    teacher = next(r for r in plan if r["key"] == "one-stage/teacher")
    _finish(teacher, "weights")
    (Path(teacher["cfg"]["output_dir"]) / acc.PROVENANCE).write_text(
        acc.json.dumps({"config": {"seed": 12345}, "inputs": {}}))
    with pytest.raises(SystemExit, match=r"(?s)1 run folder.*one-stage/teacher: differs in config\.seed\n.*--rerun-stale"):
        acc.main(common)
    # --rerun-stale deletes the folder (then trains: stopped here by a zero budget before anything starts)
    assert acc.main(common + ["--rerun-stale", "--max-minutes", "0"]) == 0
    assert not Path(teacher["cfg"]["output_dir"]).exists()


def assert_gone_soon(pid: int, what: str) -> None:
    """Process ``pid`` ends (or is a zombie) within 30 s; one that does not is killed and the test fails."""
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "gone"
    if state not in ("gone", "Z"):
        os.kill(pid, signal.SIGKILL)
    assert state in ("gone", "Z"), f"worker {pid} outlived {what} (state {state})"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_training_workers_die_with_the_benchmark_process(tmp_path):
    """A benchmark killed with SIGKILL must not leave its pool workers running."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import concurrent.futures as cf, importlib.util, multiprocessing as mp, os, sys, time
spec = importlib.util.spec_from_file_location("bench_accuracy", {str(REPO / "benchmarks" / "accuracy.py")!r})
acc = importlib.util.module_from_spec(spec); sys.modules["bench_accuracy"] = acc; spec.loader.exec_module(acc)
if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=acc._pool_worker_init,
                                  initargs=(1, False))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)
    time.sleep(600)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert_gone_soon(worker, "its killed parent")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_worker_whose_run_exits_on_sigterm_does_not_outlive_the_benchmark(tmp_path):
    """SIGTERM to the benchmark kills it; its workers then get SIGTERM (PR_SET_PDEATHSIG), which a training turns into
    SystemExit after saving interrupted.ckpt. The executor would catch that and leave the worker waiting for work
    from a dead parent (workers then lived on until a second SIGTERM)."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import concurrent.futures as cf, importlib.util, multiprocessing as mp, os, signal, sys, time
spec = importlib.util.spec_from_file_location("bench_accuracy", {str(REPO / "benchmarks" / "accuracy.py")!r})
acc = importlib.util.module_from_spec(spec); sys.modules["bench_accuracy"] = acc; spec.loader.exec_module(acc)

def training_like(run):  # Lightning's way: a SIGTERM is noted, the step ends, SystemExit is raised
    noted = []
    signal.signal(signal.SIGTERM, lambda *_: noted.append(1))  # later ones are noted too, never fatal
    open({str(tmp_path / "started")!r}, "w").close()
    while not noted:
        time.sleep(0.05)
    raise SystemExit(143)

if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=acc._pool_worker_init,
                                  initargs=(1, False))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(acc.run_in_worker, {{"key": "x"}}, training_like)
    time.sleep(600)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and parent.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # until the task runs with its handler in place
    assert (tmp_path / "started").exists(), f"the task never started (parent exit {parent.poll()})"
    parent.terminate()
    parent.wait()
    assert_gone_soon(worker, "its terminated parent")


def test_runs_trained_by_other_code_are_stale_but_not_for_a_docstring(acc, plan, tmp_path):
    """Same config and inputs, other aidkd code: the result is stale (stale results are replaced, not mixed).
    The digest ignores docstrings and comments, so rewording them does not force retraining."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('"""Doc."""\ndef f(x):\n    """Doc."""\n    return x + 1  # comment\n')
    base = acc.code_digest(pkg)
    acc._DIGESTS.clear()
    (pkg / "m.py").write_text('"""Other words."""\ndef f(x):\n    """More."""\n    # new comment\n    return x + 1\n')
    assert acc.code_digest(pkg) == base
    acc._DIGESTS.clear()
    (pkg / "m.py").write_text('def f(x):\n    return x + 2\n')
    assert acc.code_digest(pkg) != base
    acc._DIGESTS.clear()

    student = next(r for r in plan if r["key"] == "one-stage/student_seed0")
    _finish(student)
    assert acc.stale_runs(plan) == {}  # recorded now, with the current code
    rec_path = Path(student["cfg"]["output_dir"]) / acc.PROVENANCE
    rec = acc.json.loads(rec_path.read_text())
    assert rec["code"] == acc.code_digest()
    rec["code"] = "0" * 64
    rec_path.write_text(acc.json.dumps(rec))
    assert acc.stale_runs(plan) == {"one-stage/student_seed0": "differs in code"}
    del rec["code"]  # a record from before the code digest was kept
    rec_path.write_text(acc.json.dumps(rec))
    assert acc.stale_runs(plan) == {}


def test_pkd_runs_are_not_scaled_by_distill_scale(acc, tmp_path):
    """PKD standardises the features (scale-free), so the profile's distill_scale -- the attention / non-local weights'
    correction for small models -- must not shrink it to nothing; pkd_scale (default 1) sets it."""
    prof = dict(acc.load_profile("synth_cpu"), distill_scale="1/1000", variants=["student", "kd", "pkd", "pkd_aid"])
    by_key = {r["key"]: r for r in acc.plan_runs(prof, tmp_path, ["one-stage"], [0])}
    assert by_key["one-stage/kd_div1000_seed0"]["cfg"]["distill"]["loss_scale"] == pytest.approx(1e-3)
    pkd = by_key["one-stage/pkd_seed0"]["cfg"]["distill"]
    assert pkd["loss_scale"] == 1.0 and [m["name"] for m in pkd["methods"]] == ["pkd"]
    assert by_key["one-stage/pkd_aid_seed0"]["cfg"]["distill"]["aid"]["enabled"] is True
    prof["pkd_scale"] = "1/2"
    by_key = {r["key"]: r for r in acc.plan_runs(prof, tmp_path, ["one-stage"], [0])}
    assert by_key["one-stage/pkd_div2_seed0"]["scale"] == 0.5


def test_variants_option_adds_variants_the_profile_does_not_list(acc, tmp_path, capsys):
    """`--variants pkd` must train PKD although the profile's list lacks it (it silently trained nothing), and a
    self-distillation teacher only when self_kd_aid is asked for."""
    assert acc.main(["--profile", "synth_cpu", "--only", "one-stage", "--seeds", "0", "--runs-dir", str(tmp_path / "r"),
                     "--results-dir", str(tmp_path / "res"), "--variants", "student", "pkd", "--dry-run"]) == 0
    planned = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("one-stage/")]
    assert planned == ["one-stage/teacher", "one-stage/student_seed0", "one-stage/pkd_seed0"]


def test_results_of_a_variant_selection_name_its_command_commit_and_only_its_missing_runs(acc, tmp_path):
    """A `--variants` invocation listed every profile variant it never meant to train as "Not run", and its
    Reproduce line dropped the selection (re-running it trained the profile's default variants instead)."""
    prof = acc.load_profile("synth_cpu")
    prof["variants"] = [*prof.get("variants", acc.DEFAULT_VARIANTS), "pkd"]  # as main() adds what --variants names
    plan = acc.plan_runs(prof, tmp_path, ["one-stage"], [0])
    finished = {r["key"]: {"metrics": {"coco/AP": 1.0}, "seconds": 1.0} for r in plan
                if r["variant"] in ("teacher", "student")}
    args = SimpleNamespace(argv=["--only", "one-stage", "--variants", "student", "pkd"], smoke=False,
                           only="one-stage", seeds=[0], variants=["student", "pkd"],
                           results_dir="benchmarks/results/accuracy_x")
    md = acc.markdown(prof, 1.0, acc.aggregate(plan, finished), plan, finished, args, 1.0)
    not_run = next(line for line in md.splitlines() if line.startswith("Not run"))
    assert not_run.endswith("1 of 3 runs: one-stage/pkd_seed0")  # teacher, student, pkd; kd & co not requested
    assert ("Reproduce: `.venv/bin/python benchmarks/accuracy.py --profile synth_cpu --only one-stage --seeds 0 "
            "--variants student pkd --results-dir benchmarks/results/accuracy_x --jobs 2 --threads 1`") in md
    assert f"Written at commit {acc.source_commit()} by:" in md
