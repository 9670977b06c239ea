"""Controlled experiment: a teacher that is wrong on purpose on a known subset of instances.

AID's claim: imitating the teacher where it is wrong hurts the student, and weighting each instance's distillation
term by the teacher's own loss on it avoids that. This script makes the teacher's wrongness known and measurable:

1. one generated set (``aidkd.data.generate_synth``; ``mislabel_fraction`` 0, so the only label noise is ours) is
   written twice: the *clean* copy, from which every student learns and on which every model is evaluated, and the
   *teacher's* copy, whose **training** label files lose every instance of the affected class (``--subset-class``,
   default Cyclist; ``--corruption drop``: the lines are removed, so the teacher learns that class as background;
   ``relabel``: they become ``--relabel-as``). Images are shared (symlinked); the teacher's validation labels stay
   clean, so its own metrics show the damage (its AP on the affected class is ~0);
2. the teacher trains on its copy (teacher schedule), then for every seed the student alone, KD, KD + AID
   (instance) and KD + AID (level) train on the clean copy with the same student schedule (``accuracy.py``'s plan,
   provenance check, scheduler and run folders);
3. per run, AP on the affected class and on the rest (the mean over the other classes) on the clean validation
   labels; per seed the paired differences KD - student and AID - KD; and ``aidkd analyze``'s instance analysis of
   the teacher on the clean validation split (does ``w`` single out the affected instances?).

The prediction (what supports and what refutes the claim) is written to ``prediction.md`` in the results folder
*before* the first run trains and copied into ``results.md`` with the outcome.

    .venv/bin/python benchmarks/controlled.py --jobs 1 --threads 1                 # alpha 0.1 (the paper's)
    .venv/bin/python benchmarks/controlled.py --alpha 1 --jobs 1 --threads 1       # re-run AID at another alpha
    .venv/bin/python benchmarks/controlled.py --smoke                              # wiring check, ~2 min

Alpha other than 0.1 puts the AID runs in their own folders (``kd_aid_instance_a1_seed0``) and results in
``results/controlled_synth_a1/``; the teacher, student-alone and KD runs are shared.

Beyond the default variants (``--variants``; ``SPECS`` says what each trains): ``kd_weak``, the pure-weakening
control (KD with every term of every image scaled by the batch's mean AID weight: AID's weakening without its
contrast, ``distill.aid.granularity: batch``); ``am`` / ``am_aid_instance`` / ``am_weak``, the attention-masked
feature loss alone (a purely pixel-wise term), without AID, with AID and with the weakening control;
``kd_aid_pixel``, KD + AID with ``global_terms: pixel`` (attention transfer and non-local weighted per location
too); ``kd_aid_pixel_a1n``, the same at alpha 1 with normalised weights (contrast at KD's strength); ``head`` /
``head_weak`` / ``head_aid_instance`` / ``head_aid_decoupled``, one head-distillation method (``--head-method``: ld,
logit_kd or cross_head, at loss scale ``--head-scale``) alone, with the weakening control, with AID (instance) and
with decoupled AID (cls / box weights from the teacher's cls / box losses). Each is paired with its own reference
(``PAIRS``), with a bootstrap 90 % interval over seeds:

    .venv/bin/python benchmarks/controlled.py --name controlled_synth_car_side_selective --subset-class Car \
        --subset-view side --distill-scale 1/10 --seeds 0 1 2 3 4 --jobs 1 --threads 1 \
        --variants kd kd_weak kd_aid_instance student am am_aid_instance kd_aid_pixel kd_aid_pixel_a1n
    .venv/bin/python benchmarks/controlled.py --name controlled_synth_car_side_head --subset-class Car \
        --subset-view side --head-method logit_kd --seeds 0 1 2 3 4 --jobs 1 --threads 1 \
        --variants student head head_weak head_aid_instance head_aid_decoupled
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accuracy as acc
from _common import portable, source_commit

from aidkd.data.kitti import KITTI_DEFAULT_CLASSES

REPO = HERE.parent
CLASSES = tuple(KITTI_DEFAULT_CLASSES)  # the generated set's classes are KITTI's


class Variant(NamedTuple):
    """What a student run trains: ``methods`` ``"kd"`` (the family's attention + non-local), ``"am"`` (the
    attention-masked feature loss alone: attention transfer weighted 0, no non-local), ``"head"`` (the head method
    ``--head-method`` alone, at ``--head-scale``; ``{head}`` in the label is its name) or None (no distillation);
    ``aid`` the AID granularity (None: off); ``alpha`` / ``normalize`` fixed by the variant (None: ``--alpha`` /
    ``--aid-normalize``, and the run folder carries their tag); ``decoupled``: decoupled AID (head methods)."""

    label: str
    methods: str | None = "kd"
    aid: str | None = None
    global_terms: str = "image_mean"
    alpha: float | None = None
    normalize: bool | None = None
    decoupled: bool = False


SPECS = {
    "student": Variant("student alone", methods=None),
    "kd": Variant("KD (attention + non-local)"),
    "kd_aid_instance": Variant("KD + AID (instance)", aid="instance"),
    "kd_aid_level": Variant("KD + AID (level)", aid="level"),
    "kd_weak": Variant("KD x the batch's mean AID weight (weakening control)", aid="batch"),
    "am": Variant("L_AM alone", methods="am"),
    "am_aid_instance": Variant("L_AM + AID (instance)", methods="am", aid="instance"),
    "am_weak": Variant("L_AM x the batch's mean AID weight (weakening control)", methods="am", aid="batch"),
    "kd_aid_pixel": Variant("KD + AID (instance, global terms per pixel)", aid="instance", global_terms="pixel"),
    "kd_aid_pixel_a1n": Variant("KD + AID (instance, global terms per pixel, alpha 1, normalised)", aid="instance",
                                global_terms="pixel", alpha=1.0, normalize=True),
    "head": Variant("{head} alone", methods="head"),
    "head_weak": Variant("{head} x the batch's mean AID weight (weakening control)", methods="head", aid="batch"),
    "head_aid_instance": Variant("{head} + AID (instance)", methods="head", aid="instance"),
    "head_aid_decoupled": Variant("{head} + AID (instance, decoupled cls / box)", methods="head", aid="instance",
                                  decoupled=True),
}
HEAD_VARIANTS = tuple(v for v, spec in SPECS.items() if spec.methods == "head")
VARIANTS = ("student", "kd", "kd_aid_instance", "kd_aid_level")  # the default set
# Plan order: blocks of variants, each block for every seed before the next, so that a complete comparison
# (the weakening control against AID first) finishes early; in a block, per seed in this order.
BLOCKS = (("kd", "kd_weak", "kd_aid_instance"), ("student",), ("head",),
          ("head_weak", "head_aid_instance", "head_aid_decoupled"), ("am", "am_aid_instance"),
          ("kd_aid_pixel", "kd_aid_pixel_a1n"), ("am_weak",), ("kd_aid_level",))
# Paired differences (variant, reference), each where both ran: against the student (harm), against its own KD,
# and AID against the weakening control (selectivity).
PAIRS = (("kd", "student"), ("kd_aid_instance", "student"), ("kd_aid_level", "student"), ("kd_aid_instance", "kd"),
         ("kd_aid_level", "kd"), ("kd_weak", "kd"), ("kd_aid_instance", "kd_weak"), ("am", "student"),
         ("am_aid_instance", "am"), ("am_weak", "am"), ("am_aid_instance", "am_weak"), ("kd_aid_pixel", "kd"),
         ("kd_aid_pixel", "kd_weak"), ("kd_aid_pixel_a1n", "kd"), ("kd_aid_pixel_a1n", "kd_weak"),
         ("head", "student"), ("head_weak", "head"), ("head_aid_instance", "head"), ("head_aid_decoupled", "head"),
         ("head_aid_instance", "head_weak"), ("head_aid_decoupled", "head_weak"))
SUBSET_METRICS = [("coco/AP/{c}", "COCO AP"), ("voc/AP50/{c}", "VOC AP50"), ("kitti/{c}/moderate", "KITTI mod.")]

PREDICTION = """\
## Prediction (written before any run trained)

