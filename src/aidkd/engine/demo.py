"""``aidkd demo``: generated driving scenes -> teacher, student, KD, KD+AID, cross-head KD+AID on the CPU, as one
markdown table.

Sized for a 2-core CPU (about 3 CPU minutes in all, benchmarks/demo_time.py): an easy generated set (cars only,
near and large, few distractors), a ResNet-18 teacher on a longer schedule and a MobileNetV3-small student at half
its cost a step. The demo owns its folder (``runs/demo``): a second run reuses every finished stage whose
configuration is unchanged, resumes a stage an interrupt or kill stopped (its ``checkpoints/``), and trains anew a
stage whose configuration changed, saying so; the distilled runs are trained again whenever their teacher was.
``fresh=True`` (``aidkd demo --fresh``) makes everything again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from rich.console import Console

from aidkd.engine.config import config_from_dict
from aidkd.engine.run_folder import RESUMABLE
from aidkd.eval.evaluator import (
    KITTI_METRIC,
    PRIMARY_METRIC,
    VOC_METRIC,
    coco_class_key,
    coco_key,
    read_metrics,
    strict_json,
)

console = Console(soft_wrap=True)  # lines stay whole in a log file or pipe, as in the CLI

# Cars only: in a few CPU minutes a teacher from random weights learns cars and not the thin, small pedestrians and
# cyclists (their AP stays ~0 for teacher and student alike), so the demo generates and reports only cars.
DEMO_CLASSES = ["Car"]
# The easy profile: objects nearer (depth t >= 0.3: a car's box >= ~11 px high, median ~24 px), few objects and
# distractors; 20 % hard and 5 % mislabelled instances stay in, they are what AID down-weights.
DEMO_SYNTH = {"num_images": 200, "seed": 0, "width": 320, "height": 96, "hard_fraction": 0.2,
              "mislabel_fraction": 0.05, "classes": DEMO_CLASSES, "min_t": 0.3, "max_objects": 6, "clutter": 3}
DEMO_DATA = {"format": "synth", "min_size": 96, "max_size": 320, "batch_size": 4, "classes": DEMO_CLASSES}
# GFL by default: from random weights it learns far faster than RetinaNet on these scenes (benchmarks/results).
TEACHER = {"arch": "gfl", "backbone": "resnet18", "fpn_channels": 64, "kwargs": {}}
STUDENT = {"arch": "gfl", "backbone": "mobilenet_v3_small", "fpn_channels": 32, "kwargs": {}}
# anchor_size 16: torchvision's 32-px finest anchors miss the many small objects of 96-px-high scenes.
ANCHOR_KWARGS = {"retinanet": {"anchor_size": 16}}
KD_METHODS = [{"name": "attention", "params": {"temperature": 0.1, "am_weight": 4e-4, "at_weight": 2e-2}},
              # The published code's trainable teacher-side block: on this demo with 3-epoch students (one seed)
              # KD gained +1.0 COCO AP over the student with it, +0.2 with the frozen module default (+0.1 frozen
              # at scale 1/1000); the 2-epoch students of the CPU-time budget show no KD gain (docs/results.md). With 5-epoch students over 3 seeds frozen was ahead, inside the seed spread
              # (benchmarks/results/strength_cpu_easy), so this is the demo's choice, not a general one.
              {"name": "nonlocal", "params": {"nl_weight": 4e-4, "train_teacher_block": True}}]
# With the default (normalized) loss forms these weights mean at 96x320 what they mean at the paper's 1333x800, but
# they were tuned for pretrained 256-channel FPNs: at full scale the terms are ~100x this from-scratch student's
# detection loss. Sweep on this demo with 3-epoch students (KD - student, COCO AP, one seed): 1/1000 +0.7, 1/400
# +1.0, 1/200 +0.9.
DISTILL_SCALE = 0.0025
# Head distillation (docs/method.md §6): the best head method + AID on this demo, one seed, 2-epoch students
# (COCO AP, benchmarks/results/demo_heads.md): cross_head 6.5, logit_kd 5.5, ld 3.6, vs KD + AID 3.7 and the
# student alone 2.8. Normalised like the detection loss, so at loss_scale 1.
HEAD_METHODS = [{"name": "cross_head", "params": {}}]
DEFAULT_OUT = "runs/demo"
DISTILLED = ("kd", "kd_aid", "head_aid")  # the runs that depend on the teacher
# (teacher, student) epochs: the teacher's longer schedule is what makes it clearly better from random weights.
EPOCHS = {False: (5, 2), True: (1, 1)}
QUICK_IMAGES = 24


def _synth(quick: bool) -> dict:
    return dict(DEMO_SYNTH, num_images=QUICK_IMAGES) if quick else dict(DEMO_SYNTH)


def data_folder(out: Path, quick: bool = False) -> Path:
    """Where the demo's scenes live: one folder per generator setting, so a changed profile never reuses old ones."""
    key = hashlib.sha1(json.dumps(_synth(quick), sort_keys=True).encode()).hexdigest()[:10]
    return out / "data" / key


