"""``aidkd`` command line: a thin layer over the Python API (aidkd.engine, aidkd.data, aidkd.eval)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

console = Console()
log = logging.getLogger("aidkd")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.lr=0.02 data.batch_size=8")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip (and count) invalid samples instead of refusing the dataset")


def _load(args):
    from aidkd.engine.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "skip_invalid", False):
        overrides.append("data.skip_invalid=true")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from aidkd.engine.run import train

    cfg = _load(args)
    if args.command == "distill" and cfg.distill is None:
        raise ValueError(f"{args.config}: 'aidkd distill' needs a 'distill:' section (teacher, methods, aid)")
    if args.command == "train" and cfg.distill is not None:
        log.info("config has a 'distill' section: distilling from %s", cfg.distill.teacher.checkpoint)
    metrics = train(cfg, resume=args.resume)
    _print_metrics(metrics, f"{cfg.name}: final validation metrics")
    console.print(f"model: {Path(cfg.output_dir) / 'model_best.pt'}")
    return 0


def cmd_eval(args) -> int:
    from aidkd.engine.run import evaluate

    cfg = _load(args)
    metrics = evaluate(cfg, args.checkpoint, split=args.split)
    _print_metrics(metrics, f"{args.checkpoint} on {args.split}")
    out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(f".{args.split}_metrics.json")
    out.write_text(json.dumps(metrics, indent=2))
    console.print(f"metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    from aidkd.engine.predict import predict_command

    cfg = _load(args)
    n = predict_command(cfg, args.checkpoint, Path(args.out), source=args.input, draw=args.draw,
                        score_thresh=args.score_thresh)
    console.print(f"wrote predictions for {n} images to {args.out}")
    return 0


def cmd_eval_kitti(args) -> int:
    from aidkd.eval.kitti_io import evaluate_kitti_dirs, format_kitti_table

    result = evaluate_kitti_dirs(args.gt_label_dir, args.pred_dir)
    console.print(format_kitti_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        console.print(f"written to {args.json}")
    return 0


def cmd_data_check(args) -> int:
    from aidkd.data import check_dataset

    problems = check_dataset(args.root, fmt=args.format, image_dir=args.images)
    for p in problems:
        console.print(str(p), markup=False, highlight=False)
    if problems:
        console.print(f"[red]{len(problems)} problem(s) found[/red]")
        return 1
    console.print("[green]dataset OK[/green]")
    return 0


def cmd_data_synth(args) -> int:
    from aidkd.data import generate_synth

    out = generate_synth(args.out, num_images=args.num_images, seed=args.seed, width=args.width,
                         height=args.height, hard_fraction=args.hard_fraction,
                         mislabel_fraction=args.mislabel_fraction)
    console.print(f"wrote {args.num_images} scenes (KITTI layout) to {out}")
    return 0


def cmd_data_coco_traffic(args) -> int:
    from aidkd.data import make_coco_traffic

    summary = make_coco_traffic(args.instances_json, args.out_json, variant=args.variant)
    console.print(f"wrote {args.out_json}" + (f": {summary}" if summary else ""))
    return 0


def cmd_demo(args) -> int:
    from aidkd.engine.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, arch=args.arch)
    return 0


def cmd_export(args) -> int:
    from aidkd.export import export_onnx

    report = export_onnx(args.checkpoint, args.onnx, num_samples=args.samples)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_report(args) -> int:
    from aidkd.report import build_report

    out = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {out}")
    return 0


def cmd_analyze(args) -> int:
    from aidkd.eval.instances import analyze, format_summary

    cfg = _load(args)
    summary = analyze(cfg, args.teacher, Path(args.out), split=args.split, student=args.student,
                      score_thresh=args.score_thresh)
    console.print(format_summary(summary), markup=False, highlight=False, soft_wrap=True)
    console.print(f"instances.csv, summary.json and weights.png written to {args.out}")
    return 0


def _print_metrics(metrics: dict, title: str) -> None:
    from aidkd.eval import format_metrics_table

    console.print(f"[bold]{title}[/bold]")
    console.print(format_metrics_table(metrics), markup=False, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aidkd", description="Adaptive Instance Distillation for object detectors")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    for name, help_ in (("train", "train a detector (teachers and baseline students)"),
                        ("distill", "distil a student from a trained teacher (KD, KD+AID)")):
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        p.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from the run folder's last checkpoint, or from the given .ckpt")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained detector on the configured val set")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--json", help="where to write the metrics (default: beside the checkpoint)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="per-instance teacher losses, AID weights and whether the teacher detects "
                                       "each instance (CSV, summary, plot): will AID act on this data?")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="teacher model file or Lightning checkpoint")
    p.add_argument("--student", help="optional student checkpoint: adds its loss and detections per instance")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--out", required=True, help="output folder (RUN_DIR/analysis shows up in 'aidkd report')")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="a matching teacher detection counts as found from this score")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("predict", help="write KITTI-format predictions (and drawn images/video)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--input", help="a folder of images or a video file (default: the configured val set)")
    p.add_argument("--draw", action="store_true", help="also write images (or a video) with boxes drawn")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval-kitti", help="score KITTI prediction files against KITTI labels (AP_R40)")
    p.add_argument("gt_label_dir")
    p.add_argument("pred_dir")
    p.add_argument("--json")
    p.set_defaults(func=cmd_eval_kitti)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="list every problem in a dataset (exit 1 if any)")
    p.add_argument("root", help="KITTI root, or a COCO instances json")
    p.add_argument("--format", choices=["kitti", "coco"], default="kitti")
    p.add_argument("--images", help="COCO image folder")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("synth", help="generate procedural driving scenes in KITTI layout")
    p.add_argument("out")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--hard-fraction", type=float, default=0.2)
    p.add_argument("--mislabel-fraction", type=float, default=0.05)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("coco-traffic", help="build the COCO-traffic subset from a COCO instances json")
    p.add_argument("instances_json")
    p.add_argument("out_json")
    p.add_argument("--variant", type=int, choices=[11, 13], default=11)
    p.set_defaults(func=cmd_data_coco_traffic)

    p = sub.add_parser("demo", help="small CPU demo: teacher, student, KD and KD+AID on generated scenes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test)")
    p.add_argument("--arch", default="gfl", choices=["gfl", "retinanet", "fcos"],
                   help="detector family of teacher and students")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a trained detector to ONNX and check parity with onnxruntime")
    p.add_argument("checkpoint")
    p.add_argument("--onnx", required=True)
    p.add_argument("--samples", type=int, default=4)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report for a run or benchmark folder")
    p.add_argument("run_dir")
    p.add_argument("--out")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our messages through rich; Lightning keeps its own handler (attaching to the root logger would print twice).
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    log.propagate = False
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    from aidkd.data.structures import DatasetError
    from aidkd.engine.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