The teacher never saw a positive {cls} in training (its {cls} labels were {how}), so it is systematically wrong on
exactly the {cls} instances and right, as far as its training allows, on the rest. Claim under test: imitating the
teacher where it is wrong hurts; AID (instance) weights each instance's distillation by exp(-alpha D^T) and so
imitates the teacher less there.

- **Precondition (the teacher is wrong where we think, and AID can see it):** the teacher's {cls} AP on the clean
  val labels is ~0 while its AP on the rest is at least the student's; in the instance analysis the ROC AUC of w
  for telling the other classes from {cls} is >= 0.8 and {cls} instances have the lowest mean w.
- **Supports the claim:** (a) KD hurts on the affected subset: KD - student on {cls} AP (paired by seed) < 0 on
  >= 2 of 3 seeds, while on the rest KD - student >= about 0; and (b) AID (instance) removes part of that harm:
  KD+AID (instance) - KD on {cls} AP > 0 on >= 2 of 3 seeds with a mean above its seed std, while on the rest it
  stays within the paired seed spread of KD.
- **Refutes the claim:** (a) holds but KD+AID (instance) - KD on {cls} AP is <= 0 on >= 2 of 3 seeds (w ranks the
  subset low but down-weighting does not protect the student), or AID protects the subset only by costing at least
  as much AP on the rest.
- **Inconclusive:** (a) fails, i.e. KD from this wrong teacher does not hurt {cls} at this distillation strength
  (loss scale {scale}, alpha {alpha}); then the experiment says nothing about AID's rescue, only that the wrong
  teacher was harmless here, and should be re-run with stronger distillation.
- AID (level) has one weight per FPN level for the whole batch and cannot single out {cls}: expected level - KD on
  {cls} ~ 0; if it matches AID (instance), the effect is not instance-selective.
- Size: at alpha {alpha} the weights are expected to span little (one measured teacher: found 0.92 vs missed
  0.78 at alpha 0.1), so any rescue should be a small fraction of KD's harm; with 3 seeds and ~{n_val} {cls}
  instances in val, effects below ~1 AP are within noise.
"""

NORMALIZED = """\
- Normalised weights (`--aid-normalize`): every batch's AID weights are divided by their mean, so KD + AID keeps
  KD's strength and differs from KD only in where it imitates. A rescue on the subset that costs nothing on the rest
  is then instance-selective, not the effect of a weaker KD; a gain on the rest alone is not what the claim predicts.