def demo_configs(out: Path, quick: bool = False, arch: str = "gfl") -> dict[str, dict]:
    teacher_epochs, student_epochs = EPOCHS[quick]
    data = dict(DEMO_DATA, root=str(data_folder(out, quick)), synth=_synth(quick))

    def run(name, model, epochs, distill=None, data=data):
        # AdamW learns much faster than SGD from random initialisation on this tiny budget (measured); cosine decay
        # to 0 gets the most out of a few epochs. One validation, at the end: it costs a training epoch's tenth.
        return {"name": name, "output_dir": str(out / name), "seed": 0, "data": data, "model": model,
                "train": {"epochs": epochs, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4,
                          "scheduler": "cosine", "warmup_steps": 30, "val_every": epochs, "log_every": 10},
                "distill": distill}

    # Students without flips: an image then has one entry in the teacher-loss cache (distill.aid.cache), so KD + AID
    # runs the teacher's head in its first epoch only; the teacher, trained longest, keeps the flip augmentation.
    student_data = dict(data, hflip=0.0)
    teacher_ckpt = str(out / "teacher" / "model_best.pt")
    kwargs = ANCHOR_KWARGS.get(arch, {})
    teacher_model, student_model = dict(TEACHER, arch=arch, kwargs=kwargs), dict(STUDENT, arch=arch, kwargs=kwargs)
    kd = {"teacher": {"checkpoint": teacher_ckpt}, "methods": KD_METHODS, "aid": {"enabled": False},
          "loss_scale": DISTILL_SCALE}
    aid = dict(kd, aid={"enabled": True, "granularity": "instance", "alpha": 0.1})
    head_aid = dict(aid, methods=HEAD_METHODS, loss_scale=1.0)
    return {
        "teacher": run("teacher", teacher_model, teacher_epochs),
        "student": run("student", student_model, student_epochs, data=student_data),
        "kd": run("kd", student_model, student_epochs, kd, data=student_data),
        "kd_aid": run("kd_aid", student_model, student_epochs, aid, data=student_data),
        "head_aid": run("head_aid", student_model, student_epochs, head_aid, data=student_data),
    }


def row_names(cfgs: dict[str, dict]) -> dict[str, str]:
    def model(raw):
        n = raw["train"]["epochs"]
        return f"{raw['model']['backbone']}, {n} epoch{'s' if n != 1 else ''}"

    return {"teacher": f"teacher ({model(cfgs['teacher'])})", "student": f"student ({model(cfgs['student'])}) alone",
            "kd": "student + KD (attention + non-local)", "kd_aid": "student + KD + AID (instance)",
            "head_aid": "student + cross-head KD + AID (instance)"}


