"""``aidkd`` command line: a thin layer over the Python API (aidkd.engine, aidkd.data, aidkd.eval)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from aidkd.engine.run_folder import check_output_file, record_run_file, recorded_entries

# soft_wrap: lines are never hard-wrapped at the terminal width (nor at 80 columns when written to a file).
# Results go to stdout; errors, warnings and progress messages to stderr, so `aidkd ... > out` still shows them.
console = Console(soft_wrap=True)
err_console = Console(soft_wrap=True, stderr=True)
log = logging.getLogger("aidkd")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    # nargs="?": `--set k=v CONFIG` hands CONFIG to --set's list; _load takes it back (it is no KEY=VALUE)
    p.add_argument("config", nargs="?", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys (values read as YAML), e.g. --set train.lr=0.02 data.batch_size=8")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip (and count) invalid samples instead of refusing the dataset")


def _load(args):
    from aidkd.engine.config import ConfigError, load_config

    overrides = list(args.overrides)
    plain = [o for o in overrides if "=" not in o]
    if args.config is None and len(plain) == 1:  # `--set k=v CONFIG`
        args.config = plain[0]
        overrides.remove(plain[0])
    if args.config is None:
        raise ConfigError("the YAML run config is missing: aidkd COMMAND CONFIG.yaml [--set KEY=VALUE ...]")
    if getattr(args, "skip_invalid", False):
        overrides.append("data.skip_invalid=true")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from aidkd.engine.run import train

    if args.config is None and str(args.resume or "").endswith((".yaml", ".yml")):  # `--resume CONFIG`
        args.config, args.resume = args.resume, "auto"
    cfg = _load(args)
    if args.command == "distill" and cfg.distill is None:
        raise ValueError(f"{args.config}: 'aidkd distill' needs a 'distill:' section (teacher, methods, aid)")
    if args.command == "train" and cfg.distill is not None:
        log.info("config has a 'distill' section: distilling from %s", cfg.distill.teacher.checkpoint)
    resume = "auto" if args.resume_or_new else args.resume
    metrics = train(cfg, resume=resume, overwrite=args.overwrite, resume_missing_ok=args.resume_or_new)
    _print_metrics(metrics, f"{cfg.name}: final validation metrics")
    console.print(f"model: {Path(cfg.output_dir) / 'model_best.pt'}", markup=False)
    return 0


def cmd_eval(args) -> int:
    from aidkd.engine.run import evaluate
    from aidkd.eval import strict_json

    cfg = _load(args)
    if args.json:
        check_output_file(args.json, "--json", args.force, inputs=(args.checkpoint, args.config))
    metrics = evaluate(cfg, args.checkpoint, split=args.split)
    _print_metrics(metrics, f"{args.checkpoint} on {args.split}")
    out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(f".{args.split}_metrics.json")
    out.write_text(strict_json(metrics, indent=2))
    if not args.json and recorded_entries(out.parent) is not None:  # beside a run's model file: the run's own
        record_run_file(out.parent, out.name)
    console.print(f"metrics written to {out}", markup=False)
    return 0


def cmd_predict(args) -> int:
    from aidkd.engine.predict import predict_command

    cfg = _load(args)
    n = predict_command(cfg, args.checkpoint, Path(args.out), source=args.input, draw=args.draw,
                        score_thresh=args.score_thresh, fmt=args.format)
    console.print(f"wrote predictions for {n} images to {args.out}", markup=False)
    return 0


def cmd_eval_kitti(args) -> int:
    from aidkd.eval import strict_json
    from aidkd.eval.kitti_io import evaluate_kitti_dirs, format_kitti_table

    if args.json:
        check_output_file(args.json, "--json", args.force, inputs=(args.split,))
    stems = None
    if args.split:
        from aidkd.data import read_split_file

        split = Path(args.split)
        if split.is_dir():  # a run folder: the validation images that run used
            from aidkd.engine.datamodule import run_split_file

            split = run_split_file(split, "val")
        stems = read_split_file(split)
    result = evaluate_kitti_dirs(args.gt_label_dir, args.pred_dir, stems=stems)
    console.print(format_kitti_table(result), markup=False, highlight=False)
    if args.json:
        Path(args.json).write_text(strict_json(result, indent=2))
        console.print(f"written to {args.json}", markup=False)
    return 0


def cmd_data_check(args) -> int:
    from aidkd.data import check_dataset
    from aidkd.data.check import dataset_summary, format_summary

    problems = check_dataset(args.root, fmt=args.format, image_dir=args.images)
    for p in problems:
        console.print(str(p), markup=False, highlight=False)
    console.print(escape(format_summary(dataset_summary(args.root, fmt=args.format, image_dir=args.images))),
                  highlight=False)
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
    console.print(f"wrote {args.num_images} scenes (KITTI layout) to {out}", markup=False)
    return 0


def cmd_data_coco_traffic(args) -> int:
    from aidkd.data import make_coco_traffic

    check_output_file(args.out_json, "out_json", args.force, inputs=(args.instances_json,))
    summary = make_coco_traffic(args.instances_json, args.out_json, variant=args.variant)
    console.print(f"wrote {args.out_json}" + (f": {summary}" if summary else ""), markup=False)
    return 0


def cmd_data_convert(args) -> int:
    from aidkd.data.convert import convert_dataset
    from aidkd.data.layout import detect_layout

    layout = "coco" if Path(args.src).suffix.lower() == ".json" else detect_layout(args.src)
    src_format = args.src_format or {"synth": "kitti"}.get(layout, layout)
    if src_format is None:
        raise ValueError(f"{args.src}: not recognisable as KITTI, COCO or YOLO; pass --from kitti|coco|yolo")
    counts = convert_dataset(args.src, args.dst, src_format, args.dst_format, copy=args.copy)
    split_counts = ", ".join(f"{split} {n}" for split, n in counts.items())
    console.print(f"wrote {args.dst} ({args.dst_format}, images {'copied' if args.copy else 'linked'}): "
                  f"{split_counts} images", markup=False)
    return 0


def cmd_demo(args) -> int:
    from aidkd.engine.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, arch=args.arch, fresh=args.fresh)
    return 0


def cmd_export(args) -> int:
    from aidkd.export import export_onnx

    check_output_file(args.onnx, "--onnx", args.force, inputs=(args.checkpoint,), example="model.onnx")
    report = export_onnx(args.checkpoint, args.onnx, num_samples=args.samples)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_report(args) -> int:
    from aidkd.report import build_report

    if args.out:
        check_output_file(args.out, "--out", args.force, example="report.html")
    out = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {out}", markup=False)
    return 0


def cmd_analyze(args) -> int:
    from aidkd.engine.analysis import analyze
    from aidkd.eval.instances import format_summary, weakening_advice

    cfg = _load(args)
    summary = analyze(cfg, args.teacher, Path(args.out), split=args.split, student=args.student,
                      score_thresh=args.score_thresh)
    console.print(format_summary(summary), markup=False, highlight=False, soft_wrap=True)
    console.print(weakening_advice(summary), markup=False, highlight=False)
    console.print(f"instances.csv, summary.json and weights.png written to {args.out}", markup=False)
    return 0


def _add_force_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists (default: refuse)")


def _print_metrics(metrics: dict, title: str) -> None:
    from aidkd.eval import format_metrics_table

    console.print(f"[bold]{escape(title)}[/bold]")
    console.print(format_metrics_table(metrics), markup=False, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    from aidkd import __version__
    from aidkd.data.synth import MAX_SIDE, MIN_SIDE

    ap = argparse.ArgumentParser(prog="aidkd", description="Adaptive Instance Distillation for object detectors")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback for every error")
    ap.add_argument("--version", action="version", version=f"aidkd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    for name, help_ in (("train", "train a detector (teachers and baseline students)"),
                        ("distill", "distil a student from a trained teacher (KD, KD+AID)")):
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        how = p.add_mutually_exclusive_group()
        how.add_argument("--resume", nargs="?", const="auto", default=None, metavar="RUN_DIR|CKPT",
                         help="resume the config's output_dir (no value), the given run folder, or the given .ckpt; "
                              "an error when there is nothing to resume")
        how.add_argument("--resume-or-new", action="store_true",
                         help="resume the config's output_dir if it holds a checkpoint, else start a new run")
        p.add_argument("--overwrite", action="store_true",
                       help="start a new run in a non-empty output_dir, deleting the previous run's outputs")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained detector on the configured val set")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="model file (model_best.pt) or Lightning .ckpt")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split of the config's data")
    p.add_argument("--json", help="where to write the metrics (default: beside the checkpoint)")
    _add_force_arg(p, "the --json file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="per-instance teacher losses, AID weights and whether the teacher detects "
                                       "each instance (CSV, summary, plot): will AID act on this data?")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="teacher model file or Lightning checkpoint")
    p.add_argument("--student", help="optional student checkpoint: adds its loss and detections per instance")
    p.add_argument("--split", default="val", choices=["train", "val"], help="dataset split to analyse")
    p.add_argument("--out", required=True, help="output folder (RUN_DIR/analysis shows up in 'aidkd report')")
    p.add_argument("--score-thresh", type=_number_in(0, 1), default=0.3,
                   help="a matching teacher detection counts as found from this score")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("predict", help="write KITTI prediction files, a COCO results json or YOLO label files (and "
                                       "drawn images/video)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="model file (model_best.pt) or Lightning .ckpt")
    p.add_argument("--out", required=True, help="folder for the prediction files (and drawings)")
    p.add_argument("--input", help="a folder of images or a video file (default: the configured val set)")
    p.add_argument("--draw", action="store_true", help="also write images (or a video) with boxes drawn")
    p.add_argument("--score-thresh", type=_number_in(0, 1), default=None,
                   help="keep detections scoring at least this (default: the config's eval.score_thresh, 0.05 "
                        "unless set: the threshold eval scores with)")
    p.add_argument("--format", choices=["kitti", "coco", "yolo"], default=None,
                   help="kitti: one <stem>.txt per image (whitespace in class names written as %%20); coco: "
                        "OUT/predictions.json, a COCO results list; yolo: OUT/labels/<stem>.txt, 'class cx cy w h "
                        "conf' normalised (default: coco for COCO data, yolo for YOLO data, else kitti)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval-kitti", help="score KITTI prediction files against KITTI labels (AP_R40)")
    p.add_argument("gt_label_dir", help="KITTI label_2 folder (ground truth)")
    p.add_argument("pred_dir", help="prediction files, one per frame (matched by stem)")
    p.add_argument("--split", metavar="FILE|RUN_DIR",
                   help="evaluate only the frames listed in FILE (one stem a line, e.g. ImageSets/val.txt) or the "
                        "validation frames of a run (RUN_DIR/split/val.txt, written by every run); default: every "
                        "label file (a label file without prediction file counts as no detections)")
    p.add_argument("--json", help="also write the AP table as json here")
    _add_force_arg(p, "the --json file")
    p.set_defaults(func=cmd_eval_kitti)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="list every problem in a dataset (exit 1 if any)")
    p.add_argument("root", help="kitti: a KITTI root (training/image_2, training/label_2); coco: a COCO root "
                                "(annotations/instances_{train,val}*.json and their image folders, e.g. train2017/) "
                                "or one instances json; yolo: a data.yaml (or its folder)")
    p.add_argument("--format", choices=["auto", "kitti", "coco", "yolo"], default="auto",
                   help="dataset layout (default auto: coco for a json or a folder of annotations/*.json, yolo for a "
                        "data.yaml or its folder, kitti otherwise)")
    p.add_argument("--images", help="with a COCO instances json: its image folder (default: DATA/NAME for "
                                    "DATA/annotations/instances_NAME.json, else the json's folder)")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("synth", help="generate procedural driving scenes in KITTI layout")
    p.add_argument("out", help="output folder (KITTI layout)")
    p.add_argument("--num-images", type=_number_in(0, 10 ** 7, int), default=200, help="number of scenes")
    p.add_argument("--seed", type=_number_in(0, 2 ** 32 - 1, int), default=0,
                   help="random seed (same seed, same scenes)")
    p.add_argument("--width", type=_number_in(MIN_SIDE, MAX_SIDE, int), default=320,
                   help=f"image width in pixels ({MIN_SIDE}-{MAX_SIDE})")
    p.add_argument("--height", type=_number_in(MIN_SIDE, MAX_SIDE, int), default=96,
                   help=f"image height in pixels ({MIN_SIDE}-{MAX_SIDE})")
    p.add_argument("--hard-fraction", type=_number_in(0, 1), default=0.2,
                   help="fraction of hard objects (low contrast, blur, small, occluded)")
    p.add_argument("--mislabel-fraction", type=_number_in(0, 1), default=0.05,
                   help="fraction of deliberately mislabelled objects (listed in synth_meta.json)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("coco-traffic", help="build the COCO-traffic subset from a COCO instances json")
    p.add_argument("instances_json", help="a COCO instances json (e.g. instances_train2017.json)")
    p.add_argument("out_json", help="where to write the subset")
    p.add_argument("--variant", type=int, choices=[11, 13], default=11, help="the 11- or 13-class subset")
    _add_force_arg(p, "out_json")
    p.set_defaults(func=cmd_data_coco_traffic)

    p = data.add_parser("convert", help="write a KITTI, COCO or YOLO dataset in another of these layouts")
    p.add_argument("src", help="KITTI root, COCO instances json (or the folder holding annotations/), YOLO data.yaml "
                               "(or its folder)")
    p.add_argument("dst", help="a new or empty folder outside SRC")
    p.add_argument("--from", dest="src_format", choices=["kitti", "coco", "yolo"],
                   help="the source layout (default: recognised from SRC)")
    p.add_argument("--to", dest="dst_format", choices=["kitti", "coco", "yolo"], required=True,
                   help="the layout to write")
    p.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links to SRC's images)")
    p.set_defaults(func=cmd_data_convert)

    p = sub.add_parser("demo", help="small CPU demo: teacher, student, KD and KD+AID on generated scenes")
    p.add_argument("--out", default="runs/demo", help="folder for the data, runs and results (the demo's own: a "
                                                      "second run reuses its finished stages, resumes interrupted "
                                                      "ones)")
    p.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test)")
    p.add_argument("--arch", default="gfl", choices=["gfl", "retinanet", "fcos"],
                   help="detector family of teacher and students")
    p.add_argument("--fresh", action="store_true",
                   help="generate the scenes and train every run again (default: reuse what is unchanged)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a trained detector to ONNX and check parity with onnxruntime")
    p.add_argument("checkpoint", help="model file (model_best.pt) or Lightning .ckpt")
    p.add_argument("--onnx", required=True, help="where to write the .onnx file")
    p.add_argument("--samples", type=_number_in(1, 1000, int), default=4,
                   help="random inputs for the onnxruntime parity check")
    _add_force_arg(p, "the --onnx file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report for a run or benchmark folder")
    p.add_argument("run_dir", help="a run folder, or a folder of runs (e.g. the demo's)")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    _add_force_arg(p, "the --out file")
    p.set_defaults(func=cmd_report)
    return ap


def _number_in(lo: float, hi: float, kind: type = float):
    """An argparse ``type`` that reads a ``kind`` number in [lo, hi] (NaN and infinities are outside every range)."""

    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") from None
        if not lo <= value <= hi:  # False for NaN
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text!r}")
        return value

    return read


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix (bad input, file, checkpoint, disk), else None (a bug)."""
    import errno

    import yaml

    from aidkd.data.structures import DatasetError
    from aidkd.engine.module import NonFiniteLossError
    from aidkd.models.weights import CheckpointError

    if isinstance(e, DatasetError):  # may list several problems, one per line
        return str(e)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None:
        if e.errno == errno.ENOSPC:
            return f"{e.strerror} writing {e.filename or 'a file'}; free some space or choose another output_dir"
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    if isinstance(e, (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError, yaml.YAMLError,
                      UnicodeError)):
        return " ".join(str(e).split())
    return None


def _cut_lines(message: str) -> str:
    """``message`` with every over-long line shortened: an error may quote user input of any size. The bound is
    looser than a data error's quote (``MAX_LINE``) so that a message naming long paths and a command to run
    again keeps them whole."""
    from aidkd.data.structures import shorten

    return "\n".join(shorten(line, limit=1000) for line in message.splitlines())


def _setup_logging(verbose: bool) -> logging.Handler:
    # Our messages through rich on a terminal, plain unwrapped lines into a file or pipe; Lightning keeps its own
    # handler (attaching to the root logger would print twice).
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.handlers = [handler]
    log.propagate = False
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _setup_logging(args.verbose)
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (training stops at a step's end: engine/run.py)
        if args.verbose:
            raise
        err_console.print("[red]error:[/red] interrupted (Ctrl-C)", highlight=False)
        return 128 + signal.SIGINT
    except Exception as e:
        message = _user_error(e)
        if message is None or args.verbose:
            raise
        err_console.print(f"[red]error:[/red] {escape(_cut_lines(message))}", highlight=False)
        return 2
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