"""


# ------------------------------------------------------------------------------------------------ data
def build_data(out: Path, *, num_images: int, seed: int, width: int, height: int, hard_fraction: float,
               val_fraction: float, subset_class: str, corruption: str, relabel_as: str | None,
               subset_view: str | None = None) -> dict:
    """Write ``out/clean`` (generated) and ``out/teacher`` (its copy with the subset's train labels corrupted);
    with ``subset_view`` also the evaluation copies ``out/eval_affected`` / ``out/eval_rest`` (val labels where the
    other / the affected positives are DontCare). Returns what was changed. Idempotent: a copy whose recorded
    parameters match is reused."""
    params = {"num_images": num_images, "seed": seed, "width": width, "height": height,
              "hard_fraction": hard_fraction, "val_fraction": val_fraction, "subset_class": subset_class,
              "corruption": corruption, "relabel_as": relabel_as}
    if subset_view:  # only then: the record of a class-only subset stays what it was
        params["subset_view"] = subset_view
    marker = out / "controlled_data.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return json.loads(marker.read_text())
    from aidkd.data import generate_synth

    if out.exists():
        shutil.rmtree(out)
    clean = generate_synth(out / "clean", num_images=num_images, seed=seed, width=width, height=height,
                           hard_fraction=hard_fraction, mislabel_fraction=0.0, val_fraction=val_fraction)
    stats = corrupt_copy(clean, out / "teacher", subset_class, corruption, relabel_as, subset_view)
    if subset_view:
        for part in ("affected", "rest"):
            eval_copy(clean, out / f"eval_{part}", subset_class, subset_view, keep_affected=part == "affected")
    info = {"params": params, **stats}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def affected_lines(lines: list[str], objects: list[dict], subset_class: str, subset_view: str | None) -> list[bool]:
    """Which label lines are in the subset: class ``subset_class`` and, if given, seen from ``subset_view``
    (``synth_meta.json``'s ``view``: ``side`` / ``rear`` / ``front``)."""
    return [ln.split()[0] == subset_class and (subset_view is None or o.get("view") == subset_view)
            for ln, o in zip(lines, objects)]


def eval_copy(clean: Path, dest: Path, subset_class: str, subset_view: str, keep_affected: bool) -> None:
    """A val-label copy for AP on part of a class: the positives outside the part become ``DontCare`` (ignore
    regions: a detection on them is neither a true nor a false positive), the rest is unchanged."""

    (dest / "training").mkdir(parents=True)
    os.symlink((clean / "training" / "image_2").resolve(), dest / "training" / "image_2")
    shutil.copytree(clean / "ImageSets", dest / "ImageSets")
    meta = json.loads((clean / "synth_meta.json").read_text())
    (dest / "training" / "label_2").mkdir()
    for f in sorted((clean / "training" / "label_2").glob("*.txt")):
        lines = f.read_text().splitlines()
        hit = affected_lines(lines, meta["frames"][f.stem]["objects"], subset_class, subset_view)
        out = [f"DontCare {ln.split(' ', 1)[1]}" if ln.split()[0] in KITTI_DEFAULT_CLASSES and h != keep_affected else ln
               for ln, h in zip(lines, hit)]
        (dest / "training" / "label_2" / f.name).write_text("".join(ln + "\n" for ln in out))


def corrupt_copy(clean: Path, dest: Path, subset_class: str, corruption: str, relabel_as: str | None,
                 subset_view: str | None = None) -> dict:
    """``dest``: ``clean``'s images (symlinked) and split files, its val labels unchanged, its train labels with
    every ``subset_class`` line (seen from ``subset_view``, if given) dropped (``drop``) or renamed to
    ``relabel_as`` (``relabel``); ``synth_meta.json`` follows the label lines. Returns the counts of affected train
    and val instances."""
    if corruption not in ("drop", "relabel"):
        raise ValueError(f"corruption must be 'drop' or 'relabel', got {corruption!r}")
    if corruption == "relabel" and not relabel_as:
        raise ValueError("corruption 'relabel' needs relabel_as (a class name)")
    dest.mkdir(parents=True)
    (dest / "training").mkdir()
    os.symlink((clean / "training" / "image_2").resolve(), dest / "training" / "image_2")
    shutil.copytree(clean / "ImageSets", dest / "ImageSets")
    train = set((clean / "ImageSets" / "train.txt").read_text().split())
    meta = json.loads((clean / "synth_meta.json").read_text())
    labels = dest / "training" / "label_2"
    labels.mkdir()
    counts = {"train_affected": 0, "val_affected": 0, "train_frames_touched": 0}
    for f in sorted((clean / "training" / "label_2").glob("*.txt")):
        lines = f.read_text().splitlines()
        objects = meta["frames"][f.stem]["objects"]
        hit = affected_lines(lines, objects, subset_class, subset_view)
        if f.stem not in train:
            counts["val_affected"] += sum(hit)
            (labels / f.name).write_text(f.read_text())
            continue
        counts["train_affected"] += sum(hit)
        counts["train_frames_touched"] += any(hit)
        if corruption == "drop":
            keep = [i for i, h in enumerate(hit) if not h]
            new_lines, objects = [lines[i] for i in keep], [objects[i] for i in keep]
        else:
            new_lines = [f"{relabel_as} {ln.split(' ', 1)[1]}" if h else ln for ln, h in zip(lines, hit)]
        meta["frames"][f.stem]["objects"] = objects
        (labels / f.name).write_text("".join(ln + "\n" for ln in new_lines))
    meta["controlled"] = {"subset_class": subset_class, "subset_view": subset_view, "corruption": corruption,
                          "relabel_as": relabel_as,
                          "train_labels_only": True}
    (dest / "synth_meta.json").write_text(json.dumps(meta, separators=(",", ":")))
    return counts


# ------------------------------------------------------------------------------------------------ plan
def make_profile(args, data_dir: Path) -> dict:
    """An accuracy.py profile of the experiment: KITTI-format data (the clean copy), one family."""
    return {
        "name": args.name, "description": f"controlled experiment: teacher trained without {args.subset_class}",
        "data": {"format": "kitti", "root": str(data_dir / "clean"), "min_size": args.height,
                 "max_size": args.width, "batch_size": 4, "hflip": 0.5},
        "families": {"one-stage": {
            "arch": "gfl", "teacher": {"backbone": args.teacher_backbone, "fpn_channels": args.teacher_fpn},
            "student": {"backbone": "resnet18", "fpn_channels": 32},
            "methods": [{"name": "attention", "temperature": 0.1, "am_weight": 5.6e-4, "at_weight": 2.4e-2},
                        {"name": "nonlocal", "nl_weight": 4.9e-4}]}},
        "schedule": {"teacher": {"epochs": args.teacher_epochs, "lr": 0.001, "warmup_steps": 100},
                     "student": {"epochs": args.student_epochs, "lr": 0.001, "warmup_steps": 100}},
        "train": {"optimizer": "adamw", "weight_decay": 1.0e-4, "grad_clip": 10.0},
        "seeds": list(args.seeds), "teacher_seed": 0, "aid_alpha": args.alpha, "aid_normalize": args.aid_normalize,
        "variants": list(args.variants), "distill_scale": args.distill_scale, "head_method": args.head_method,
        "head_scale": args.head_scale}


def alpha_tag(alpha: float, normalize: bool = False) -> str:
    """Folder suffix of the AID runs: '' for the paper's alpha 0.1, 'a1' for alpha 1, 'a3n' with normalised weights."""
    return "" if math.isclose(alpha, 0.1) and not normalize else f"a{alpha:g}" + ("n" if normalize else "")


def results_name(args) -> str:
    """``<name>[_div<N>][_<alpha tag>][_<head method>[_<head scale tag>]]``: the scale only when it is not the default
    1/1000, the head method only when head variants run (the runs folder is shared: the teacher and the student-alone
    runs do not depend on scale, alpha or method)."""
    scale = "" if math.isclose(args.distill_scale, 1e-3) else acc.scale_tag(args.distill_scale)
    head = ([args.head_method, acc.scale_tag(args.head_scale)] if set(args.variants) & set(HEAD_VARIANTS) else [])
    return "_".join(filter(None, [args.name, scale, alpha_tag(args.alpha, args.aid_normalize), *head]))


def plan_experiment(prof: dict, runs_dir: Path, data_dir: Path, seeds: list[int]) -> list[dict]:
    """accuracy.py's plan (the teacher, trained on the corrupted copy; the student alone; KD) and every other variant
    of ``prof["variants"]`` as KD's run with its own methods and AID section (``variant_run``). Order: the teacher,
    then ``BLOCKS``, each for every seed before the next."""
    variants = list(dict.fromkeys(prof["variants"]))
    unknown = sorted(set(variants) - set(SPECS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(SPECS)}")
    base = acc.plan_runs(dict(prof, variants=["student", "kd"]), runs_dir, ["one-stage"], seeds)
    teacher = next(r for r in base if r["variant"] == "teacher")
    teacher["cfg"]["data"] = dict(teacher["cfg"]["data"], root=str((data_dir / "teacher").resolve()))
    by_seed = {(r["variant"], r["seed"]): r for r in base}
    plan = [teacher]
    for seed in seeds:
        for v in variants:
            plan.append(by_seed[(v, seed)] if v == "student" else variant_run(by_seed[("kd", seed)], v, prof))
    block = {v: (i, j) for i, vs in enumerate(BLOCKS) for j, v in enumerate(vs)}
    plan.sort(key=lambda r: (r["variant"] != "teacher", block.get(r["variant"], (len(BLOCKS), 0))[0], r["seed"],
                             block.get(r["variant"], (0, 0))[1]))
    return plan


def variant_run(kd: dict, variant: str, prof: dict) -> dict:
    """Variant ``variant`` (``SPECS``) of one seed, from that seed's KD run: its methods, its AID section (keys left
    out where they are the defaults, so a run's config is the one accuracy.py plans for the same variant) and its
    folder ``<variant>_<scale>[_<alpha tag>]_seed<N>``; KD itself with AID's alpha reset to 0.1 (AID off: one KD run
    serves every alpha)."""
    spec = SPECS[variant]
    run = copy.deepcopy(kd)
    distill = run["cfg"]["distill"]
    distill["aid"]["alpha"] = 0.1
    if spec.methods == "am":
        distill["methods"] = am_only(distill["methods"])
    if spec.methods == "head":  # folders named by the method: logit_kd_aid_instance_x3_seed0
        if not prof.get("head_method"):
            raise SystemExit(f"variant {variant} needs --head-method (ld, logit_kd or cross_head)")
        distill["methods"] = [{"name": prof["head_method"], "params": {}}]
        distill["loss_scale"] = prof["head_scale"]
        variant_dir = variant.replace("head", prof["head_method"], 1)
    else:
        variant_dir = variant
    tag = ""
    if spec.aid:
        alpha = float(prof["aid_alpha"]) if spec.alpha is None else spec.alpha
        normalize = bool(prof.get("aid_normalize", False)) if spec.normalize is None else spec.normalize
        distill["aid"] = {"enabled": True, "granularity": spec.aid, "alpha": alpha}
        if normalize:
            distill["aid"]["normalize"] = True
        if spec.global_terms != "image_mean":
            distill["aid"]["global_terms"] = spec.global_terms
        if spec.decoupled:
            distill["aid"]["decoupled"] = True
        if spec.alpha is None and spec.normalize is None:  # a variant that fixes them says so in its name
            tag = alpha_tag(alpha, normalize)
    name = "_".join(filter(None, [variant_dir, acc.scale_tag(distill["loss_scale"]), tag, f"seed{run['seed']}"]))
    run["variant"] = variant
    run["key"] = f"{run['family']}/{name}"
    run["cfg"]["output_dir"] = str(Path(run["cfg"]["output_dir"]).with_name(name))
    run["cfg"]["name"] = run["cfg"]["name"].rsplit("/", 1)[0] + "/" + name
    return run


def am_only(methods: list[dict]) -> list[dict]:
    """The attention-masked feature loss alone: the attention method with its attention transfer weighted 0, no other
    method (a ``distill.methods`` list)."""
    attention = [m for m in methods if m["name"] == "attention"]
    if not attention:
        raise ValueError("the 'am' variants need an attention method in the family's methods")
    return [{"name": "attention", "params": {**attention[0]["params"], "at_weight": 0.0}}]


# ------------------------------------------------------------------------------------------------ summary
def subset_metrics(metrics: dict, subset_class: str, classes=CLASSES, views: dict | None = None) -> dict:
    """``{"affected": {name: AP}, "rest": {name: mean AP over the other classes}, <class>: {name: AP}}`` from a
    run's metrics. With ``views`` (a view subset: the run's metrics on the ``eval_affected`` / ``eval_rest`` label
    copies), affected is the class's AP on the affected copy and rest its AP on the rest copy (the same class seen
    from the other views; the other classes are in the per-class entries)."""
    out: dict = {"affected": {}, "rest": {}}
    for pattern, name in SUBSET_METRICS:
        if views is None:
            out["affected"][name] = float(metrics.get(pattern.format(c=subset_class), math.nan))
            vals = [float(metrics.get(pattern.format(c=c), math.nan)) for c in classes if c != subset_class]
        else:
            out["affected"][name] = float(views["affected"].get(pattern.format(c=subset_class), math.nan))
            vals = [float(views["rest"].get(pattern.format(c=subset_class), math.nan))]
        out["rest"][name] = sum(vals) / len(vals) if vals else math.nan
    for c in classes:  # each class on its own: the teacher can be wrong on another class without our doing
        out[c] = {name: float(metrics.get(pattern.format(c=c), math.nan)) for pattern, name in SUBSET_METRICS}
    out["all"] = {"COCO AP": float(metrics.get("coco/AP", math.nan))}
    return out


def paired(by_seed: dict[str, dict[int, dict]], variant: str, ref: str) -> dict:
    """Per part and metric: the per-seed differences variant - ref, their mean, std and seeds where variant wins."""
    out: dict = {}
    common = sorted(set(by_seed.get(variant, {})) & set(by_seed.get(ref, {})))
    for part in ("affected", "rest", *CLASSES):
        for _, name in SUBSET_METRICS:
            diffs = [by_seed[variant][s][part][name] - by_seed[ref][s][part][name] for s in common
                     if part in by_seed[variant][s]]
            m, sd, n = acc.mean_std(diffs)
            out[f"{part}/{name}"] = {"seeds": common, "diffs": diffs, "mean": m, "std": sd, "n": n,
                                     "wins": sum(d > 0 for d in diffs), "ci90": bootstrap_interval(diffs)}
    return out


def bootstrap_interval(diffs: list[float], level: float = 0.9, draws: int = 20000) -> list[float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (per-seed paired differences): seeds resampled with
    replacement; exact (every one of the n**n resamples) for n <= 6, else ``draws`` resamples of a fixed generator.
    NaN below 3 values (an interval from one or two seeds says nothing)."""
    values = np.array([d for d in diffs if not math.isnan(d)], dtype=float)
    n = len(values)
    if n < 3:
        return [math.nan, math.nan]
    if n <= 6:
        means = values[np.array(list(itertools.product(range(n), repeat=n)))].mean(axis=1)
    else:
        means = values[np.random.default_rng(0).integers(0, n, size=(draws, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def summarize(plan: list[dict], finished: dict, subset_class: str, views: dict | None = None) -> dict:
    by_seed: dict[str, dict[int, dict]] = {}
    teacher = None
    for r in plan:
        if r["key"] not in finished:
            continue
        sm = subset_metrics(finished[r["key"]]["metrics"], subset_class,
                            views=None if views is None else views.get(r["key"]))
        if r["variant"] == "teacher":
            teacher = sm
        else:
            by_seed.setdefault(r["variant"], {})[r["seed"]] = sm
    rows = {}
    for v, seeds in by_seed.items():
        rows[v] = {"seeds": sorted(seeds)}
        for part in ("affected", "rest"):
            for _, name in SUBSET_METRICS:
                m, sd, n = acc.mean_std([seeds[s][part][name] for s in sorted(seeds)])
                rows[v][f"{part}/{name}"] = {"mean": m, "std": sd, "n": n}
    diffs = {f"{v} - {ref}": paired(by_seed, v, ref) for v, ref in PAIRS if v in by_seed and ref in by_seed}
    return {"teacher": teacher, "variants": rows, "paired": diffs, "per_seed": by_seed}


def _num(x: float | None, spec: str) -> str:
    """A summary value (``null`` in the strict JSON where it is undefined, e.g. no instance found) formatted."""
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def label(variant: str, args) -> str:
    """A variant's row label, the head method named."""
    return SPECS[variant].label.format(head=args.head_method)


def _fmt(e: dict) -> str:
    if e is None or math.isnan(e["mean"]):
        return "n/a"
    return f"{e['mean']:.1f}" + ("" if math.isnan(e["std"]) else f" ± {e['std']:.1f}")


def _fmt_d(d: dict) -> str:
    if math.isnan(d["mean"]):
        return "n/a"
    per = ", ".join(f"{x:+.1f}" for x in d["diffs"])
    sd = "" if math.isnan(d["std"]) else f" ± {d['std']:.2f}"
    lo, hi = d.get("ci90", (math.nan, math.nan))
    ci = "" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]"
    return f"{d['mean']:+.2f}{sd}{ci} ({d['wins']}/{d['n']}; {per})"


def analysis_lines(summary: dict | None, subset_class: str, rows: list[dict] | None,
                   affected: list[bool] | None = None, rest: list[bool] | None = None,
                   rest_name: str = "rest") -> list[str]:
    """The instance analysis of the teacher: found / missed and, the question here, does w single out the subset
    (``affected`` rows) against the ``rest`` rows (default: every other row)?"""
    if summary is None:
        return [("Instance analysis: not available (it runs once the teacher has finished and an AID variant is "
                "planned: it analyses the teacher with that variant's AID settings)."), ""]
    from aidkd.eval.instances import roc_auc, weight_at

    lines = ["## Instance analysis of the teacher (clean val labels, `aidkd analyze`)", "",
             (f"{summary['instances']} instances; the teacher finds {summary['found']} (IoU above the KITTI threshold "
             f"of the class, score >= {summary.get('score_thresh', 0.3)}); ROC AUC of w, found vs missed: "
             f"{_num(summary['auc_found_vs_missed'], '.3f')}."), "",
             (f"| alpha | w range | mean w: found | missed | {rest_name} | {subset_class} | {rest_name} / "
              f"{subset_class} | AUC of w, {rest_name} vs {subset_class} |"), "|---|---|---|---|---|---|---|---|"]
    if affected is None:
        affected = [r["class"] == subset_class for r in rows or []]
    if rest is None:
        rest = [not f for f in affected]
    for a, s in summary["by_alpha"].items():
        w = [weight_at(float(r["teacher_loss"]), float(a)) for r in rows or []]
        mr = acc.mean_std([x for x, f in zip(w, rest) if f])[0]
        ms = acc.mean_std([x for x, f in zip(w, affected) if f])[0]
        pick = [i for i, (f, g) in enumerate(zip(affected, rest)) if f or g]
        auc = roc_auc([w[i] for i in pick], [rest[i] for i in pick]) if rows else math.nan
        lines.append(f"| {a} | {s['min']:.2f}-{s['max']:.2f} | {_num(s['mean_found'], '.3f')} | "
                     f"{_num(s['mean_missed'], '.3f')} | "
                     f"{mr:.3f} | {ms:.3f} | {mr / ms if ms else math.nan:.2f} | {auc:.3f} |")
    lines += ["", "Per class (configured alpha): " + "; ".join(
        f"{c} {g['instances']} instances, found {g['found']}, mean w {_num(g['mean_weight'], '.3f')}"
        for c, g in summary["by_class"].items()), ""]
    return lines


def markdown(args, prof, info, plan, finished, failed, summ, analysis, rows, prediction: str, elapsed,
             affected: list[bool] | None = None, rest: list[bool] | None = None) -> str:
    c = args.subset_class + (f" ({args.subset_view} view)" if args.subset_view else "")
    rest_is = (f"the other {args.subset_class} instances (val labels with the {args.subset_view}-view ones as "
               "DontCare)" if args.subset_view else "the mean over the other classes")
    lines = [f"# Controlled experiment: a teacher wrong on {c} ({args.name}{' smoke' if args.smoke else ''})", "",
             (f"Generated set: {info['params']['num_images']} scenes {args.width}x{args.height}, seed "
              f"{info['params']['seed']}, hard fraction {info['params']['hard_fraction']}, no mislabels, "
              f"val fraction {info['params']['val_fraction']}. Teacher's training labels: every {c} "
              f"{'removed' if args.corruption == 'drop' else f'relabelled {args.relabel_as}'} "
              f"({info['train_affected']} instances in {info['train_frames_touched']} train frames); students train "
              f"on the clean labels; everything is evaluated on the clean val labels ({info['val_affected']} {c} "
              "instances)."),
             (f"GFL: teacher {prof['families']['one-stage']['teacher']} ({prof['schedule']['teacher']}), students "
              f"R18-FPN32 ({prof['schedule']['student']}), AdamW, random initialisation; KD = attention + non-local "
              f"(method.md's one-stage weights) x loss scale {Fraction(args.distill_scale).limit_denominator(1000)}"
              f"; AID alpha {args.alpha:g}" + (" with normalised weights (each batch's divided by their mean)"
                                              if args.aid_normalize else "") + f". Seeds {list(args.seeds)}."),
             *([] if list(args.variants) == list(VARIANTS) else [
                 "Variants: " + "; ".join(f"`{v}`: {label(v, args)}" for v in args.variants) + "."]),
             "", prediction.strip(), "",
             "## Outcome", "", f"Affected = {c}; rest = {rest_is}. Mean ± std over seeds.", "",
             "| run | seeds | " + " | ".join(f"{c}: {n}" for _, n in SUBSET_METRICS) + " | "
             + " | ".join(f"rest: {n}" for _, n in SUBSET_METRICS) + " |",
             "|---|---|" + "---|" * (2 * len(SUBSET_METRICS))]
    t = summ["teacher"]
    if t:
        lines.append("| teacher (1 run) | 1 | " + " | ".join(f"{t['affected'][n]:.1f}" for _, n in SUBSET_METRICS)
                     + " | " + " | ".join(f"{t['rest'][n]:.1f}" for _, n in SUBSET_METRICS) + " |")
    for v in SPECS:
        e = summ["variants"].get(v)
        if e:
            lines.append(f"| {label(v, args)} | {len(e['seeds'])} | "
                         + " | ".join(_fmt(e[f"affected/{n}"]) for _, n in SUBSET_METRICS) + " | "
                         + " | ".join(_fmt(e[f"rest/{n}"]) for _, n in SUBSET_METRICS) + " |")
    lines += ["", ("Paired by seed: mean ± std of the difference [bootstrap 90 % interval of the mean over seeds, from 3 "
                   "seeds] (seeds where the first is better; per seed)."), "",
              f"| difference | {c}: COCO AP | {c}: VOC AP50 | rest: COCO AP | rest: VOC AP50 |", "|---|---|---|---|---|"]
    for name, d in summ["paired"].items():
        lines.append(f"| {name} | {_fmt_d(d['affected/COCO AP'])} | {_fmt_d(d['affected/VOC AP50'])} | "
                     f"{_fmt_d(d['rest/COCO AP'])} | {_fmt_d(d['rest/VOC AP50'])} |")
    lines += ["", "Per class, COCO AP (mean ± std over seeds; the teacher: one run):", "",
              "| run | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    if t:
        lines.append("| teacher | " + " | ".join(f"{t[k]['COCO AP']:.1f}" for k in CLASSES) + " |")
    for v in SPECS:
        seeds = summ["per_seed"].get(v)
        if seeds:
            cells = [_fmt(dict(zip(("mean", "std", "n"), acc.mean_std([seeds[s][k]["COCO AP"] for s in seeds]))))
                     for k in CLASSES]
            lines.append(f"| {label(v, args)} | " + " | ".join(cells) + " |")
    lines += ["", "Per class, paired COCO AP differences:", "", "| difference | " + " | ".join(CLASSES) + " |",
              "|---|" + "---|" * len(CLASSES)]
    for name, d in summ["paired"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt_d(d[f"{k}/COCO AP"]) for k in CLASSES) + " |")
    lines += [""] + analysis_lines(analysis, c, rows, affected, rest,
                                   f"other {args.subset_class}" if args.subset_view else "rest")
    missing = [r["key"] for r in plan if r["key"] not in finished]
    if missing:
        lines += [f"Not run yet (budget or failure): {len(missing)} of {len(plan)}: {', '.join(missing)}", ""]
    if failed:
        lines += ["Failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), ""]
    run_s = sum(f["seconds"] for f in finished.values() if f.get("seconds"))
    lines += [(f"Wall time of this invocation {elapsed / 60:.1f} min; sum of the runs' training times "
              f"{run_s / 60:.1f} min (finished runs are skipped on a re-run)."), "",
              "Written by: `.venv/bin/python benchmarks/controlled.py " + " ".join(args.argv) + "` at commit "
              + source_commit() + ". Reproduce or "
              "continue: `.venv/bin/python benchmarks/controlled.py --jobs 1 --threads 1"
              + (f" --name {args.name}" if args.name != default_name(args) else "")
              + (f" --seeds {' '.join(map(str, args.seeds))}" if list(args.seeds) != [0, 1, 2] else "")
              + (f" --variants {' '.join(args.variants)}" if list(args.variants) != list(VARIANTS) else "")
              + (f" --alpha {args.alpha:g}" if not math.isclose(args.alpha, 0.1) else "")
              + (" --aid-normalize" if args.aid_normalize else "")
              + ("" if math.isclose(args.distill_scale, 1e-3)
                 else f" --distill-scale {Fraction(args.distill_scale).limit_denominator(1000)}")
              + (f" --subset-class {args.subset_class}" if args.subset_class != "Cyclist" else "")
              + (f" --subset-view {args.subset_view}" if args.subset_view else "")
              + (f" --head-method {args.head_method}" if args.head_method else "")
              + ("" if args.head_scale == 1 else f" --head-scale {Fraction(args.head_scale).limit_denominator(1000)}")
              + "` (finished runs are skipped, a killed one resumes from its last checkpoint)."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", help="default controlled_synth, or controlled_synth_<class>_<view> with --subset-view")
    ap.add_argument("--alpha", type=float, default=0.1, help="AID alpha of the AID runs (0.1: the paper's)")
    ap.add_argument("--aid-normalize", action="store_true",
                    help="distill.aid.normalize in the AID runs: each batch's weights divided by their mean, so a "
                         "larger alpha sharpens the contrast without weakening KD (folders and results tagged 'n')")
    ap.add_argument("--distill-scale", type=acc.parse_scale, default=acc.parse_scale("1/1000"),
                    help="distill.loss_scale of every distillation run (default 1/1000, the CPU profiles': 1/100 of "
                         "the published loss forms; the committed partial results ran at 1/100 of those)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(SPECS),
                    help="default: student kd kd_aid_instance kd_aid_level; a subset, e.g. to add one AID setting to "
                         "runs that exist (the student alone and KD are shared), or others of SPECS (module doc)")
    ap.add_argument("--head-method", choices=["ld", "logit_kd", "cross_head"],
                    help="the head-distillation method of the head variants (head, head_weak, head_aid_instance, "
                         "head_aid_decoupled)")
    ap.add_argument("--head-scale", type=acc.parse_scale, default=1.0,
                    help="distill.loss_scale of the head variants (default 1: the head methods are normalised like "
                         "the detection loss)")
    ap.add_argument("--subset-class", default="Cyclist", choices=CLASSES)
    ap.add_argument("--subset-view", choices=["side", "rear", "front"],
                    help="only the subset class's instances seen from this view (synth_meta.json), e.g. Car side: "
                         "AP on them and on the rest from val-label copies where the others are DontCare")
    ap.add_argument("--corruption", default="drop", choices=["drop", "relabel"])
    ap.add_argument("--relabel-as", default="Pedestrian", choices=CLASSES)
    ap.add_argument("--num-images", type=int, default=240)
    ap.add_argument("--val-fraction", type=float, default=1 / 3)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--teacher-backbone", default="resnet18")
    ap.add_argument("--teacher-fpn", type=int, default=32)
    ap.add_argument("--teacher-epochs", type=int, default=24)
    ap.add_argument("--student-epochs", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, help="do not start a run that would end past this budget")
    ap.add_argument("--runs-dir", help="default runs/controlled/<name>[_smoke]")
    ap.add_argument("--results-dir", help="default benchmarks/results/<name>[_a<alpha>] (smoke: in the runs dir)")
    ap.add_argument("--rerun-stale", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny images and models, 2 steps a run, one seed")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(argv)
    if set(args.variants) & set(HEAD_VARIANTS) and not args.head_method:
        ap.error("the head variants need --head-method")
    if args.name is None:
        args.name = default_name(args)
    if args.smoke:
        args.num_images, args.width, args.height, args.seeds = 12, 160, 64, [0]
        args.teacher_epochs = args.student_epochs = 1
    return args


def default_name(args) -> str:
    return "controlled_synth" + (f"_{args.subset_class.lower()}_{args.subset_view}" if args.subset_view else "")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    acc._worker_init(args.threads, args.verbose)
    tag = args.name + ("_smoke" if args.smoke else "")
    runs_dir = Path(args.runs_dir) if args.runs_dir else REPO / "runs" / "controlled" / tag
    results_dir = Path(args.results_dir) if args.results_dir else (
        runs_dir / "results" if args.smoke else acc.RESULTS / results_name(args))
    results_dir.mkdir(parents=True, exist_ok=True)
    data_dir = runs_dir / "data"
    info = build_data(data_dir, num_images=args.num_images, seed=0, width=args.width, height=args.height,
                      hard_fraction=0.2, val_fraction=args.val_fraction, subset_class=args.subset_class,
                      corruption=args.corruption, relabel_as=args.relabel_as if args.corruption == "relabel" else None,
                      subset_view=args.subset_view)
    prof = make_profile(args, data_dir)
    if args.smoke:
        prof = acc.apply_smoke(prof)
        prof["seeds"] = list(args.seeds)
    plan = plan_experiment(prof, runs_dir, data_dir, list(args.seeds))
    pred_path = results_dir / "prediction.md"
    if not pred_path.exists() and set(args.variants) & set(HEAD_VARIANTS) and not args.smoke:
        raise SystemExit(f"the head variants' prediction depends on the strength where the head method hurts the "
                         f"subset: write it to {pred_path} before they train")
    if not pred_path.exists():  # the prediction is fixed before anything trains; later invocations keep it
        how = "removed" if args.corruption == "drop" else f"relabelled {args.relabel_as}"
        label = args.subset_class + (f" ({args.subset_view} view)" if args.subset_view else "")
        pred_path.write_text(PREDICTION.format(cls=label, how=how, alpha=f"{args.alpha:g}",
                                               scale=Fraction(args.distill_scale).limit_denominator(1000),
                                               n_val=info["val_affected"]) + (NORMALIZED if args.aid_normalize else ""))
    prediction = pred_path.read_text()
    stale = acc.stale_runs(plan)
    if stale and not args.rerun_stale:
        raise SystemExit("stale run folders (trained from other settings):\n"
                         + "\n".join(f"  {k}: {why}" for k, why in stale.items()) + "\nuse --rerun-stale")
    for r in (r for r in plan if r["key"] in stale):
        shutil.rmtree(r["cfg"]["output_dir"])
    start = time.time()
    budget = args.max_minutes * 60 if args.max_minutes is not None else None
    finished, failed, _ = acc.execute(plan, args.jobs, args.threads, args.verbose, budget)
    for r in plan:
        if r["key"] not in finished and (earlier := acc.load_done(r)) is not None:
            finished[r["key"]] = earlier
    analysis, rows = teacher_analysis(plan, results_dir, args)
    views = view_metrics(plan, finished, data_dir) if args.subset_view else None
    summ = summarize(plan, finished, args.subset_class, views)
    affected = rows_affected(rows, data_dir / "clean", args.subset_class, args.subset_view)
    # a view subset is compared with the other instances of its class, a class subset with everything else
    rest = [(r["class"] == args.subset_class if args.subset_view else True) and not a
            for r, a in zip(rows or [], affected)]
    md = markdown(args, prof, info, plan, finished, failed, summ, analysis, rows, prediction, time.time() - start,
                  affected, rest)
    payload = {"args": {k: v for k, v in vars(args).items()}, "data": info, "profile": prof, "summary": summ,
               "runs": {r["key"]: {**finished[r["key"]], "variant": r["variant"], "seed": r["seed"]}
                        for r in plan if r["key"] in finished}, "failed": failed, "analysis": analysis}
    (results_dir / "results.json").write_text(portable(json.dumps(payload, indent=2, default=float)) + "\n")
    (results_dir / "results.md").write_text(md + "\n")
    print(md)
    print(f"\nresults in {results_dir}")
    return 1 if failed else 0


def view_metrics(plan: list[dict], finished: dict, data_dir: Path) -> dict:
    """Per finished run: its metrics on the ``eval_affected`` and ``eval_rest`` label copies (cached in the run
    folder, keyed by the checkpoint's sha256)."""
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import evaluate

    out = {}
    for r in (r for r in plan if r["key"] in finished):
        folder = Path(r["cfg"]["output_dir"])
        ckpt = folder / "model_best.pt"
        cache, digest = folder / "subset_eval.json", acc.file_digest(str(ckpt))
        if cache.exists() and json.loads(cache.read_text()).get("sha256") == digest:
            out[r["key"]] = json.loads(cache.read_text())["metrics"]
            continue
        metrics = {}
        for part in ("affected", "rest"):
            cfg = copy.deepcopy(r["cfg"])
            cfg["data"] = dict(cfg["data"], root=str((data_dir / f"eval_{part}").resolve()))
            cfg["distill"] = None
            metrics[part] = evaluate(config_from_dict(cfg), ckpt)
        cache.write_text(json.dumps({"sha256": digest, "metrics": metrics}, indent=1) + "\n")
        out[r["key"]] = metrics
    return out


def rows_affected(rows: list[dict] | None, clean: Path, subset_class: str, subset_view: str | None) -> list[bool]:
    """Which analysis rows (``instances.csv``) are in the subset (the view from the clean copy's meta)."""
    if subset_view is None:
        return [r["class"] == subset_class for r in rows or []]
    frames = json.loads((clean / "synth_meta.json").read_text())["frames"]
    return [r["class"] == subset_class and frames[r["stem"]]["objects"][int(r["label_line"]) - 1].get("view")
            == subset_view for r in rows or []]


def teacher_analysis(plan: list[dict], results_dir: Path, args) -> tuple[dict | None, list[dict] | None]:
    """``aidkd analyze`` of the teacher on the clean val split, written to ``results_dir/analysis``."""
    from aidkd.engine.analysis import analyze
    from aidkd.engine.config import config_from_dict
    from aidkd.eval.instances import read_csv

    teacher = next(r for r in plan if r["variant"] == "teacher")
    ckpt = Path(teacher["cfg"]["output_dir"]) / "model_best.pt"
    if not ckpt.exists():
        return None, None
    aid_runs = [r for r in plan if r["cfg"]["distill"] and r["cfg"]["distill"]["aid"]["enabled"]]
    if not aid_runs:
        return None, None
    student_cfg = copy.deepcopy(next((r for r in aid_runs if r["variant"] == "kd_aid_instance"), aid_runs[0])["cfg"])
    out = results_dir / "analysis"
    analyze(config_from_dict(student_cfg), ckpt, out, split="val")
    # committed results name no machine path: the summary file is rewritten with repository-relative paths
    text = portable((out / "summary.json").read_text(encoding="utf-8"))
    (out / "summary.json").write_text(text, encoding="utf-8")
    return json.loads(text), read_csv(out / "instances.csv")


if __name__ == "__main__":
    sys.exit(main())
