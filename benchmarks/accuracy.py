"""Accuracy benchmark: student alone vs KD vs KD+AID vs self-distillation, one- and two-stage, over seeds.

One command, driven by a profile YAML (``benchmarks/profiles/<name>.yaml``). For each detector family of the
profile (``one-stage``: RetinaNet or GFL; ``two-stage``: Faster R-CNN):

1. the teacher is trained once (teacher schedule, ``teacher_seed``);
2. the self-distillation teacher -- a copy of the *student* architecture -- is trained once on the teacher schedule;
3. for every seed, on the student schedule (same epochs and lr for all): ``student`` alone, ``kd`` (attention +
   non-local), ``kd_aid_instance``, ``kd_aid_level`` and ``self_kd_aid`` (KD + AID (instance) from the
   self-distillation teacher). Optional variants (a profile's ``variants`` or ``--variants``): ``pkd``, ``pkd_aid``
   and the head methods (``aidkd.distill.head``) ``ld``, ``ld_aid``, ``ld_aid_decoupled`` (GFL only), ``logit_kd``,
   ``logit_kd_aid``, ``cross_head``, ``cross_head_aid`` (one-stage only), ``pkd_ld``, ``pkd_logit_kd``,
   ``pkd_cross_head``, at the profile's ``head_scale`` (default 1), with a family's ``head_params: {method:
   {param: value}}``.

Every run goes through ``aidkd.engine.run.train`` (the same code as ``aidkd train`` / ``aidkd distill``) and leaves
its folder under ``--runs-dir`` (checkpoints, TensorBoard/CSV logs, ``final_metrics.json``). A run whose
``final_metrics.json`` exists is skipped, and a run that was killed continues from its ``checkpoints/last.ckpt``
(written every epoch; runs validate about four times, always at their last epoch), so re-running the command
resumes. Reuse is checked: each run folder records its config, the sha256 of the checkpoints it starts or
distils from and a digest of aidkd's code (``bench_inputs.json``), and a run whose record differs from what the profile gives now -- or whose
teacher is such a run -- stops the command (``--rerun-stale`` retrains them). ``--max-minutes`` stops *before* a run
whose estimated duration (from finished runs of the same kind) would pass the budget, and before any run once the
budget is spent; what finished is summarised either way.

Results in ``benchmarks/results/accuracy_<profile>/``: ``results.json`` (every run's metrics and time, the
aggregates), ``results.md`` (mean +- sample std over seeds of COCO AP, AP50, VOC mAP@0.5 and -- for KITTI-style
labels -- KITTI moderate mAP) and ``accuracy.png`` (bar chart). Profiles that need fixed split files (KITTI
``split: {first_n_train: N}``) get them written ImageSets-style into that folder (``splits/train.txt``,
``splits/val.txt``: the first N sorted stems are train, the rest val).

    .venv/bin/python benchmarks/accuracy.py --profile synth_cpu
    .venv/bin/python benchmarks/accuracy.py --profile kitti101_cpu --only one-stage --seeds 0 1 2 --max-minutes 120
    .venv/bin/python benchmarks/accuracy.py --profile synth_cpu --smoke       # ~2 min wiring check
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import yaml

from aidkd.engine.run_folder import record_run_file
from aidkd.eval import read_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmarks' shared helpers, also when this file is imported by path (tests)
from _common import portable, source_commit

REPO = HERE.parent
PROFILES_DIR = HERE / "profiles"
RESULTS = HERE / "results"

FAMILIES = ("one-stage", "two-stage")
# head distillation (aidkd.distill.head): variant -> (head method, AID granularity or None, decoupled AID, with PKD)
HEAD_VARIANTS = {"ld": ("ld", None, False, False), "ld_aid": ("ld", "instance", False, False),
                 "ld_aid_decoupled": ("ld", "instance", True, False), "logit_kd": ("logit_kd", None, False, False),
                 "logit_kd_aid": ("logit_kd", "instance", False, False),
                 "cross_head": ("cross_head", None, False, False),
                 "cross_head_aid": ("cross_head", "instance", False, False), "pkd_ld": ("ld", None, False, True),
                 "pkd_logit_kd": ("logit_kd", None, False, True), "pkd_cross_head": ("cross_head", None, False, True)}
SEED_VARIANTS = ("student", "kd", "kd_aid_instance", "kd_aid_level", "self_kd_aid", "pkd", "pkd_aid", *HEAD_VARIANTS)
# what a profile without ``variants`` trains (the committed results were made with these)
DEFAULT_VARIANTS = ("student", "kd", "kd_aid_instance", "kd_aid_level", "self_kd_aid")
PAIRED_REFS = ("student", "kd", "pkd")  # paired differences are given against each of these
# PKD (aidkd.distill.pkd) unless a family's profile entry sets ``pkd_methods``
DEFAULT_PKD_METHODS = [{"name": "pkd"}]
METRICS = [("coco/AP", "COCO AP"), ("coco/AP50", "AP50"), ("voc/mAP50", "VOC mAP@0.5"),
           ("kitti/moderate_mAP", "KITTI moderate mAP")]
LABELS = {"teacher": "teacher", "self_teacher": "self-distillation teacher (student arch, teacher schedule)",
          "student": "student alone", "kd": "KD (attention + non-local)", "kd_aid_instance": "KD + AID (instance)",
          "kd_aid_level": "KD + AID (level)", "self_kd_aid": "self-distillation, KD + AID (instance)",
          "pkd": "PKD (Pearson, per-channel standardised MSE)", "pkd_aid": "PKD + AID (instance)",
          "ld": "LD (box-edge distributions)", "ld_aid": "LD + AID (instance)",
          "ld_aid_decoupled": "LD + AID (instance, decoupled cls / box)", "logit_kd": "logit KD (scores + boxes)",
          "logit_kd_aid": "logit KD + AID (instance)", "cross_head": "cross-head KD (student tower -> teacher head)",
          "cross_head_aid": "cross-head KD + AID (instance)", "pkd_ld": "PKD + LD", "pkd_logit_kd": "PKD + logit KD",
          "pkd_cross_head": "PKD + cross-head KD"}

SHORT = {"teacher": "teacher", "self_teacher": "self-distil. teacher", "student": "student", "kd": "KD",
         "kd_aid_instance": "KD+AID (instance)", "kd_aid_level": "KD+AID (level)", "self_kd_aid": "self-distil. KD+AID",
         "pkd": "PKD", "pkd_aid": "PKD+AID", "ld": "LD", "ld_aid": "LD+AID", "ld_aid_decoupled": "LD+AID (dec.)",
         "logit_kd": "logit KD", "logit_kd_aid": "logit KD+AID", "cross_head": "cross-head",
         "cross_head_aid": "cross-head+AID", "pkd_ld": "PKD+LD", "pkd_logit_kd": "PKD+logit KD",
         "pkd_cross_head": "PKD+cross-head"}

log = logging.getLogger("aidkd.bench")


# ------------------------------------------------------------------------------------------------ profile
def load_profile(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILES_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.yaml")))
        raise SystemExit(f"profile not found: {p} (known: {known})")
    prof = yaml.safe_load(p.read_text())
    prof.setdefault("name", p.stem)
    unknown = set(prof) - {"name", "description", "data", "split", "families", "schedule", "train", "eval", "seeds",
                           "teacher_seed", "aid_alpha", "variants", "distill_scale", "pkd_scale", "head_scale", "smoke"}
    if unknown:
        raise SystemExit(f"{p}: unknown profile key(s) {sorted(unknown)}")
    return prof


def resolve_paths(data: dict) -> dict:
    """Profile paths are relative to the repository root."""
    data = copy.deepcopy(data)
    for key in ("root", "train_ann", "train_images", "val_ann", "val_images", "train_split_file", "val_split_file"):
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str((REPO / data[key]).resolve())
    return data


def write_kitti_split(root: Path, out: Path, n_train: int) -> tuple[Path, Path]:
    """ImageSets-style split files: the first ``n_train`` sorted stems of ``image_2`` are train, the rest val."""
    stems = sorted(p.stem for p in (root / "training" / "image_2").iterdir() if p.is_file())
    if len(stems) <= n_train:
        raise SystemExit(f"{root}: {len(stems)} images, cannot keep {n_train} for training and some for val")
    out.mkdir(parents=True, exist_ok=True)
    tr, va = out / "train.txt", out / "val.txt"
    tr.write_text("\n".join(stems[:n_train]) + "\n")
    va.write_text("\n".join(stems[n_train:]) + "\n")
    return tr, va


def apply_smoke(prof: dict) -> dict:
    """A few steps per run on tiny images: checks the wiring in about two minutes on the CPU."""
    prof = copy.deepcopy(prof)
    smoke = prof.pop("smoke", {}) or {}
    data = prof["data"]
    data.update({"min_size": 64, "max_size": 160, "batch_size": 2}, **smoke.get("data", {}))
    if data.get("format") == "synth":
        data["synth"] = dict(data.get("synth", {}), num_images=10, width=160, height=64)
    for fam in prof["families"].values():
        fam["teacher"] = {"backbone": "resnet18", "fpn_channels": 16}
        fam["student"] = {"backbone": "resnet18", "fpn_channels": 8}
    prof["schedule"] = {"teacher": {"epochs": 1, "warmup_steps": 1}, "student": {"epochs": 1, "warmup_steps": 1}}
    prof["train"] = dict(prof.get("train", {}), limit_train_batches=2, limit_val_batches=2)
    prof["seeds"] = [0]
    return prof


# ------------------------------------------------------------------------------------------------ run configs
def val_every(epochs: int) -> int:
    """Validate about four times a run, always at the last epoch (a divisor of ``epochs``); ``checkpoints/last.ckpt``,
    from which a killed run resumes, is written every epoch."""
    return max(d for d in range(1, epochs + 1) if epochs % d == 0 and d <= max(1, epochs // 4))


def parse_scale(text) -> float:
    """A distillation loss scale: a number or a fraction such as ``1/30``."""
    try:
        value = float(Fraction(str(text).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f"distillation scale {text!r}: expected a number or a fraction such as 1/30") from None
    if value <= 0:
        raise SystemExit(f"distillation scale {text!r} must be > 0")
    return value


def scale_tag(scale: float) -> str:
    """Folder suffix of a scale: '' for 1, 'div30' for 1/30, 'x2' for 2."""
    if math.isclose(scale, 1.0):
        return ""
    inv = 1 / scale
    return f"div{round(inv)}" if math.isclose(inv, round(inv), rel_tol=1e-6) else f"x{scale:g}"


def kd_section(methods: list[dict], teacher_ckpt: str, aid: str | None, alpha: float, scale: float = 1.0,
               decoupled: bool = False) -> dict:
    aid_section = {"enabled": aid is not None, "granularity": aid or "instance", "alpha": alpha}
    if decoupled:
        aid_section["decoupled"] = True
    return {"teacher": {"checkpoint": teacher_ckpt},
            "methods": [{"name": m["name"], "params": {k: v for k, v in m.items() if k != "name"}} for m in methods],
            "aid": aid_section,
            "loss_scale": scale, "image_log_every": 0}


def plan_runs(prof: dict, runs_dir: Path, families: list[str], seeds: list[int], scale: float | None = None
              ) -> list[dict]:
    """Ordered list of {key, family, variant, seed, scale, cfg (RunConfig dict), kind} -- teachers before their
    students. Distillation runs at a loss ``scale`` other than 1 get their own folders (``kd_div30_seed0``); the
    teachers and the student-alone runs do not depend on it and are shared across scales."""
    scale = parse_scale(prof.get("distill_scale", 1)) if scale is None else scale
    # PKD standardises the features, so its weight needs no per-setting scaling: distill_scale (for the attention /
    # non-local weights tuned at 256 channels and 1333x800) does not apply to it; pkd_scale (default 1) does
    pkd_scale = parse_scale(prof.get("pkd_scale", 1))
    # The head methods are normalised like the detection loss (docs/method.md §6): head_scale (default 1), not
    # distill_scale; PKD + a head method runs at head_scale, with PKD's weight from pkd_methods.
    head_scale = parse_scale(prof.get("head_scale", 1))
    data = resolve_paths(prof["data"])
    common_train = {"progress_bar": False, "log_every": 10, **prof.get("train", {})}
    sched = prof["schedule"]
    alpha = float(prof.get("aid_alpha", 0.1))
    variants = list(prof.get("variants", DEFAULT_VARIANTS))
    unknown = set(variants) - set(SEED_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {SEED_VARIANTS}")
    runs = []
    for fam_name in families:
        fam = prof["families"].get(fam_name)
        if fam is None:
            continue
        arch = fam["arch"]
        fam_dir = runs_dir / fam_name

        def cfg(name: str, part: str, kind: str, seed: int, distill: dict | None, *, _fam=fam, _arch=arch,
                _fam_name=fam_name, _fam_dir=fam_dir) -> dict:
            train = {**common_train, **sched[kind]}
            train.setdefault("val_every", val_every(int(train.get("epochs", 12))))
            model = {"arch": _arch, **_fam[part]}
            if model.get("weights") and not Path(model["weights"]).is_absolute():  # e.g. another profile's run
                model["weights"] = str((REPO / model["weights"]).resolve())
            c = {"name": f"{prof['name']}/{_fam_name}/{name}", "output_dir": str(_fam_dir / name), "seed": seed,
                 "data": data, "model": model, "train": train, "distill": distill}
            if prof.get("eval"):
                c["eval"] = prof["eval"]
            return c

        tseed = int(prof.get("teacher_seed", 0))
        teacher_ckpt = str(fam_dir / "teacher" / "model_best.pt")
        self_ckpt = str(fam_dir / "self_teacher" / "model_best.pt")
        need_self = "self_kd_aid" in variants
        runs.append({"key": f"{fam_name}/teacher", "family": fam_name, "variant": "teacher", "seed": tseed,
                     "kind": "teacher", "cfg": cfg("teacher", "teacher", "teacher", tseed, None)})
        if need_self:
            runs.append({"key": f"{fam_name}/self_teacher", "family": fam_name, "variant": "self_teacher",
                         "seed": tseed, "kind": "self_teacher",
                         "cfg": cfg("self_teacher", "student", "teacher", tseed, None)})
        for seed in seeds:
            for v in variants:
                if v == "student":
                    distill = None
                elif v == "self_kd_aid":
                    distill = kd_section(fam["methods"], self_ckpt, "instance", alpha, scale)
                elif v in HEAD_VARIANTS:
                    method, aid, decoupled, with_pkd = HEAD_VARIANTS[v]
                    if not head_method_applies(method, arch):
                        continue  # e.g. ld is GFL's only
                    head = [{"name": method, **fam.get("head_params", {}).get(method, {})}]
                    pkd = list(fam.get("pkd_methods", DEFAULT_PKD_METHODS)) if with_pkd else []
                    distill = kd_section(pkd + head, teacher_ckpt, aid, alpha, head_scale, decoupled)
                elif v in ("pkd", "pkd_aid"):
                    distill = kd_section(fam.get("pkd_methods", DEFAULT_PKD_METHODS), teacher_ckpt,
                                         "instance" if v == "pkd_aid" else None, alpha, pkd_scale)
                else:
                    distill = kd_section(fam["methods"], teacher_ckpt, v.removeprefix("kd_aid_") if "aid" in v
                                         else None, alpha, scale)
                v_tag = scale_tag(distill["loss_scale"]) if distill else ""
                name = f"{v}_{v_tag}_seed{seed}" if v_tag else f"{v}_seed{seed}"
                runs.append({"key": f"{fam_name}/{name}", "family": fam_name, "variant": v, "seed": seed,
                             "scale": distill["loss_scale"] if distill else None,
                             "kind": "distill" if distill else "student",
                             "cfg": cfg(name, "student", "student", seed, distill)})
    return runs


def head_method_applies(method: str, arch: str) -> bool:
    """Whether head method ``method`` distils detector ``arch`` (its ``families``; the arch names are the ops'
    family names)."""
    from aidkd.distill.registry import HEAD_METHODS

    return arch in HEAD_METHODS[method].families


# ------------------------------------------------------------------------------------------------ provenance
PROVENANCE = "bench_inputs.json"  # in each run folder: what its result was trained from
_DIGESTS: dict = {}  # file digests by (path, mtime, size); code digests by package folder


def file_digest(path: str | None) -> str | None:
    """sha256 of a checkpoint (None if there is no such file, e.g. a torchvision weights name); cached per mtime."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return None
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def code_digest(package: Path | None = None) -> str:
    """sha256 of the aidkd package's code as Python sees it: every module's syntax tree without docstrings (comments
    never reach the tree), so a run trained by other code is stale while a reworded comment or docstring is not."""
    if package is None:
        import aidkd

        package = Path(aidkd.__file__).parent
    if package in _DIGESTS:
        return _DIGESTS[package]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    _DIGESTS[package] = h.hexdigest()
    return _DIGESTS[package]


