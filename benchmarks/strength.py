"""Distillation strength on a small generated set, sized for a shared 2-core CPU.

Three measurements, all on generated driving scenes (``aidkd data synth``), teacher and students from random weights:

- ``magnitude``: the distillation terms over the student's detection loss at step 0 (trained teacher, fresh
  student), per reduction (``normalized`` default vs ``published``) and per-device batch (2 vs 8), at loss_scale 1
  with method.md's weights. No training: it shows which loss_scale a small setting needs, and that the default
  form's strength does not move with the batch size.
- ``nonlocal``: KD (attention + non-local, at ``--small-scale``) with the teacher-side non-local block trainable
  (the published code) vs frozen, paired by seed.
- ``transfer``: the paper's weights at loss_scale 1 with the new defaults (teacher-side non-local block frozen) vs
  the student alone, at batch 2 and batch 8 (same epochs), paired by seed; with ``--transfer-small`` also at
  ``--small-scale``.
- ``scale``: KD (frozen block) at each of ``--scales`` at batch 4, paired by seed with the student: how small a
  loss_scale a family's small from-scratch student needs.
- ``alpha``: KD + AID (instance) at ``--small-scale`` for each of ``--alphas`` at batch 4, paired by seed with KD
  (``kd_nl_frozen``) and the student: does a stronger contrast of the AID weights help?
- ``alpha_norm``: the same with ``distill.aid.normalize`` (each batch's weights divided by their mean): a larger
  alpha sharpens the contrast without lowering KD's overall strength, which plain weights in (0, 1] also do.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/strength.py --out runs/strength \\
        --families gfl --seeds 0 1 2 --what magnitude nonlocal transfer

``--profile easy`` uses the demo's easier generated set instead (``aidkd.engine.demo``: cars only, near, few
objects and distractors, 200 scenes at 96x320) and the demo's schedule (AdamW 2e-3, cosine), where a GFL-R18
teacher learns to ~20 COCO AP in 5 epochs; ``--profile tiny`` (the default) keeps the first measurement's setting.

Writes ``<out>/results.json``. Runs are sequential, one torch thread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from aidkd.data.kitti import KITTI_DEFAULT_CLASSES

REPO = Path(__file__).resolve().parents[1]

# method.md's weights (AID rows), as configs/ and the accuracy profiles use them
WEIGHTS = {
    "gfl": [{"name": "attention", "params": {"temperature": 0.1, "am_weight": 5.6e-4, "at_weight": 2.4e-2}},
            {"name": "nonlocal", "params": {"nl_weight": 4.9e-4}}],
    "fasterrcnn": [{"name": "attention", "params": {"temperature": 0.5, "am_weight": 4.0e-5, "at_weight": 8.0e-3}},
                   {"name": "nonlocal", "params": {"nl_weight": 4.0e-5}}],
}
# Per profile: the generated set, the classes and the training schedule; --num-images/--height/--width override.
PROFILES = {
    "tiny": {"num_images": 80, "height": 64, "width": 192, "classes": list(KITTI_DEFAULT_CLASSES),
             "synth": {}, "train": {"lr": 1e-3, "warmup_steps": 20}},
    # the demo's easy profile (src/aidkd/engine/demo.py DEMO_SYNTH) and its schedule
    "easy": {"num_images": 200, "height": 96, "width": 320, "classes": ["Car"],
             "synth": {"classes": ["Car"], "min_t": 0.3, "max_objects": 6, "clutter": 3},
             "train": {"lr": 2e-3, "scheduler": "cosine", "warmup_steps": 30}},
}
RCNN_SMALL = {"anchor_size": 16, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
              "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 128}


def data_section(out: Path, num_images: int, height: int, width: int, batch: int, profile: str = "tiny") -> dict:
    prof = PROFILES[profile]
    section = {"format": "synth", "root": str(out / "data"), "min_size": height, "max_size": width,
               "batch_size": batch, "hflip": 0.5,
               "synth": {"num_images": num_images, "seed": 0, "width": width, "height": height, "hard_fraction": 0.2,
                         "mislabel_fraction": 0.05, **prof["synth"]}}
    if profile != "tiny":  # the tiny profile's configs stay byte-identical to the first measurement's
        section["classes"] = list(prof["classes"])
    return section


def model_section(arch: str, backbone: str, fpn: int) -> dict:
    return {"arch": arch, "backbone": backbone, "fpn_channels": fpn,
            "kwargs": RCNN_SMALL if arch == "fasterrcnn" else {}}


def run_config(name: str, out: Path, args, arch: str, seed: int, epochs: int, batch: int, model: dict,
               distill: dict | None) -> dict:
    return {"name": name, "output_dir": str(out / name), "seed": seed,
            "data": data_section(out, args.num_images, args.height, args.width, batch, args.profile), "model": model,
            "train": {"epochs": epochs, "optimizer": "adamw", "weight_decay": 1e-4, **PROFILES[args.profile]["train"],
                      "grad_clip": 10.0, "val_every": epochs, "log_every": 10, "progress_bar": False},
            "distill": distill}


def distill_section(teacher_ckpt: str, methods: list[dict], scale: float, train_teacher_block: bool = False,
                    aid_alpha: float | None = None, aid_normalize: bool = False) -> dict:
    """KD with ``methods`` at ``scale``; AID (instance) at ``aid_alpha`` when given, its weights normalised to
    mean 1 with ``aid_normalize``. The teacher-side non-local block is frozen unless asked (the module default,
    chosen by this benchmark's ``nonlocal`` ablation)."""
    methods = [{"name": m["name"], "params": dict(m["params"])} for m in methods]
    for m in methods:
        if m["name"] == "nonlocal":
            m["params"]["train_teacher_block"] = train_teacher_block
    aid = {"enabled": False} if aid_alpha is None else {"enabled": True, "granularity": "instance",
                                                        "alpha": aid_alpha}
    if aid_normalize:
        if aid_alpha is None:
            raise ValueError("aid_normalize needs an aid_alpha")
        aid["normalize"] = True
    return {"teacher": {"checkpoint": teacher_ckpt}, "methods": methods, "aid": aid,
            "loss_scale": scale, "image_log_every": 0}


def train_once(cfg_dict: dict, results: dict, key: str, results_file: Path) -> dict:
    """Train one run (skipped when its result is already in ``results``); returns its record."""
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import train

    if key in results:
        return results[key]
    t0 = time.time()
    metrics = train(config_from_dict(cfg_dict))
    results[key] = {"metrics": {k: float(v) for k, v in metrics.items()}, "seconds": time.time() - t0}
    results_file.write_text(json.dumps(results, indent=2))
    print(f"{key}: COCO AP {results[key]['metrics'].get('coco/AP', float('nan')):.2f} "
          f"({results[key]['seconds']:.0f} s)", flush=True)
    return results[key]


@torch.no_grad()
def magnitudes(out: Path, args, arch: str, teacher_ckpt: str, student_ckpt: str) -> dict:
    """Distillation terms (loss_scale 1) and detection loss of a trained student alone (``student_ckpt``) against
    the teacher, per reduction and batch size, on the same 24 training images; their ratio is what a loss_scale
    must bring to the order of 1. (A fresh GFL student is a poor yardstick: its box loss is normalised by the sum
    of near-zero scores, clamped at 1, so it grows with the batch.)"""
    from aidkd.data.dataset import DetectionDataset, collate_fn
    from aidkd.data.kitti import load_kitti_records
    from aidkd.distill.distiller import Distiller
    from aidkd.models import load_detector

    root = out / "data"
    classes = PROFILES[args.profile]["classes"]
    ds = DetectionDataset(load_kitti_records(root, "train"), classes, min_size=args.height, max_size=args.width,
                          train=False)
    rows = {}
    for reduction in ("normalized", "published"):
        for batch in (2, 8):
            torch.manual_seed(0)
            teacher, _ = load_detector(teacher_ckpt, classes=classes)
            student, _ = load_detector(student_ckpt, classes=classes)
            methods = {x["name"]: {"name": x["name"], **x["params"], "reduction": reduction}
                       for x in WEIGHTS[arch]}
            d = Distiller(student, teacher, methods, None, sample_shape=(args.height, args.width)).train()
            det, dist = [], []
            for start in range(0, 8 * 3, batch):  # the same 24 images in batches of 2 or 8
                images, targets = collate_fn([ds[i % len(ds)] for i in range(start, start + batch)])
                losses = d(list(images), list(targets))
                det.append(float(sum(v for k, v in losses.items() if not k.startswith("distill/"))))
                dist.append(float(sum(v for k, v in losses.items() if k.startswith("distill/"))))
            rows[f"{reduction}/batch{batch}"] = {"detection": statistics.mean(det), "distill": statistics.mean(dist),
                                                 "ratio": statistics.mean(dist) / statistics.mean(det)}
    return rows


def paired(results: dict, variant: str, reference: str, seeds: list[int], metric: str = "coco/AP") -> dict:
    diffs = [results[variant.format(seed=s)]["metrics"][metric] - results[reference.format(seed=s)]["metrics"][metric]
             for s in seeds if variant.format(seed=s) in results and reference.format(seed=s) in results]
    if not diffs:
        return {"n": 0}
    return {"mean": statistics.mean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
            "wins": sum(d > 0 for d in diffs), "n": len(diffs), "diffs": diffs}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --num-images/--height/--width filled from the profile where not given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "strength")
    ap.add_argument("--families", nargs="+", default=["gfl"], choices=sorted(WEIGHTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--what", nargs="+", default=["magnitude", "nonlocal", "transfer"],
                    choices=["magnitude", "nonlocal", "transfer", "alpha", "alpha_norm", "scale"])
    ap.add_argument("--scales", nargs="+", type=float, default=[1e-4], help="loss_scales of --what scale")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.3, 1.0, 3.0], help="AID alphas of --what alpha / alpha_norm")
    ap.add_argument("--profile", default="tiny", choices=sorted(PROFILES),
                    help="generated set and schedule: tiny (first measurement) or easy (the demo's)")
    ap.add_argument("--num-images", type=int, default=None, help="generated scenes (80 %% train); default per profile")
    ap.add_argument("--height", type=int, default=None, help="default per profile (tiny 64, easy 96)")
    ap.add_argument("--width", type=int, default=None, help="default per profile (tiny 192, easy 320)")
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--student-epochs", type=int, default=4)
    ap.add_argument("--teacher-fpn", type=int, default=32)
    ap.add_argument("--student-fpn", type=int, default=16)
    ap.add_argument("--student-backbone", default="resnet18", help="e.g. mobilenet_v3_small (the demo's student)")
    ap.add_argument("--small-scale", type=float, default=0.001, help="loss_scale of the non-local ablation")
    ap.add_argument("--transfer-small", action="store_true",
                    help="transfer: also KD at --small-scale (the small configs' loss_scale) at each batch size")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for key in ("num_images", "height", "width"):
        if getattr(args, key) is None:
            setattr(args, key, PROFILES[args.profile][key])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.setdefault("_args", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    for arch in args.families:
        fam_out = args.out / arch
        teacher = run_config("teacher", fam_out, args, arch, 0, args.teacher_epochs, 4,
                             model_section(arch, "resnet18", args.teacher_fpn), None)
        train_once(teacher, results, f"{arch}/teacher", results_file)
        ckpt = str(fam_out / "teacher" / "model_best.pt")
        student_model = model_section(arch, args.student_backbone, args.student_fpn)
        for seed in args.seeds:
            def run(name, batch, distill, *, _arch=arch, _seed=seed, _out=fam_out, _model=student_model):
                key = f"{_arch}/{name}_seed{_seed}"
                cfg = run_config(f"{name}_seed{_seed}", _out, args, _arch, _seed, args.student_epochs, batch,
                                 _model, distill)
                train_once(cfg, results, key, results_file)

            if args.what != ["transfer"] or seed == args.seeds[0]:
                run("student_b4", 4, None)  # also the trained student of the magnitude measurement
            if "nonlocal" in args.what:
                for trainable in (True, False):
                    run(f"kd_nl_{'trainable' if trainable else 'frozen'}", 4,
                        distill_section(ckpt, WEIGHTS[arch], args.small_scale, trainable))
            if "scale" in args.what:
                for scale in args.scales:
                    run(f"kd_s{scale:g}", 4, distill_section(ckpt, WEIGHTS[arch], scale))
            for what, tag, normalize in (("alpha", "kd_aid", False), ("alpha_norm", "kd_aidn", True)):
                if what in args.what:
                    run("kd_nl_frozen", 4, distill_section(ckpt, WEIGHTS[arch], args.small_scale))  # KD reference
                    for alpha in args.alphas:
                        run(f"{tag}_a{alpha:g}", 4, distill_section(ckpt, WEIGHTS[arch], args.small_scale,
                                                                    aid_alpha=alpha, aid_normalize=normalize))
            if "transfer" in args.what:
                for batch in (2, 8):
                    run(f"student_b{batch}", batch, None)
                    run(f"kd_scale1_b{batch}", batch, distill_section(ckpt, WEIGHTS[arch], 1.0))
                    if args.transfer_small:
                        run(f"kd_small_b{batch}", batch, distill_section(ckpt, WEIGHTS[arch], args.small_scale))
        if "magnitude" in args.what and f"{arch}/magnitude" not in results:
            student_ckpt = str(fam_out / f"student_b4_seed{args.seeds[0]}" / "model_best.pt")
            results[f"{arch}/magnitude"] = magnitudes(fam_out, args, arch, ckpt, student_ckpt)
            results_file.write_text(json.dumps(results, indent=2))
            print(f"{arch}/magnitude: {results[f'{arch}/magnitude']}", flush=True)
        summary = {}
        s = args.seeds
        if "nonlocal" in args.what:
            summary["nl_trainable-student"] = paired(results, f"{arch}/kd_nl_trainable_seed{{seed}}",
                                                     f"{arch}/student_b4_seed{{seed}}", s)
            summary["nl_frozen-student"] = paired(results, f"{arch}/kd_nl_frozen_seed{{seed}}",
                                                  f"{arch}/student_b4_seed{{seed}}", s)
            summary["nl_frozen-trainable"] = paired(results, f"{arch}/kd_nl_frozen_seed{{seed}}",
                                                    f"{arch}/kd_nl_trainable_seed{{seed}}", s)
        if "scale" in args.what:
            for scale in args.scales:
                summary[f"kd_s{scale:g}-student"] = paired(results, f"{arch}/kd_s{scale:g}_seed{{seed}}",
                                                           f"{arch}/student_b4_seed{{seed}}", s)
        for what, tag in (("alpha", "kd_aid"), ("alpha_norm", "kd_aidn")):
            if what in args.what:
                for alpha in args.alphas:
                    for ref, ref_key in (("kd", "kd_nl_frozen"), ("student", "student_b4")):
                        summary[f"{tag}_a{alpha:g}-{ref}"] = paired(results, f"{arch}/{tag}_a{alpha:g}_seed{{seed}}",
                                                                  f"{arch}/{ref_key}_seed{{seed}}", s)
        if "transfer" in args.what:
            for batch in (2, 8):
                # *_trainable: the first easy-profile call's KD runs, made with the teacher block trainable
                for kd in ("scale1", "small", "scale1_trainable", "small_trainable"):
                    summary[f"kd_{kd}_b{batch}-student_b{batch}"] = paired(
                        results, f"{arch}/kd_{kd}_b{batch}_seed{{seed}}", f"{arch}/student_b{batch}_seed{{seed}}", s)
        results[f"{arch}/summary"] = summary
        results_file.write_text(json.dumps(results, indent=2))
        print(json.dumps({f"{arch}/summary": summary}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
