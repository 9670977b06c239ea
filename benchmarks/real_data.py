"""Real-data acceptance: the real KITTI and COCO sets load, train and evaluate end to end.

For ``../shared/data/kitti_object_101`` (native KITTI layout; fixed split: first 80 sorted frames train, the other
21 val, split files in ``benchmarks/results/accuracy_kitti101_cpu/splits/``) and ``../shared/data/coco_tiny``
(COCO json, train2017 -> val2017, the 11 COCO-traffic classes): load both splits and count what the datasets
return (images, positives per class, ignore regions), train each detector family for a few steps at a small size
through ``aidkd.engine.run.train`` (the code behind ``aidkd train``), re-evaluate the written ``model_best.pt`` with
``aidkd.engine.run.evaluate`` (the code behind ``aidkd eval``) and check that both agree; then distil a student for
a few steps from that model with KD + AID (instance), which runs the teacher's per-instance losses on real boxes
and ignore regions. A few steps from random weights give near-zero AP: this proves the formats and the pipeline,
not accuracy (see ``benchmarks/accuracy.py`` for that).

    .venv/bin/python benchmarks/real_data.py                 # both sets, retinanet + fasterrcnn, 10 steps each
    .venv/bin/python benchmarks/real_data.py --steps 30 --archs retinanet
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, SHARED_DATA, environment, write_results
from accuracy import write_kitti_split

REPO = HERE.parent
TRAFFIC11 = ["person", "bicycle", "car", "motorcycle", "bus", "train", "truck", "traffic light", "fire hydrant",
             "stop sign", "parking meter"]
KEYS = ["coco/AP", "coco/AP50", "voc/mAP50", "kitti/moderate_mAP"]


def datasets(kitti_root: Path, coco_root: Path) -> dict[str, dict]:
    split_dir = RESULTS / "accuracy_kitti101_cpu" / "splits"
    tr, va = write_kitti_split(kitti_root, split_dir, 80)
    return {
        "kitti_object_101": {"format": "kitti", "root": str(kitti_root), "train_split_file": str(tr),
                             "val_split_file": str(va), "min_size": 128, "max_size": 416, "batch_size": 4},
        "coco_tiny": {"format": "coco", "train_ann": str(coco_root / "annotations" / "instances_train2017.json"),
                      "train_images": str(coco_root / "train2017"),
                      "val_ann": str(coco_root / "annotations" / "instances_val2017.json"),
                      "val_images": str(coco_root / "val2017"), "classes": TRAFFIC11, "min_size": 160,
                      "max_size": 256, "batch_size": 4},
    }


def data_stats(data: dict) -> dict:
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.datamodule import DetectionDataModule

    cfg = config_from_dict({"data": data})
    dm = DetectionDataModule(cfg.data)
    out = {"classes": dm.classes}
    for split in ("train", "val"):
        ds = dm.make_dataset(split, train=False, resize=True)  # the tensor sizes training sees
        pos, ign, sizes = Counter(), 0, Counter()
        for i in range(len(ds)):
            img, t = ds[i]
            for lab in t["labels"].tolist():
                pos[dm.classes[lab - 1]] += 1
            ign += int(t["ignore_boxes"].shape[0])
            sizes[tuple(img.shape[-2:])] += 1
        out[split] = {"images": len(ds), "positives": dict(pos), "ignore_regions": ign,
                      "tensor_sizes": {f"{h}x{w}": n for (h, w), n in sizes.most_common(3)}}
    return out


def run_cfg(name: str, data: dict, arch: str, steps: int, runs_dir: Path, distill: dict | None = None) -> dict:
    return {"name": name, "output_dir": str(runs_dir / name), "seed": 0, "data": data,
            "model": {"arch": arch, "backbone": "resnet18", "fpn_channels": 32},
            "train": {"epochs": 1, "limit_train_batches": steps, "lr": 0.005, "warmup_steps": max(1, steps // 2),
                      "progress_bar": False, "log_every": 5},
            "distill": distill}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kitti", default=str(SHARED_DATA / "kitti_object_101"))
    ap.add_argument("--coco", default=str(SHARED_DATA / "coco_tiny"))
    ap.add_argument("--archs", nargs="+", default=["retinanet", "fasterrcnn"])
    ap.add_argument("--steps", type=int, default=10, help="training steps per run")
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "real_data"))
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: robust on a shared machine)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import evaluate, train

    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning"):  # again: importing lightning reset them
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    runs_dir = Path(args.runs_dir)
    start = time.time()
    res: dict = {"env": environment(torch.device("cpu")), "argv": argv, "steps": args.steps, "datasets": {}}
    ok = True
    for ds_name, data in datasets(Path(args.kitti), Path(args.coco)).items():
        entry: dict = {"data": {k: v for k, v in data.items()}, "runs": {}}
        print(f"== {ds_name}: loading")
        entry["stats"] = data_stats(data)
        st = entry["stats"]
        print(f"   train {st['train']['images']} images, val {st['val']['images']}; train positives "
              f"{st['train']['positives']}; ignore regions train {st['train']['ignore_regions']} / val "
              f"{st['val']['ignore_regions']}")
        for arch in args.archs:
            name = f"{ds_name}_{arch}"
            print(f"== {name}: train {args.steps} steps + validate")
            t0 = time.time()
            run: dict = {}
            try:
                cfg = config_from_dict(run_cfg(name, data, arch, args.steps, runs_dir))
                run["train_metrics"] = train(cfg, overwrite=True)
                run["train_s"] = time.time() - t0
                ckpt = Path(cfg.output_dir) / "model_best.pt"
                t1 = time.time()
                run["eval_metrics"] = evaluate(cfg, ckpt)
                run["eval_s"] = time.time() - t1
                diffs = [abs(run["train_metrics"][k] - run["eval_metrics"][k]) for k in run["train_metrics"]
                         if k in run["eval_metrics"] and not math.isnan(run["train_metrics"][k])]
                run["train_vs_eval_max_abs_diff"] = max(diffs) if diffs else math.nan
                if not args.no_distill:
                    dname = f"{name}_kd_aid"
                    distill = {"teacher": {"checkpoint": str(ckpt)},
                               "methods": [{"name": "attention", "params": {"temperature": 0.5}},
                                           {"name": "nonlocal", "params": {}}],
                               "aid": {"enabled": True, "granularity": "instance", "alpha": 0.1},
                               "image_log_every": 0}
                    t2 = time.time()
                    dcfg = config_from_dict(run_cfg(dname, data, arch, args.steps, runs_dir, distill))
                    run["kd_aid_metrics"] = train(dcfg, overwrite=True)
                    run["kd_aid_s"] = time.time() - t2
                run["ok"] = bool(run["train_metrics"]) and bool(run["eval_metrics"]) and (
                    args.no_distill or bool(run.get("kd_aid_metrics")))
            except Exception as e:  # noqa: BLE001 -- report and go on with the other runs
                import traceback

                run["error"] = f"{type(e).__name__}: {e}"
                run["traceback"] = traceback.format_exc()[-3000:]
                run["ok"] = False
                print(run["traceback"])
            ok &= run["ok"]
            entry["runs"][arch] = run
            m = run.get("eval_metrics", {})
            print(f"   {'OK' if run['ok'] else 'FAILED'}: " + ", ".join(f"{k} {m[k]:.2f}" for k in KEYS if k in m)
                  + f"  ({time.time() - t0:.0f} s)")
        res["datasets"][ds_name] = entry
    res["seconds"] = time.time() - start
    res["ok"] = ok
    md = markdown(res)
    jp, mp = write_results("real_data", res, md)
    print(md)
    print(f"\nwrote {jp} and {mp}")
    return 0 if ok else 1


def _m(metrics: dict | None, key: str) -> str:
    if not metrics or key not in metrics or metrics[key] is None or math.isnan(metrics[key]):
        return "n/a"
    return f"{metrics[key]:.2f}"


def markdown(res: dict) -> str:
    lines = ["# Real-data check: kitti_object_101 and coco_tiny load, train and evaluate", "",
             (f"Each detector: ResNet-18-FPN32 from random weights, {res['steps']} training steps (batch 4), then "
              "validation (`aidkd.engine.run.train`), re-evaluation of the written `model_best.pt` "
              "(`aidkd.engine.run.evaluate`), and a KD + AID (instance) run of the same length distilled from it. "
              "A few steps from scratch give near-zero AP: this checks the pipeline on real data, not accuracy."),
             "", "## Data as the datasets return it", "",
             "| set | split | images | positives | ignore regions | most common tensor sizes |", "|---|---|---|---|---|---|"]
    for name, e in res["datasets"].items():
        for split in ("train", "val"):
            s = e["stats"][split]
            pos = ", ".join(f"{k} {v}" for k, v in sorted(s["positives"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {name} | {split} | {s['images']} | {pos} | {s['ignore_regions']} | "
                         f"{', '.join(f'{k} ({v})' for k, v in s['tensor_sizes'].items())} |")
    lines += ["", "## Runs", "",
              ("| set | arch | ok | train s | COCO AP | AP50 | VOC mAP@0.5 | KITTI moderate mAP | eval == train "
               "(max abs diff) | KD+AID COCO AP | KD+AID s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in res["datasets"].items():
        for arch, r in e["runs"].items():
            m = r.get("eval_metrics")
            diff = r.get("train_vs_eval_max_abs_diff")
            lines.append(f"| {name} | {arch} | {'yes' if r['ok'] else 'NO: ' + r.get('error', '')[:120]} | "
                         f"{r.get('train_s', math.nan):.0f} | {_m(m, 'coco/AP')} | {_m(m, 'coco/AP50')} | "
                         f"{_m(m, 'voc/mAP50')} | {_m(m, 'kitti/moderate_mAP')} | "
                         f"{'n/a' if diff is None else f'{diff:.2g}'} | {_m(r.get('kd_aid_metrics'), 'coco/AP')} | "
                         f"{r.get('kd_aid_s', math.nan):.0f} |")
    lines += ["", (f"Total {res['seconds'] / 60:.1f} min on {res['env']['cpu_count']} CPU cores (torch "
              f"{res['env']['torch']}). All ok: {res['ok']}."), "",
              "Command: `.venv/bin/python benchmarks/real_data.py " + " ".join(res["argv"]) + "`"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