def results_table(results: dict[str, dict], names: dict[str, str] | None = None,
                  classes: list[str] | None = None) -> str:
    """Markdown: one row per run; per-class COCO AP columns when there is more than one class."""
    names = names or {}
    per_class = list(classes or []) if len(classes or []) > 1 else []
    cols = ["COCO AP", "AP50", *(f"AP {c}" for c in per_class), "VOC mAP@0.5", "KITTI moderate mAP", "train s"]
    keys = [PRIMARY_METRIC, coco_key("AP50"), *(coco_class_key(c) for c in per_class), VOC_METRIC, KITTI_METRIC]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        m = r["metrics"]
        values = [f"{m.get(k, float('nan')):.1f}" for k in keys]
        seconds = "reused" if r.get("reused") else f"{r['seconds']:.0f}"
        lines.append(f"| {names.get(name, name)} | " + " | ".join(values) + f" | {seconds} |")
    return "\n".join(lines)


class AIDWeightLog(L.Callback):
    """Collects the AID instance weights the distiller applied in the last training epoch: one per ground-truth
    instance of the training split (each image is seen once an epoch), with the image id of each."""

    def __init__(self):
        self.weights: list[float] = []
        self.image_ids: list[int] = []
        self.per_image: dict[int, list[float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.weights, self.image_ids, self.per_image = [], [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        distiller = getattr(pl_module, "distiller", None)
        aid = getattr(distiller, "aid", None)
        if aid is None or aid.last_instance_weights is None:
            return
        for target, w in zip(batch[1], aid.last_instance_weights):
            values = [float(v) for v in w.detach().cpu()]
            image_id = int(target["image_id"])
            self.per_image[image_id] = values
            self.weights += values
            self.image_ids += [image_id] * len(values)


def _instance_kinds(data_root: Path, classes: list[str]) -> dict[int, list[str]]:
    """Per image id, the kind of each training instance in label order: 'mislabelled', 'hard' or 'clean' (from the
    generator's synth_meta.json; the dataset keeps the label lines of ``classes`` in file order)."""
    meta_path = data_root / "synth_meta.json"
    if not meta_path.exists():
        return {}
    frames = json.loads(meta_path.read_text())["frames"]
    kinds: dict[int, list[str]] = {}
    for stem, frame in frames.items():
        lines = (data_root / "training" / "label_2" / f"{stem}.txt").read_text().splitlines()
        out = []
        for line, obj in zip(lines, frame["objects"]):
            if line.split(" ", 1)[0] in classes:
                out.append("mislabelled" if obj["mislabel"] else "hard" if obj["hard"] else "clean")
        kinds[int(stem)] = out
    return kinds


def summarize_aid(log: AIDWeightLog, data_root: Path, classes: list[str]) -> dict:
    """``{"instances", "mean", "min", "max", "below_0.5", "by_kind": {kind: {"instances", "mean"}}}`` of the
    weights of the last epoch; ``by_kind`` only where the generator's metadata matches every image's instances."""
    w = torch.tensor(log.weights, dtype=torch.float64)
    if w.numel() == 0:
        return {"instances": 0}
    summary = {"instances": int(w.numel()), "mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
               "below_0.5": int((w < 0.5).sum())}
    kinds = _instance_kinds(data_root, classes)
    if kinds and all(len(kinds.get(i, [])) == len(v) for i, v in log.per_image.items()):
        groups: dict[str, list[float]] = {}
        for image_id, values in log.per_image.items():
            for kind, value in zip(kinds[image_id], values):
                groups.setdefault(kind, []).append(value)
        summary["by_kind"] = {k: {"instances": len(v), "mean": sum(v) / len(v)}
                              for k, v in sorted(groups.items(), key=lambda kv: ("clean", "hard").index(kv[0])
                                                 if kv[0] in ("clean", "hard") else 2)}
    return summary


def aid_summary_text(s: dict) -> str:
    if not s.get("instances"):
        return "AID applied no instance weights (no ground-truth instance in the last epoch)"
    text = (f"AID (instance) weights applied in kd_aid's last epoch: {s['instances']} ground-truth instances (the "
            f"teacher's own loss on each), mean {s['mean']:.3f}, min {s['min']:.3f}, max {s['max']:.3f}; "
            f"{s['below_0.5']} below 0.5")
    if s.get("by_kind"):
        text += "\n  mean weight by instance kind (generator metadata): " + ", ".join(
            f"{k} {v['mean']:.3f} ({v['instances']})" for k, v in s["by_kind"].items())
    return text


def analyze_teacher(raw: dict, out_dir: Path) -> dict:
    """``aidkd analyze`` of the KD + AID run's teacher on the validation split: how many instances it finds, and the
    AID weights (at the run's alpha) of the found vs the missed ones."""
    from aidkd.engine.analysis import analyze

    cfg = config_from_dict(raw)
    s = analyze(cfg, cfg.distill.teacher.checkpoint, out_dir, split="val")
    at = next(v for a, v in s["by_alpha"].items() if float(a) == s["alpha"])
    return {"instances": s["instances"], "found": s["found"], "score_thresh": s["score_thresh"], "alpha": s["alpha"],
            "mean_w_found": at["mean_found"], "mean_w_missed": at["mean_missed"], "auc": s["auc_found_vs_missed"],
            "folder": str(out_dir)}


def teacher_analysis_text(a: dict) -> str:
    if a["found"] == 0:
        return (f"the teacher finds none of the {a['instances']} validation instances at score >= "
                f"{a['score_thresh']:g}: train it longer (aidkd analyze, in {a['folder']})")
    return (f"the teacher finds {a['found']} of the {a['instances']} validation instances (a same-class detection "
            f"above the KITTI IoU, score >= {a['score_thresh']:g}); AID weight (alpha {a['alpha']:g}) of found "
            f"{a['mean_w_found']:.3f} vs missed {a['mean_w_missed']:.3f}, ROC AUC {a['auc']:.3f} "
            f"(aidkd analyze, in {a['folder']})")


def _config_text(raw: dict) -> str:
    """What ``train`` writes to the run's config.yaml for ``raw`` (as ``dump_config`` does)."""
    return yaml.safe_dump(config_from_dict(raw).to_dict(), sort_keys=False)


def stage_state(run_dir: Path, raw: dict) -> str:
    """What an earlier demo left in ``run_dir`` for the configuration ``raw``: ``"finished"`` (final metrics and
    model file of exactly this configuration), ``"interrupted"`` (this configuration, a checkpoint to resume from,
    no final metrics), ``"unfinished"`` (this configuration, stopped before its first checkpoint), ``"changed"``
    (a run of another configuration) or ``"new"`` (nothing)."""
    try:
        config = (run_dir / "config.yaml").read_text()
    except OSError:
        return "new"
    if config != _config_text(raw):
        return "changed"
    try:
        finished = bool(json.loads((run_dir / "final_metrics.json").read_text()))
    except (OSError, ValueError):
        finished = False
    if finished and (run_dir / "model_best.pt").exists():
        return "finished"
    checkpoints = run_dir / "checkpoints"
    return "interrupted" if any((checkpoints / n).is_file() for n in RESUMABLE) else "unfinished"


def cpu_threads() -> tuple[int, int, float]:
    """``(threads, usable cores, 1-min load average)``: torch threads for the cores other processes leave free.
    More threads than free cores spin against the other processes and cost CPU time without gaining speed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        load = 0.0
    return max(1, cores - round(load)), cores, load


def demo_command(out: Path, quick: bool, arch: str) -> str:
    """The ``aidkd demo`` command line that continues this demo (same folder, size and family)."""
    parts = ["aidkd demo", *(["--quick"] if quick else []), *(["--arch", arch] if arch != "gfl" else []),
             *(["--out", str(out)] if Path(out) != Path(DEFAULT_OUT) else [])]
    return " ".join(parts)


def _train_seconds(run_dir: Path, fallback: float) -> float:
    """The run's own training time (train_time.json: every segment of a resumed run), else ``fallback``."""
    try:
        return float(json.loads((run_dir / "train_time.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def run_demo(out: Path = Path(DEFAULT_OUT), quick: bool = False, arch: str = "gfl", fresh: bool = False) -> dict:
    from aidkd.engine.run import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = demo_configs(out, quick, arch)
    if fresh:  # only the folders the demo itself writes
        for sub in ("data", *cfgs):
            shutil.rmtree(out / sub, ignore_errors=True)
    try:
        previous = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        previous = {}
    threads, cores, load = cpu_threads()
    torch.set_num_threads(threads)
    console.print(f"torch threads: {threads} ({cores} usable cores, 1-min load average {load:.1f})", highlight=False)
    again = demo_command(out, quick, arch)
    results: dict[str, dict] = {}
    aid_log = AIDWeightLog()
    start = time.time()
    teacher_trained = False
    for name, raw in cfgs.items():
        console.rule(f"[bold]{name}")
        run_dir = out / name
        state = stage_state(run_dir, raw)
        if teacher_trained and name in DISTILLED and state != "new":
            state = "teacher"  # distilled from another teacher than the one trained just now
        if state == "finished":
            console.print(f"reusing {name}, finished by an earlier run with the same configuration ({run_dir}); "
                          f"`{again} --fresh` trains everything again", highlight=False)
            metrics = read_metrics((run_dir / "final_metrics.json").read_text())
            seconds = _train_seconds(run_dir, float(previous.get(name, {}).get("seconds", 0.0)))
            results[name] = {"metrics": metrics, "seconds": seconds, "reused": True}
            continue
        if state == "interrupted":
            console.print(f"resuming {name} from its checkpoint in {run_dir / 'checkpoints'}", highlight=False)
        elif state != "new":
            why = {"changed": "the run there is of another configuration",
                   "unfinished": "the run there stopped before its first checkpoint",
                   "teacher": "its teacher was trained again"}[state]
            console.print(f"training {name} anew in {run_dir}: {why}", highlight=False)
        t0 = time.time()
        # overwrite: removes only what a run writes there (run_folder.RUN_OUTPUTS)
        metrics = train(config_from_dict(raw), extra_callbacks=[aid_log] if name == "kd_aid" else (),
                        resume=True if state == "interrupted" else None, overwrite=state != "interrupted",
                        resume_hint=f"run `{again}` again to resume the demo")
        results[name] = {"metrics": metrics, "seconds": _train_seconds(run_dir, time.time() - t0), "reused": False}
        teacher_trained = teacher_trained or name == "teacher"
    data_root = Path(cfgs["teacher"]["data"]["root"])
    if results["kd_aid"]["reused"] and previous.get("kd_aid", {}).get("aid_weights"):
        results["kd_aid"]["aid_weights"] = previous["kd_aid"]["aid_weights"]  # logged while it trained
    else:
        results["kd_aid"]["aid_weights"] = summarize_aid(aid_log, data_root, DEMO_CLASSES)
    results["kd_aid"]["teacher_analysis"] = analyze_teacher(cfgs["kd_aid"], out / "kd_aid" / "analysis")
    table = results_table(results, row_names(cfgs), DEMO_CLASSES)
    aid_text = (aid_summary_text(results["kd_aid"]["aid_weights"]) + "\n"
                + teacher_analysis_text(results["kd_aid"]["teacher_analysis"]))
    (out / "results.json").write_text(strict_json(results, indent=2))
    (out / "results.md").write_text(table + "\n\n" + aid_text + "\n")
    console.rule("[bold]aidkd demo results (validation split of the generated set)")
    console.print(f"classes: {', '.join(DEMO_CLASSES)} (the demo generates only cars: the class a teacher learns "
                  "from random weights in a few CPU minutes)", highlight=False)
    console.print(table, markup=False, highlight=False, soft_wrap=True)  # soft_wrap: table rows stay whole
    console.print(aid_text, markup=False, highlight=False)
    console.print(f"total {time.time() - start:.0f} s", highlight=False)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}; per run ({', '.join(cfgs)}) "
                  f"under {out}/<run>/: model_best.pt, config.yaml, final_metrics.json, TensorBoard logs (tb/); "
                  f"scenes under {data_root}", markup=False, highlight=False)
    console.print(f"report (one HTML page of all {len(cfgs)} runs): aidkd report {out}", markup=False,
                  highlight=False)
    return results