def _comparable(cfg: dict) -> dict:
    """A run config as compared across invocations: paths repository-relative (a moved checkout still matches)."""
    cfg = json.loads(portable(json.dumps(cfg, sort_keys=True, default=str)))
    cfg.pop("output_dir", None)
    return cfg


def provenance(run: dict) -> dict:
    """What a run's result depends on: its full config (the code's defaults filled in) and the content of every
    checkpoint it starts from or distils from -- a retrained teacher makes its students stale although their configs
    are unchanged -- and the code that trained it (:func:`code_digest`; records from before it was kept have none
    and are not compared on it)."""
    from aidkd.engine.config import config_from_dict

    distill = run["cfg"].get("distill") or {}
    return {"config": _comparable(config_from_dict(run["cfg"]).to_dict()),
            "inputs": {"model.weights": file_digest(run["cfg"]["model"].get("weights")),
                       "distill.teacher": file_digest(distill.get("teacher", {}).get("checkpoint"))},
            "code": code_digest()}


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ; keys the old record lacks (settings added to the code since) are
    not compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old, key=str) for d in _differences(old[k], new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def stale_runs(plan: list[dict]) -> dict[str, str]:
    """Runs on disk (finished or resumable) that the plan would reuse although they were trained from another config
    or other input checkpoints, and the runs distilled from a stale teacher: {key: why}. A folder from before
    ``bench_inputs.json`` existed is compared by the ``config.yaml`` its training wrote; its input checkpoints cannot
    be checked and are recorded as they are now (logged)."""
    stale: dict[str, str] = {}
    for r in plan:  # teachers come first in the plan, so a stale teacher is known before its students
        out = Path(r["cfg"]["output_dir"])
        if not ((out / "final_metrics.json").exists() or (out / "checkpoints").is_dir()):
            continue
        dep = dependency(r)
        if dep in stale:
            stale[r["key"]] = f"its teacher {dep} is stale"
            continue
        rec, now = out / PROVENANCE, provenance(r)
        legacy = not rec.exists()
        if not legacy:
            old = json.loads(rec.read_text())
        elif (out / "config.yaml").exists():
            old = {"config": _comparable(yaml.safe_load((out / "config.yaml").read_text())), "inputs": now["inputs"]}
            log.warning("%s: trained before %s was recorded; its config is checked, its input checkpoints are "
                        "assumed to be the current ones", r["key"], PROVENANCE)
        else:
            stale[r["key"]] = "no record of its config"
            continue
        diff = _differences(old, now)
        if diff:
            stale[r["key"]] = "differs in " + ", ".join(diff)
        elif legacy:
            record_provenance(out, now)
    return stale


def record_provenance(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    record_run_file(out, PROVENANCE)  # a file of the run folder that --overwrite may remove with the run


def _provenance_at_start(out: Path, record: dict):
    """A callback recording the provenance once the new run owns its folder (a fresh start clears the folder of
    a run killed early, with its record)."""
    import lightning as L

    class RecordProvenance(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                record_provenance(out, record)

    return RecordProvenance()


# ------------------------------------------------------------------------------------------------ execution
def run_one(run: dict) -> dict:
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import train

    cfg = config_from_dict(run["cfg"])
    out = Path(cfg.output_dir)
    done = out / "final_metrics.json"
    timing = out / "bench_timing.json"
    if done.exists():
        return load_done(run)
    t0 = time.time()
    ckpts = out / "checkpoints"
    resume = "auto" if any((ckpts / n).exists() for n in ("last.ckpt", "interrupted.ckpt")) else None
    if resume:
        log.info("%s: resuming from %s", run["key"], ckpts)
    # a fresh start replaces a run killed early, and records its provenance now, when its teacher exists (a resumed
    # run's record was checked by stale_runs)
    extra = () if resume else (_provenance_at_start(out, provenance(run)),)
    metrics = train(cfg, resume=resume, overwrite=not resume, extra_callbacks=extra)
    secs = time.time() - t0
    timing.write_text(json.dumps({"seconds": secs}) + "\n")
    record_run_file(out, timing.name)
    history = out / "metrics_history.jsonl"
    if not metrics and resume and history.exists():  # killed after its last validation: nothing left to train
        last = read_metrics(history.read_text().splitlines()[-1])
        metrics = {k: v for k, v in last.items() if k not in ("epoch", "step")}
        done.write_text(json.dumps(metrics, indent=2))
    if not metrics:
        raise RuntimeError(f"{run['key']}: training finished without validation metrics")
    return {"metrics": metrics, "seconds": secs, "skipped": False, "resumed": _resumed(out)}


def run_in_worker(run: dict, fn=run_one) -> dict:
    """``fn(run)`` in a pool worker. A SIGTERM (the benchmark's death, via PR_SET_PDEATHSIG) ends a training with
    interrupted.ckpt saved and SystemExit; the executor would catch that and leave the worker waiting for work from a
    dead parent, so the worker exits instead (the parent, if alive, sees a broken pool: the run failed)."""
    try:
        return fn(run)
    except SystemExit as e:
        logging.shutdown()
        os._exit(e.code if isinstance(e.code, int) else 1)


def load_done(run: dict) -> dict | None:
    """The result of a run that finished earlier (None if it has not)."""
    out = Path(run["cfg"]["output_dir"])
    done, timing = out / "final_metrics.json", out / "bench_timing.json"
    if not done.exists():
        return None
    secs = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    return {"metrics": read_metrics(done.read_text()), "seconds": secs, "skipped": True, "resumed": _resumed(out)}


def _resumed(out: Path) -> bool:
    """A run resumed after a kill timed only its last invocation (each invocation adds a CSV log version)."""
    return len(list((out / "csv").glob("version_*"))) > 1


def estimate(run: dict, finished: dict[str, dict], plan: list[dict]) -> float | None:
    """Seconds a run will take: the median of finished runs of the same kind and family (None if none)."""
    same = [finished[r["key"]]["seconds"] for r in plan
            if r["key"] in finished and finished[r["key"]].get("seconds") and r["kind"] == run["kind"]
            and r["family"] == run["family"]]
    if not same and run["kind"] == "distill":
        same = [1.5 * finished[r["key"]]["seconds"] for r in plan if r["key"] in finished
                and finished[r["key"]].get("seconds") and r["kind"] == "student" and r["family"] == run["family"]]
    return statistics.median(same) if same else None


# ------------------------------------------------------------------------------------------------ scheduling
def dependency(run: dict) -> str | None:
    """Key of the teacher run a distillation run needs, or None."""
    if not run["cfg"]["distill"]:
        return None
    return f"{run['family']}/{'self_teacher' if run['variant'] == 'self_kd_aid' else 'teacher'}"


def next_ready(pending: list[dict], finished: dict, failed: dict) -> tuple[dict | None, list[dict]]:
    """The run to start next and the runs that can never start (their teacher failed). Teachers go first -- they are
    the longest runs and everything distilled waits for them -- then the plan's order."""
    blocked = [r for r in pending if dependency(r) in failed]
    ready = [r for r in pending if r not in blocked and (dependency(r) is None or dependency(r) in finished)]
    ready.sort(key=lambda r: r["variant"] not in ("teacher", "self_teacher"))  # stable: plan order otherwise
    return (ready[0] if ready else None), blocked


def _worker_init(threads: int | None, verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    import torch

    import aidkd.engine.run  # noqa: F401

    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)


def _pool_worker_init(threads: int | None, verbose: bool) -> None:
    """A training worker: dies with the benchmark process. A killed benchmark otherwise leaves its workers training
    on as orphans (each holding GBs), fighting the next invocation for the cores."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            log.warning("could not tie this worker's life to the benchmark process (prctl unavailable)")
    _worker_init(threads, verbose)


def _report(run: dict, result: dict, done: int, total: int) -> None:
    m, secs = result["metrics"], result["seconds"]
    print(f"[{done}/{total}] {run['key']}: AP {m.get('coco/AP', math.nan):.1f}  AP50 {m.get('coco/AP50', math.nan):.1f}"
          f"  VOC {m.get('voc/mAP50', math.nan):.1f}  KITTI mod {m.get('kitti/moderate_mAP', math.nan):.1f}  "
          f"({'n/a' if secs is None else f'{secs:.0f} s'}{', done earlier' if result['skipped'] else ''})", flush=True)


def execute(plan: list[dict], jobs: int, threads: int | None, verbose: bool, budget: float | None
            ) -> tuple[dict, dict, str | None]:
    """Train the plan, ``jobs`` runs at a time (1: in this process). Returns (finished, failed, stopped-reason)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    start = time.time()
    finished: dict[str, dict] = {}
    failed: dict[str, str] = {}
    stopped = None
    pending = list(plan)
    pool = (cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_pool_worker_init,
                                   initargs=(threads, verbose)) if jobs > 1 else None)
    running: dict = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs) and stopped is None:
                run, blocked = next_ready(pending, finished, failed)
                for b in blocked:
                    pending.remove(b)
                    failed[b["key"]] = f"teacher run {dependency(b)} failed"
                    print(f"{b['key']}: SKIPPED, {failed[b['key']]}", flush=True)
                if run is None:
                    break
                done_already = (Path(run["cfg"]["output_dir"]) / "final_metrics.json").exists()
                if budget is not None and not done_already:
                    spent = time.time() - start
                    est = estimate(run, finished, plan)
                    if spent >= budget or (est is not None and spent + est > budget):
                        stopped = (f"--max-minutes {budget / 60:g}: stopped before {run['key']} (spent "
                                   f"{spent / 60:.1f} min, estimate {'n/a' if est is None else f'{est / 60:.1f} min'})")
                        print(stopped, flush=True)
                        break
                pending.remove(run)
                print(f"    start {run['key']} ({'done earlier' if done_already else 'training'})", flush=True)
                running[run["key"]] = (run, pool.submit(run_in_worker, run) if pool else None)
            if not running:
                break
            if pool is None:  # --jobs 1: train in this process
                run, _ = next(iter(running.values()))
                outcome = [(run, lambda r=run: run_one(r))]
            else:
                done, _ = cf.wait([f for _, f in running.values()], return_when=cf.FIRST_COMPLETED)
                outcome = [(r, f.result) for r, f in running.values() if f in done]
            for run, get in outcome:
                del running[run["key"]]
                try:
                    finished[run["key"]] = get()
                except Exception as e:
                    log.exception("run %s failed", run["key"])
                    failed[run["key"]] = f"{type(e).__name__}: {e}"
                    continue
                _report(run, finished[run["key"]], len(finished) + len(failed), len(plan))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return finished, failed, stopped


# ------------------------------------------------------------------------------------------------ summary
def mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def aggregate(plan: list[dict], finished: dict[str, dict]) -> dict:
    agg: dict = {}
    for r in plan:
        if r["key"] not in finished:
            continue
        fam = agg.setdefault(r["family"], {})
        fam.setdefault(r["variant"], []).append({"seed": r["seed"], **finished[r["key"]]})
    out: dict = {}
    for fam, variants in agg.items():
        out[fam] = {}
        for v, rows in variants.items():
            entry = {"n": len(rows), "seeds": [x["seed"] for x in rows]}
            for key, _ in METRICS:
                m, s, n = mean_std([x["metrics"].get(key) for x in rows])
                entry[key] = {"mean": m, "std": s, "n": n}
            entry["seconds_mean"] = mean_std([x.get("seconds") for x in rows])[0]
            entry["resumed"] = any(x.get("resumed") for x in rows)
            out[fam][v] = entry
        base = out[fam].get("student")
        if base:
            for v, entry in out[fam].items():
                for key, _ in METRICS:
                    entry[key]["delta_vs_student"] = entry[key]["mean"] - base[key]["mean"]
        # Paired by seed (same initialisation and batch order): the spread of the *difference*, which is what
        # says whether a method helps, is much smaller than the spread of each variant's own metric.
        for v in SEED_VARIANTS[1:]:  # every variant but the student alone
            for ref in PAIRED_REFS:
                if v == ref or v not in variants or ref not in variants:
                    continue
                by_seed = {x["seed"]: x["metrics"] for x in variants[ref]}
                for key, _ in METRICS:
                    diffs = [x["metrics"][key] - by_seed[x["seed"]][key] for x in variants[v]
                             if x["seed"] in by_seed and key in x["metrics"] and key in by_seed[x["seed"]]]
                    m, sd, n = mean_std(diffs)
                    out[fam][v][key][f"paired_vs_{ref}"] = {"mean": m, "std": sd, "n": n,
                                                           "wins": sum(d > 0 for d in diffs)}
    return out


def _cell(e: dict, with_delta: bool) -> str:
    m, s = e["mean"], e["std"]
    if m is None or math.isnan(m):
        return "n/a"
    txt = f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"
    d = e.get("delta_vs_student")
    if with_delta and d is not None and not math.isnan(d):
        txt += f" ({d:+.1f})"
    return txt


def markdown(prof: dict, scale: float, summary: dict, plan: list[dict], finished: dict, args, elapsed: float) -> str:
    metrics = [(k, n) for k, n in METRICS if any(
        not math.isnan(v.get(k, {}).get("mean", math.nan)) for fam in summary.values() for v in fam.values())]
    lines = [f"# Accuracy: KD and AID ({prof['name']}{' smoke' if args.smoke else ''})", ""]
    if prof.get("description"):
        lines += [prof["description"].strip(), ""]
    d = prof["data"]
    lines.append(f"Data: format {d.get('format')}, images {d.get('min_size')}x{d.get('max_size')} "
                 f"(min x max side), batch {d.get('batch_size')}. Teacher schedule {prof['schedule']['teacher']}; "
                 f"student schedule (all student runs) {prof['schedule']['student']}. AID alpha "
                 f"{prof.get('aid_alpha', 0.1)}. Distillation loss scale {Fraction(scale).limit_denominator(1000)} "
                 f"(times method.md's weights listed below; PKD at {prof.get('pkd_scale', 1)}: its standardised loss "
                 f"needs no per-setting scale).")
    lines.append("")
    for fam_name, fam in prof["families"].items():
        if fam_name in summary:
            lines.append(f"- {fam_name}: {fam['arch']}, teacher {fam['teacher']}, student {fam['student']}, "
                         f"KD methods {fam['methods']}")
    lines += ["", ("Values: mean ± sample std over seeds (teacher rows: one run); in brackets the difference to "
                   "the student alone."), ""]
    for fam_name, fam in summary.items():
        lines += [f"## {fam_name} ({prof['families'][fam_name]['arch']})", "",
                  "| run | seeds | " + " | ".join(n for _, n in metrics) + " | train s (mean) |",
                  "|---|---|" + "---|" * len(metrics) + "---|"]
        for v in ("teacher", "self_teacher", *SEED_VARIANTS):
            if v not in fam:
                continue
            e = fam[v]
            cells = " | ".join(_cell(e[k], v not in ("student", "teacher", "self_teacher")) for k, _ in metrics)
            secs = e.get("seconds_mean")
            secs_txt = "n/a" if secs is None or math.isnan(secs) else f"{secs:.0f}{' (resumed)' if e['resumed'] else ''}"
            lines.append(f"| {LABELS[v]} | {e['n']} | {cells} | {secs_txt} |")
        lines.append("")
        lines += paired_table(fam, metrics)
    wanted = [r["key"] for r in plan if requested(r, args)]
    missing = [k for k in wanted if k not in finished]
    if missing:
        more = " ..." if len(missing) > 20 else ""
        lines += [f"Not run (budget or failure): {len(missing)} of {len(wanted)} runs: {', '.join(missing[:20])}{more}",
                  ""]
    run_s = sum(f["seconds"] for f in finished.values() if f.get("seconds"))
    timing = (f"Wall time of this invocation: {elapsed / 60:.1f} min (finished runs are skipped, so a re-run that "
              f"only summarises is short); sum of the runs' training times: {run_s / 60:.1f} min.")
    lines += [timing, "", f"Reproduce: `{reproduce_command(prof, scale, args)}` (finished runs are skipped)", "",
              f"Written at commit {source_commit()} by: `.venv/bin/python benchmarks/accuracy.py "
              + " ".join(args.argv) + "`"]
    return "\n".join(lines)


def requested(run: dict, args) -> bool:
    """Whether this invocation asked for ``run`` (``--variants`` selects; teachers are always needed)."""
    variants = getattr(args, "variants", None)
    return not variants or run["variant"] in variants or run["kind"] == "teacher" or (
        run["kind"] == "self_teacher" and "self_kd_aid" in variants)


def reproduce_command(prof: dict, scale: float, args) -> str:
    """The command that trains (or, once trained, re-summarises) what this results file shows."""
    parts = [".venv/bin/python benchmarks/accuracy.py", f"--profile {prof['name']}"]
    if getattr(args, "only", None):
        parts.append(f"--only {args.only}")
    if getattr(args, "seeds", None):
        parts.append("--seeds " + " ".join(map(str, args.seeds)))
    if getattr(args, "variants", None):
        parts.append("--variants " + " ".join(args.variants))
    if scale_tag(scale):
        parts.append(f"--distill-scale {Fraction(scale).limit_denominator(1000)}")
    if getattr(args, "smoke", False):
        parts.append("--smoke")
    if getattr(args, "results_dir", None):
        parts.append(f"--results-dir {portable(str(args.results_dir))}")
    return " ".join(parts + ["--jobs 2 --threads 1"])


def paired_table(fam: dict, metrics: list[tuple[str, str]]) -> list[str]:
    """Differences paired by seed: mean ± std of (variant - reference) over seeds, and how many seeds improved."""
    rows = []
    for v in SEED_VARIANTS:
        for ref in PAIRED_REFS:
            e = fam.get(v, {})
            if f"paired_vs_{ref}" not in e.get(metrics[0][0], {}):
                continue
            cells = []
            for k, _ in metrics:
                d = e[k].get(f"paired_vs_{ref}")
                cells.append("n/a" if d is None or math.isnan(d["mean"]) else
                             f"{d['mean']:+.2f}" + ("" if math.isnan(d["std"]) else f" ± {d['std']:.2f}")
                             + f" ({d['wins']}/{d['n']})")
            rows.append(f"| {SHORT[v]} − {SHORT[ref]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    note = ("Paired by seed (same initialisation and batch order): mean ± std of the difference, and in brackets the "
            "seeds where the variant is better.")
    return [note, "",
            "| difference | " + " | ".join(n for _, n in metrics) + " |", "|---|" + "---|" * len(metrics), *rows, ""]


def bar_chart(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(summary)
    if not fams:
        return
    keys = [k for k, _ in METRICS if any(not math.isnan(v[k]["mean"]) for f in summary.values() for v in f.values())]
    names = dict(METRICS)
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        variants = [v for v in ("teacher", "self_teacher", *SEED_VARIANTS) if v in summary[fam]]
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            e = summary[fam][v]
            means = [e[k]["mean"] for k in keys]
            stds = [0.0 if math.isnan(e[k]["std"]) else e[k]["std"] for k in keys]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=SHORT[v])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([names[k] for k in keys])
        ax.set_title(fam)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(7, len(labels)))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="synth_cpu", help="name under benchmarks/profiles/ or a YAML path")
    ap.add_argument("--only", choices=FAMILIES, help="run one detector family")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    ap.add_argument("--max-minutes", type=float, help="do not start a run that would end past this budget")
    ap.add_argument("--smoke", action="store_true", help="tiny wiring check (~2 min on CPU), separate folders")
    ap.add_argument("--runs-dir", help="where run folders go (default runs/accuracy/<profile>[_smoke])")
    ap.add_argument("--results-dir", help="default benchmarks/results/accuracy_<profile> (smoke: in the runs dir)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; --smoke: 1). Use 1 on a "
                    "machine shared with other jobs: 2 OpenMP threads on 2 busy cores can be 10x slower")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (use "
                    "--threads 1 with --jobs 2 on 2 cores); a distillation run waits for its teacher")
    ap.add_argument("--variants", nargs="+", choices=SEED_VARIANTS, help="override the profile's variants")
    ap.add_argument("--distill-scale", nargs="+", metavar="S", help="distillation loss scale(s), e.g. 1/30 (default: "
                    "the profile's distill_scale, else 1); several values run a sweep: the teachers and student-alone "
                    "runs are shared, results go to accuracy_<profile>_div30/ etc. and a table to *_sweep.md")
    ap.add_argument("--rerun-stale", action="store_true", help="delete and retrain run folders whose recorded config "
                    "or input checkpoints differ from what the profile gives now (default: stop with the list)")
    ap.add_argument("-v", "--verbose", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.argv = argv
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    _worker_init(threads, args.verbose)
    log.setLevel(logging.INFO)
    import torch

    prof = load_profile(args.profile)
    if args.smoke:
        prof = apply_smoke(prof)
    tag = prof["name"] + ("_smoke" if args.smoke else "")
    runs_dir = Path(args.runs_dir) if args.runs_dir else REPO / "runs" / "accuracy" / tag
    results_dir = Path(args.results_dir) if args.results_dir else (
        runs_dir / "results" if args.smoke else RESULTS / f"accuracy_{prof['name']}")
    results_dir.mkdir(parents=True, exist_ok=True)
    split = prof.get("split")
    if split:
        root = Path(resolve_paths(prof["data"])["root"])
        tr, va = write_kitti_split(root, results_dir / "splits", int(split["first_n_train"]))
        prof["data"]["train_split_file"], prof["data"]["val_split_file"] = str(tr), str(va)
    families = [args.only] if args.only else [f for f in FAMILIES if f in prof["families"]]
    seeds = args.seeds if args.seeds is not None else list(prof.get("seeds", [0, 1, 2]))
    scales = [parse_scale(x) for x in args.distill_scale] if args.distill_scale else [
        parse_scale(prof.get("distill_scale", 1))]
    # The summaries cover every run of the profile found on disk; --variants says what is trained now (and may name
    # variants the profile does not list, e.g. pkd: they are planned too).
    if args.variants:
        prof["variants"] = list(dict.fromkeys([*prof.get("variants", DEFAULT_VARIANTS), *args.variants]))
    plans = {sc: plan_runs(prof, runs_dir, families, seeds, sc) for sc in scales}
    every_run = list({r["key"]: r for p in plans.values() for r in p}.values())  # teachers / students shared
    every_run.sort(key=lambda r: r["variant"] not in ("teacher", "self_teacher"))
    # what is trained now; stale_runs below checks every_run, as the summaries read it
    plan = [r for r in every_run if requested(r, args)]
    missing = sorted({r["cfg"]["model"]["weights"] for r in plan if r["cfg"]["model"].get("weights")
                      and not Path(r["cfg"]["model"]["weights"]).exists()})
    if missing:
        raise SystemExit(f"profile {prof['name']}: initial weights not found: {', '.join(missing)} (a path under "
                         "runs/accuracy/<profile>/ is another profile's run: run that profile first)")
    stale = stale_runs(every_run)
    if args.dry_run:
        for r in plan:
            print(r["key"], json.dumps(r["cfg"]["model"]), json.dumps(r["cfg"]["train"]),
                  f"STALE: {stale[r['key']]}" if r["key"] in stale else "")
        return 0
    if stale and not args.rerun_stale:
        raise SystemExit(f"{len(stale)} run folder(s) under {runs_dir} were trained from other settings than the "
                         "profile now gives, so their results would be wrong to reuse:\n"
                         + "\n".join(f"  {k}: {why}" for k, why in stale.items())
                         + "\nre-run with --rerun-stale to delete and retrain them, or choose another --runs-dir")
    for r in (r for r in every_run if r["key"] in stale):
        log.warning("%s is stale (%s): deleting %s to retrain it", r["key"], stale[r["key"]], r["cfg"]["output_dir"])
        shutil.rmtree(r["cfg"]["output_dir"])

    if prof["data"].get("format") == "synth":  # generate once here: parallel workers must not race on it
        from aidkd.engine.config import config_from_dict
        from aidkd.engine.datamodule import ensure_synth

        ensure_synth(config_from_dict(plan[0]["cfg"]).data)
    start = time.time()
    finished, failed, stopped = execute(plan, args.jobs, threads, args.verbose,
                                        args.max_minutes * 60 if args.max_minutes is not None else None)
    elapsed = time.time() - start
    for r in (r for p in plans.values() for r in p if r["key"] not in finished):
        if (earlier := load_done(r)) is not None:
            finished[r["key"]] = earlier
    summaries = {}
    for sc, sc_plan in plans.items():
        tag = scale_tag(sc)
        out_dir = results_dir.with_name(f"{results_dir.name}_{tag}") if tag else results_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        summaries[sc] = write_results(prof, sc, sc_plan, finished, failed, stopped, args, elapsed, runs_dir, seeds,
                                      families, out_dir, threads=torch.get_num_threads())
    if len(scales) > 1:
        md = sweep_markdown(prof, summaries, args)
        (results_dir.with_name(f"{results_dir.name}_sweep.md")).write_text(md + "\n")
        print(md)
    return 1 if failed else 0


def write_results(prof, scale, plan, finished, failed, stopped, args, elapsed, runs_dir, seeds, families, out_dir,
                  threads) -> dict:
    """results.json / results.md / accuracy.png of one distillation scale's runs; returns the summary."""
    summary = aggregate(plan, finished)
    md = markdown(prof, scale, summary, plan, finished, args, elapsed)
    keys = {r["key"] for r in plan}
    mine = {k: v for k, v in failed.items() if k in keys}
    if mine:
        md += "\n\nFailed runs:\n" + "\n".join(f"- {k}: {v}" for k, v in mine.items())
    if stopped:
        md += f"\n\n{stopped}; re-run the same command to continue (finished runs are skipped)."
    payload = {"profile": prof, "distill_scale": scale, "smoke": args.smoke, "argv": args.argv,
               "torch_threads": threads, "runs_dir": str(runs_dir), "seeds": seeds, "families": families,
               "runs": {r["key"]: {**finished[r["key"]], "variant": r["variant"], "seed": r["seed"],
                                   "family": r["family"]} for r in plan if r["key"] in finished},
               "failed": mine, "stopped": stopped, "summary": summary, "elapsed_s": elapsed}
    (out_dir / "results.json").write_text(portable(json.dumps(payload, indent=2, default=float)) + "\n")
    (out_dir / "results.md").write_text(md + "\n")
    bar_chart(summary, out_dir / "accuracy.png", f"aidkd accuracy benchmark: {prof['name']} {scale_tag(scale)}")
    print(md)
    print(f"\nresults in {out_dir}")
    return summary


def sweep_markdown(prof: dict, summaries: dict[float, dict], args) -> str:
    """One table per family: every distilled variant at every loss scale, with its paired gain over the student."""
    lines = [f"# Distillation loss-scale sweep ({prof['name']})", "",
             ("Every distillation term times the scale (`distill.loss_scale`); scale 1 = method.md's weights. "
             "Mean ± std over seeds; in brackets the paired difference to the student alone (same seed) and the "
             "seeds where the variant is better."), ""]
    fams = sorted({f for s in summaries.values() for f in s}, key=FAMILIES.index)
    for fam in fams:
        lines += [f"## {fam} ({prof['families'][fam]['arch']})", "",
                  "| scale | run | seeds | COCO AP (vs student) | AP50 (vs student) |", "|---|---|---|---|---|"]
        base = next((s[fam]["student"] for s in summaries.values() if "student" in s.get(fam, {})), None)
        if base:
            lines.append(f"| – | student alone | {base['n']} | {_cell(base['coco/AP'], False)} | "
                         f"{_cell(base['coco/AP50'], False)} |")
        for sc in sorted(summaries, reverse=True):
            for v in SEED_VARIANTS[1:]:
                e = summaries[sc].get(fam, {}).get(v)
                if e is None:
                    continue
                cells = []
                for key in ("coco/AP", "coco/AP50"):
                    d = e[key].get("paired_vs_student")
                    extra = "" if d is None or math.isnan(d["mean"]) else f" ({d['mean']:+.1f}, {d['wins']}/{d['n']})"
                    cells.append(_cell(e[key], False) + extra)
                lines.append(f"| {Fraction(sc).limit_denominator(1000)} | {SHORT[v]} | {e['n']} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Command: `.venv/bin/python benchmarks/accuracy.py " + " ".join(args.argv) + "`")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
