"""Which head-distillation method + AID the demo shows: the demo (``aidkd demo``, its own folder), then one student
run per head method with AID (instance, alpha 0.1) at ``loss_scale`` 1 with the demo's student settings, one seed.

    .venv/bin/python benchmarks/demo_heads.py            # writes benchmarks/results/demo_heads.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from _common import REPO, source_commit, write_results

from aidkd.engine.config import config_from_dict
from aidkd.engine.demo import demo_configs, row_names, run_demo
from aidkd.engine.run import train
from aidkd.eval import read_metrics

METHODS = ("ld", "logit_kd", "cross_head")
METRICS = [("coco/AP", "COCO AP"), ("coco/AP50", "AP50"), ("voc/mAP50", "VOC mAP@0.5"),
           ("kitti/moderate_mAP", "KITTI moderate mAP")]


def head_config(raw: dict, method: str, out: Path) -> dict:
    """The demo's KD + AID run with ``method`` as its only distillation method, at loss scale 1."""
    raw = copy.deepcopy(raw)
    raw["name"], raw["output_dir"] = f"{method}_aid", str(out / f"{method}_aid")
    raw["distill"]["methods"] = [{"name": method, "params": {}}]
    raw["distill"]["loss_scale"] = 1.0
    return raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "demo_heads"), help="the demo's folder and the head runs'")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args(argv)
    out = Path(args.out)
    commit = source_commit()  # of the sources the runs train with, before anything can change them
    demo = run_demo(out)
    names = row_names(demo_configs(out))
    rows = {names[k]: v["metrics"] for k, v in demo.items()}
    for method in args.methods:
        raw = head_config(demo_configs(out)["kd_aid"], method, out)
        done = Path(raw["output_dir"]) / "final_metrics.json"
        start = time.time()
        metrics = read_metrics(done.read_text()) if done.exists() else train(config_from_dict(raw))
        rows[f"student + {method} + AID (instance), loss_scale 1"] = metrics
        print(f"{method}: {metrics['coco/AP']:.2f} COCO AP ({time.time() - start:.0f} s)", flush=True)
    table = ["| run | " + " | ".join(n for _, n in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    table += [f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.1f}" for k, _ in METRICS) + " |"
              for name, m in rows.items()]
    command = "benchmarks/demo_heads.py" + ("" if tuple(args.methods) == METHODS else f" --methods {' '.join(args.methods)}")
    write_results("demo_heads", {"rows": rows, "commit": commit, "command": command},
                  f"# Head distillation + AID on the demo (one seed)\n\n`.venv/bin/python {command}`, commit "
                  f"{commit}. The demo's runs, then one student per head method + AID (instance, alpha 0.1) at "
                  "loss_scale 1 with the demo's student settings (MobileNetV3-small GFL, 2 epochs).\n\n"
                  + "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
