"""``aidkd report``: one self-contained HTML page for a run folder or a folder of runs (a demo or a benchmark).

The page has no external resource: images are inlined as base64 PNG, styles are in the page, there is no script.
For every run (a folder with ``config.yaml``, ``model_best.pt``, ``best_metrics.json``, ... as ``aidkd train`` /
``aidkd distill`` write them) it shows

* the run's setup and its metrics (``best_metrics.json``) next to a fresh re-evaluation of ``model_best.pt`` on the
  val split of the run's ``config.yaml`` (at most ``max_eval_images`` images);
* per-class AP (COCO AP, VOC AP50, KITTI AP|R40 easy/moderate/hard) and the KITTI precision-recall curves of the
  re-evaluation (:class:`aidkd.eval.KittiAPResult` curves);
* training curves (``csv/metrics.csv`` or ``metrics_history.jsonl``);
* speed: parameters and CPU latency of one image at the configured size, for the model and its teacher;
* detection vs distillation loss terms over training (the ``train/*`` columns of ``csv/metrics.csv``);
* sample predictions on val images at the evaluation threshold ``eval.score_thresh`` (predictions coloured per
  class, ground truth in white);
* the AID weights: a histogram and per-class weights on one colour scale, from the weights training logged
  (``aid_weights.jsonl``), and the AID instance-weight and teacher attention images logged to TensorBoard
  (``distill/instance_weights``, ``distill/teacher_spatial_attention``).

A folder holding several runs (e.g. ``teacher``, ``student``, ``kd``, ``kd_aid`` of ``aidkd demo``) gets a
comparison table (with each run's difference to the ``student`` baseline), a speed table and overlaid PR curves
first. A value is marked best only where it beats the runner-up by more than twice their combined noise
(:func:`ap_noise`; latency: the spread of the timed passes). Anything that cannot be produced (no model file, no
data, no TensorBoard images, ...) is shown as "not available" with the reason, never raised.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("aidkd.report")

__all__ = ["DISTILL_IMAGE_TAGS", "SECTION_IDS", "ap_noise", "best_row", "build_report", "discover_runs",
           "read_aid_weights", "tensorboard_images"]

DISTILL_IMAGE_TAGS = {"distill/instance_weights": "AID instance weights (red: low weight) over the input",
                      "distill/teacher_spatial_attention": "teacher spatial attention (finest FPN level)"}
# element ids of the page's sections (the per-run ones get a "-<run>" suffix)
SECTION_IDS = ("overview", "comparison", "metrics", "per-class", "pr-curves", "training", "losses", "speed",
               "samples", "aid-weights", "distill-images")
RUN_ORDER = ("teacher", "student", "kd", "kd_aid")
HEADLINE = ("coco/AP", "coco/AP50", "coco/AP75", "coco/APs", "coco/APm", "coco/APl", "voc/mAP50",
            "kitti/moderate_mAP")
DIFFICULTIES = ("easy", "moderate", "hard")
MAX_DRAWN = 30  # most confident detections (at or above eval.score_thresh) drawn per sample image
BASELINE = "student"  # the run the comparison's differences are against
DIGITS = 2  # decimals of metric values (percent)

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em;margin-bottom:0} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.4em} .sub{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
.best{font-weight:bold;background:#e8f5e9}
.na{color:#a33;font-style:italic}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top} figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #ddd}
.run{border-left:4px solid #4a78c2;padding-left:14px;margin-top:2.5em}
code{background:#f4f4f4;padding:1px 4px}
"""


# ================================================================================================== data model

@dataclass
class EvalResult:
    metrics: dict[str, float]
    kitti: Any  # KittiAPResult | None
    samples: list  # [(PIL image with drawings, caption)]
    n_images: int
    n_total: int
    seconds: float
    n_gt: int = 0  # positive ground-truth boxes of the evaluated images (the noise of AP, ap_noise)


@dataclass
class Speed:
    params: int
    latency_ms: float
    size: tuple[int, int]
    device: str = "cpu"
    spread_ms: float = 0.0  # standard deviation of the timed passes


@dataclass
class Run:
    name: str
    path: Path
    cfg: Any = None  # RunConfig
    cfg_error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_source: str | None = None
    model_path: Path | None = None
    meta: dict | None = None
    seconds: float | None = None  # training time (demo results.json)
    evaluation: EvalResult | None = None
    eval_error: str | None = None
    speed: Speed | None = None
    speed_error: str | None = None
    teacher_speed: Speed | None = None
    teacher_label: str | None = None
    teacher_error: str | None = None

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in self.name)

    @property
    def best_metrics(self) -> dict[str, float]:
        """Re-evaluated metrics when there are, else the stored ones."""
        return self.evaluation.metrics if self.evaluation is not None else self.metrics


# ================================================================================================== discovery

def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("config.yaml", "model_best.pt", "best_metrics.json"))


def discover_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run folder, else its run sub-folders (two levels deep), demo order first."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    if _is_run(root):
        return [root]
    found = [p for p in sorted(root.iterdir()) if _is_run(p)]
    if not found:
        found = [q for p in sorted(root.iterdir()) if p.is_dir() for q in sorted(p.iterdir()) if _is_run(q)]
    rank = {n: i for i, n in enumerate(RUN_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), str(p)))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load_run(path: Path, root: Path, seconds: dict[str, float]) -> Run:
    from aidkd.engine.config import load_config

    name = path.name if path != root else (path.name or str(path))
    run = Run(name=name, path=path, seconds=seconds.get(path.name))
    try:
        run.cfg = load_config(path / "config.yaml")
    except Exception as e:  # noqa: BLE001 -- shown in the page
        run.cfg_error = str(e)
    for fname in ("best_metrics.json", "final_metrics.json"):
        data = _read_json(path / fname)
        if data:
            run.metrics = {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
            run.metrics_source = fname
            break
    for fname in ("model_best.pt", "model_last.pt"):
        if (path / fname).exists():
            run.model_path = path / fname
            break
    return run


# ================================================================================================== computations

def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return buf.getvalue()


def _pil_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_root_problem(cfg) -> str | None:
    """Why the run's val data cannot be read without side effects (None when it can)."""
    from aidkd.engine.datamodule import synth_root

    d = cfg.data
    if d.format == "synth":
        root = synth_root(d)
        return None if (root / ".complete").exists() else f"generated data not found at {root}"
    if d.format == "kitti":
        return None if d.root and Path(d.root).is_dir() else f"KITTI root not found: {d.root}"
    ann, images = d.val_ann, d.val_images
    if not ann or not Path(ann).exists():
        return f"COCO val annotations not found: {ann}"
    if not images or not Path(images).is_dir():
        return f"COCO val images not found: {images}"
    return None


def _draw_sample(image_tensor: torch.Tensor, det: dict, gt_boxes: torch.Tensor, classes: list[str]):
    from PIL import Image, ImageDraw

    from aidkd.engine.predict import draw_detections

    arr = (image_tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for b in gt_boxes.tolist():
        draw.rectangle(b, outline=(255, 255, 255), width=1)
    return draw_detections(img, det, classes)


@torch.no_grad()
def evaluate_run(run: Run, max_images: int | None = 500, num_samples: int = 4) -> EvalResult:
    """Re-evaluate ``run.model_path`` on the val split of its config; keeps ``num_samples`` drawn predictions."""
    from aidkd.data import collate_fn
    from aidkd.engine.datamodule import DetectionDataModule
    from aidkd.engine.run import uses_kitti_metrics
    from aidkd.eval import DetectionEvaluator
    from aidkd.models import load_detector

    if run.cfg is None:
        raise ValueError(f"no usable config.yaml ({run.cfg_error})")
    problems = [] if run.model_path is not None else ["no model_best.pt / model_last.pt in the run folder"]
    problems += [p for p in [_data_root_problem(run.cfg)] if p]
    if problems:
        raise FileNotFoundError("; ".join(problems))
    t0 = time.perf_counter()
    dm = DetectionDataModule(run.cfg.data)
    ds = dm.make_dataset("val", train=False)
    model, meta = load_detector(run.model_path, classes=dm.classes)
    run.meta = meta
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device)
    n_total = len(ds)
    n = n_total if max_images is None else min(n_total, max_images)
    records = ds.records[:n]
    evaluator = DetectionEvaluator(records, dm.classes, kitti=uses_kitti_metrics(run.cfg))
    thresh = run.cfg.eval.score_thresh
    bs = max(1, run.cfg.data.val_batch_size or run.cfg.data.batch_size)
    samples = []
    n_gt = 0
    for start in range(0, n, bs):
        images, targets = collate_fn([ds[i] for i in range(start, min(n, start + bs))])
        preds = model([im.to(device) for im in images])
        ids, dets = [], []
        for im, p, t in zip(images, preds, targets):
            p = {k: v.cpu() for k, v in p.items()}
            keep = (p["scores"] >= thresh) & (p["labels"] >= 1)  # label 0 is background (never a class)
            sx, sy = (float(v) for v in t.get("scale_xy", (t["scale"], t["scale"])))
            boxes = p["boxes"][keep].float() / torch.tensor([sx, sy, sx, sy])
            ids.append(int(t["image_id"]))
            dets.append({"boxes": boxes, "scores": p["scores"][keep], "labels": p["labels"][keep]})
            n_gt += len(t["boxes"])
            if len(samples) < num_samples:
                # the detections eval scores (>= eval.score_thresh), the most confident MAX_DRAWN drawn
                shown = torch.nonzero(keep)[:, 0]
                shown = shown[p["scores"][shown].argsort(descending=True)[:MAX_DRAWN]]
                det = {k: v[shown] for k, v in p.items()}  # in the pixels of ``im``, as its ground truth
                name = Path(ds.records[start + len(ids) - 1].image_path).name
                drawn = (f"all {int(keep.sum())}" if int(keep.sum()) <= MAX_DRAWN
                         else f"the {MAX_DRAWN} most confident of {int(keep.sum())}")
                caption = (f"{name}: {drawn} detections >= {thresh:g} (eval.score_thresh), "
                           f"{len(t['boxes'])} ground truth (white)")
                samples.append((_draw_sample(im, det, t["boxes"], dm.classes), caption))
        evaluator.update(ids, dets)
    metrics = evaluator.compute()
    return EvalResult(metrics, evaluator.kitti_result, samples, n, n_total, time.perf_counter() - t0, n_gt=n_gt)


@torch.no_grad()
def measure_speed(model: torch.nn.Module, size: tuple[int, int], runs: int = 5) -> Speed:
    """Parameters and median CPU latency of one ``size`` (H, W) image (after two warm-up passes)."""
    model = model.eval().cpu()
    x = [torch.rand(3, *size, generator=torch.Generator().manual_seed(0))]
    for _ in range(2):  # warm-up (allocator, oneDNN primitives)
        model(x)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1000)
    return Speed(sum(p.numel() for p in model.parameters()), float(statistics.median(times)), size,
                 spread_ms=float(statistics.stdev(times)) if len(times) > 1 else 0.0)


def _speed_of(path: Path, size: tuple[int, int] | None, runs: int) -> tuple[Speed, dict]:
    from aidkd.models import load_detector

    model, meta = load_detector(path)
    size = size or (meta["min_size"], meta["max_size"])
    return measure_speed(model, size, runs), meta


def tensorboard_images(tb_dir: str | Path, tags=tuple(DISTILL_IMAGE_TAGS), last: int = 3) -> dict[str, list]:
    """``{tag: [(step, png bytes), ...]}``: the last ``last`` images of each tag in the TensorBoard event files
    under ``tb_dir`` (every sub-folder with event files is read)."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        raise FileNotFoundError(f"no TensorBoard folder {tb_dir}")
    folders = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    if not folders:
        raise FileNotFoundError(f"no TensorBoard event files under {tb_dir}")
    found: dict[str, dict[int, bytes]] = {t: {} for t in tags}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={IMAGES: 0})
        acc.Reload()
        have = set(acc.Tags().get("images", []))
        for tag in tags:
            if tag in have:
                for ev in acc.Images(tag):
                    found[tag][int(ev.step)] = ev.encoded_image_string
    return {t: sorted(v.items())[-last:] for t, v in found.items() if v}


def _training_series(run: Run) -> dict[str, list[tuple[float, float]]]:
    """Named (x, y) series: train loss by step, validation AP by epoch (csv logger, else metrics_history)."""
    series: dict[str, list[tuple[float, float]]] = {}
    csv_path = run.path / "csv" / "metrics.csv"
    if not csv_path.exists():
        found = sorted((run.path / "csv").glob("**/metrics.csv")) if (run.path / "csv").is_dir() else []
        csv_path = found[-1] if found else None
    if csv_path is not None:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                for key, xkey, label in (("train/loss", "step", "train loss (step)"),
                                         ("val/coco/AP", "epoch", "val COCO AP (epoch)"),
                                         ("val/kitti/moderate_mAP", "epoch", "val KITTI moderate mAP (epoch)")):
                    try:
                        x, y = float(row.get(xkey) or "nan"), float(row.get(key) or "nan")
                    except ValueError:
                        continue
                    if not (math.isnan(x) or math.isnan(y)):
                        series.setdefault(label, []).append((x, y))
    if not any(k.startswith("val") for k in series):
        hist = run.path / "metrics_history.jsonl"
        if hist.exists():
            for line in hist.read_text().splitlines():
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                for key, label in (("coco/AP", "val COCO AP (epoch)"),
                                   ("kitti/moderate_mAP", "val KITTI moderate mAP (epoch)")):
                    if key in m and "epoch" in m and not math.isnan(float(m[key])):
                        series.setdefault(label, []).append((float(m["epoch"]), float(m[key])))
    return series


def _loss_terms(run: Run) -> dict[str, list[tuple[float, float]]]:
    """Each logged loss term by step (``train/<term>`` columns of the csv log, ``train/loss`` -- their sum --
    left out): detection terms by their names, distillation terms as ``distill/<method>/<term>``."""
    terms: dict[str, list[tuple[float, float]]] = {}
    folder = run.path / "csv"
    paths = sorted(folder.glob("**/metrics.csv")) if folder.is_dir() else []
    for path in paths:  # a resumed run starts a new csv version: read them all, in order
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if not key or not key.startswith("train/") or key == "train/loss" or not value:
                        continue
                    try:
                        x, y = float(row.get("step") or "nan"), float(value)
                    except ValueError:
                        continue
                    if not (math.isnan(x) or math.isnan(y)):
                        terms.setdefault(key.removeprefix("train/"), []).append((x, y))
    return terms


def _summed(terms: dict[str, list[tuple[float, float]]], keys: list[str]) -> list[tuple[float, float]]:
    by_step: dict[float, float] = {}
    for k in keys:
        for x, y in terms[k]:
            by_step[x] = by_step.get(x, 0.0) + y
    return sorted(by_step.items())


def read_aid_weights(path: str | Path) -> tuple[list[float], list[str], list[int]]:
    """``(weights, classes, steps)`` of every instance in ``aid_weights.jsonl`` (written by training on logging
    steps); unreadable lines are skipped."""
    weights: list[float] = []
    classes: list[str] = []
    steps: list[int] = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
            w, c = [float(v) for v in rec["weights"]], [str(v) for v in rec["classes"]]
        except (ValueError, KeyError, TypeError):
            continue
        if len(w) == len(c):
            weights += w
            classes += c
            steps += [int(rec.get("step", -1))] * len(w)
    return weights, classes, steps


def ap_noise(ap: float, n_gt: int) -> float:
    """Approximate standard error (percent points) of an AP measured on ``n_gt`` ground-truth boxes, treating AP as
    a proportion: ``sqrt(AP (100 - AP) / n_gt)``, floored at ``100 / n_gt`` (one box more or less found)."""
    if n_gt <= 0 or ap is None or math.isnan(ap):
        return float("nan")
    p = min(max(ap, 0.0), 100.0)
    return max(math.sqrt(p * (100.0 - p) / n_gt), 100.0 / n_gt)


def best_row(values: list[float], noise: list[float], higher: bool = True) -> int | None:
    """Index of the best value, or ``None`` when it does not beat the runner-up by more than twice their combined
    noise (``2 * sqrt(n_best^2 + n_second^2)``; an unknown -- nan -- noise marks nothing)."""
    ok = [i for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if len(ok) < 2:
        return None
    order = sorted(ok, key=lambda i: values[i], reverse=higher)
    first, second = order[0], order[1]
    combined = math.hypot(noise[first], noise[second])
    if math.isnan(combined):
        return None
    return first if abs(values[first] - values[second]) > 2 * combined else None


# ================================================================================================== plots

def _pr_figure(kitti, classes: list[str], title: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(classes), 3.6))
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, cls in zip(axes, classes):
        for diff, style in zip(DIFFICULTIES, ("-", "--", ":")):
            curve = kitti.curves.get(cls, {}).get(diff)
            ap = kitti.ap.get(cls, {}).get(diff, float("nan"))
            if curve is None or math.isnan(ap):
                continue
            rec, prec = curve
            ax.plot(rec, prec, style, label=f"{diff} AP {ap:.1f}")
        ax.set_title(cls)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _figure_png(fig)


def _pr_compare_figure(runs: list[Run], classes: list[str], difficulty: str = "moderate") -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(classes), 3.6))
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, cls in zip(axes, classes):
        for run in runs:
            k = run.evaluation.kitti if run.evaluation else None
            if k is None or cls not in k.curves or math.isnan(k.ap[cls][difficulty]):
                continue
            rec, prec = k.curves[cls][difficulty]
            ax.plot(rec, prec, label=f"{run.name} AP {k.ap[cls][difficulty]:.1f}")
        ax.set_title(f"{cls} ({difficulty})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
    return _figure_png(fig)


def _training_figure(series: dict[str, list[tuple[float, float]]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(series), 3.2))
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (label, pts) in zip(axes, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return _figure_png(fig)


def _loss_figure(terms: dict[str, list[tuple[float, float]]]) -> bytes:
    from matplotlib.figure import Figure

    distill = [k for k in terms if k.startswith("distill/")]
    detect = [k for k in terms if k not in distill]
    fig = Figure(figsize=(10, 3.4))
    ax_sum, ax_each = fig.subplots(1, 2)
    for keys, label in ((detect, "detection (sum)"), (distill, "distillation (sum)")):
        if keys:
            xs, ys = zip(*_summed(terms, keys))
            ax_sum.plot(xs, ys, label=label)
    ax_sum.set_title("detection vs distillation loss")
    for k in detect + distill:
        xs, ys = zip(*sorted(terms[k]))
        ax_each.plot(xs, ys, "--" if k in distill else "-", label=k, lw=1)
    ax_each.set_title("each term")
    if all(y > 0 for k in terms for _, y in terms[k]):
        ax_each.set_yscale("log")
    for ax in (ax_sum, ax_each):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _figure_png(fig)


def _aid_figure(weights: list[float], classes: list[str]) -> bytes:
    """Histogram of the weights and per-class mean weights (p10-p90 bars), bars coloured on one weight scale."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    w = np.asarray(weights, dtype=np.float64)
    norm = Normalize(vmin=float(w.min()), vmax=max(float(w.max()), float(w.min()) + 1e-6))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(10, 3.4))
    ax_hist, ax_cls = fig.subplots(1, 2)
    counts, edges = np.histogram(w, bins=30, range=(norm.vmin, norm.vmax))
    centres = (edges[:-1] + edges[1:]) / 2
    ax_hist.bar(centres, counts, width=np.diff(edges), color=cmap(norm(centres)), edgecolor="none")
    ax_hist.set_xlabel("AID instance weight")
    ax_hist.set_ylabel("instances")
    ax_hist.set_title(f"{len(w)} instance weights")
    names = sorted(set(classes))
    by_cls = {c: w[[i for i, k in enumerate(classes) if k == c]] for c in names}
    means = [float(by_cls[c].mean()) for c in names]
    lo = [means[i] - float(np.percentile(by_cls[c], 10)) for i, c in enumerate(names)]
    hi = [float(np.percentile(by_cls[c], 90)) - means[i] for i, c in enumerate(names)]
    ax_cls.barh(names, means, xerr=[lo, hi], color=cmap(norm(np.asarray(means))), capsize=3)
    ax_cls.set_xlim(norm.vmin, norm.vmax)
    ax_cls.set_xlabel("mean weight (bars: 10th-90th percentile)")
    ax_cls.set_title("per class")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[ax_hist, ax_cls], label="weight (colour scale)")
    return _figure_png(fig)


# ================================================================================================== HTML pieces

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _na(reason: str) -> str:
    return f'<p class="na">not available: {_e(reason)}</p>'


def _img(png: bytes, alt: str, caption: str | None = None, min_width: int | None = None) -> str:
    """An inline PNG; ``min_width``: small images are shown enlarged by a whole factor (pixelated) to about that."""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    size = ""
    if min_width:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            w, h = im.size
        factor = max(1, min(16, round(min_width / max(1, w))))
        if factor > 1:
            size = f' width="{w * factor}" height="{h * factor}" style="image-rendering:pixelated"'
    return f'<figure><img alt="{_e(alt)}" src="{src}"{size}>{cap}</figure>'


def _fmt(v: Any, digits: int = DIGITS) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "n/a" if math.isnan(f) else f"{f:.{digits}f}"


def _table(head: list[str] | None, rows: list[list[str]],
           best: dict[int, tuple[bool, list[float], list[float]]] | None = None) -> str:
    """Cells are pre-escaped HTML; ``best`` {column: (higher_is_better, values, noise)} (one value and noise a
    row) marks a column's best cell where :func:`best_row` finds one beyond the noise."""
    marked = {(i, c) for c, (higher, vals, noise) in (best or {}).items()
              for i in [best_row(vals, noise, higher)] if i is not None}
    out = ["<table>" + ("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>" if head
                        else "") + "<tbody>"]
    for row_i, r in enumerate(rows):
        cells = []
        for i, cell in enumerate(r):
            cls = ' class="best"' if (row_i, i) in marked else ""
            cells.append(f"<td{cls}>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _section(sid: str, title: str, body: str, level: int = 3) -> str:
    return f'<section id="{_e(sid)}"><h{level}>{_e(title)}</h{level}>{body}</section>'


def _guard(what: str, fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- one broken part must not take the page down
        log.warning("report: %s not available: %s", what, e)
        return _na(f"{type(e).__name__}: {e}")


# ================================================================================================== run sections

def _setup_html(run: Run) -> str:
    if run.cfg is None:
        return _na(f"config.yaml: {run.cfg_error}")
    c = run.cfg
    m = run.meta or {}
    model = (f"{m.get('arch', c.model.arch)} / {m.get('backbone', c.model.backbone)}, FPN "
             f"{m.get('fpn_channels', c.model.fpn_channels)}")
    rows = [["model", _e(model)],
            ["data", _e(f"{c.data.format}, input {c.data.min_size}x{c.data.max_size} (min/max size)")],
            ["schedule", _e(f"{c.train.epochs} epochs, {c.train.optimizer} lr {c.train.lr}")]]
    if c.distill is not None:
        methods = ", ".join(mc.name for mc in c.distill.methods) or "none"
        aid = (f"AID on ({c.distill.aid.granularity}, alpha {c.distill.aid.alpha})" if c.distill.aid.enabled
               else "AID off")
        rows.append(["distillation", _e(f"teacher {c.distill.teacher.checkpoint}; methods: {methods}; {aid}")])
    else:
        rows.append(["distillation", "none (trained alone)"])
    if run.model_path is not None:
        rows.append(["model file", f"<code>{_e(run.model_path.name)}</code>"])
    if run.seconds is not None:
        rows.append(["training time", f"{run.seconds:.0f} s"])
    return _table(None, rows)


def _metrics_html(run: Run) -> str:
    stored, ev = run.metrics, run.evaluation
    if not stored and ev is None:
        return _na("no best_metrics.json / final_metrics.json and no re-evaluation" +
                   (f" ({run.eval_error})" if run.eval_error else ""))
    keys = [k for k in HEADLINE if k in stored or (ev and k in ev.metrics)]
    head = ["metric"]
    if stored:
        epoch = stored.get("epoch")
        head.append(f"{run.metrics_source}" + (f" (epoch {int(epoch)})" if epoch is not None else ""))
    if ev:
        head.append(f"re-evaluated ({ev.n_images} val images)")
    rows = []
    for k in keys:
        row = [_e(k)]
        if stored:
            row.append(_fmt(stored.get(k)))
        if ev:
            row.append(_fmt(ev.metrics.get(k)))
        rows.append(row)
    note = ""
    if ev is None:
        note = _na(f"re-evaluation: {run.eval_error}")
    elif ev.n_images < ev.n_total:
        note = f'<p class="sub">re-evaluated on the first {ev.n_images} of {ev.n_total} val images</p>'
    return _table(head, rows) + note


def _classes_of(metrics: dict) -> list[str]:
    out = []
    for k in metrics:
        parts = k.split("/", 2)  # a class name may hold "/" itself
        if len(parts) == 3 and parts[0] in ("coco", "voc") and parts[1] in ("AP", "AP50") and parts[2] not in out:
            out.append(parts[2])
    return out


def _per_class_html(run: Run) -> str:
    m = run.best_metrics
    classes = _classes_of(m)
    if not classes:
        return _na("no per-class metrics")
    has_kitti = any(k.startswith("kitti/") for k in m)
    head = ["class", "COCO AP", "VOC AP50"] + ([f"KITTI {d}" for d in DIFFICULTIES] if has_kitti else [])
    rows = []
    for c in classes:
        row = [_e(c), _fmt(m.get(f"coco/AP/{c}")), _fmt(m.get(f"voc/AP50/{c}"))]
        if has_kitti:
            row += [_fmt(m.get(f"kitti/{c}/{d}")) for d in DIFFICULTIES]
        rows.append(row)
    src = "re-evaluation" if run.evaluation is not None else run.metrics_source
    kitti = "" if has_kitti else _na("KITTI AP|R40 (eval.kitti is off for this run)")
    return f'<p class="sub">from the {_e(src)}; KITTI: AP|R40 (%)</p>' + _table(head, rows) + kitti


def _pr_html(run: Run) -> str:
    ev = run.evaluation
    if ev is None:
        return _na(f"needs a re-evaluation: {run.eval_error}")
    if ev.kitti is None:
        return _na("PR curves come from the KITTI AP|R40 evaluation, which is off for this run")
    classes = list(ev.kitti.ap)
    return _img(_pr_figure(ev.kitti, classes, f"{run.name}: KITTI precision-recall (41 recall points)"),
                f"precision-recall curves of {run.name}")


def _training_html(run: Run) -> str:
    series = _training_series(run)
    if not series:
        return _na("no csv/metrics.csv or metrics_history.jsonl")
    return _img(_training_figure(series), f"training curves of {run.name}")


def _losses_html(run: Run) -> str:
    terms = _loss_terms(run)
    if not terms:
        return _na("no train/<term> columns in csv/metrics.csv")
    distill = sorted(k for k in terms if k.startswith("distill/"))
    detect = sorted(k for k in terms if k not in distill)
    rows = []
    for k in detect + distill:
        pts = sorted(terms[k])
        tail = [y for _, y in pts[-max(1, len(pts) // 10):]]  # the last tenth of training
        rows.append([_e(k), "distillation" if k in distill else "detection", f"{pts[0][1]:.4g}",
                     f"{sum(tail) / len(tail):.4g}"])
    note = "" if distill else '<p class="sub">no distillation terms (trained alone)</p>'
    return (_img(_loss_figure(terms), f"loss terms of {run.name}") + note +
            _table(["term", "kind", "first logged", "mean of the last tenth"], rows))


def _aid_weights_html(run: Run) -> str:
    if run.cfg is not None and (run.cfg.distill is None or not run.cfg.distill.aid.enabled):
        return _na("not an AID run" if run.cfg.distill is not None else "not a distillation run")
    path = run.path / "aid_weights.jsonl"
    if not path.exists():
        return _na("no aid_weights.jsonl (written by training on logging steps, train.log_every)")
    weights, classes, steps = read_aid_weights(path)
    if not weights:
        return _na(f"{path.name} holds no weights")
    rows = []
    for c in sorted(set(classes)):
        w = np.asarray([v for v, k in zip(weights, classes) if k == c])
        rows.append([_e(c), str(len(w)), f"{w.mean():.4f}", f"{np.percentile(w, 10):.4f}",
                     f"{np.median(w):.4f}", f"{np.percentile(w, 90):.4f}"])
    sub = (f'<p class="sub">{len(weights)} positive instances over {len(set(steps))} logging steps '
           f"(steps {min(steps)}-{max(steps)}); weight exp(-alpha * teacher loss), 1 = full distillation</p>")
    return (sub + _img(_aid_figure(weights, classes), f"AID weights of {run.name}") +
            _table(["class", "instances", "mean", "p10", "median", "p90"], rows))


def _speed_row(label: str, sp: Speed) -> list[str]:
    return [_e(label), f"{sp.params / 1e6:.2f}", f"{sp.latency_ms:.1f}", f"{sp.size[0]}x{sp.size[1]}"]


SPEED_HEAD = ["model", "params (M)", "CPU latency (ms, median)", "input (HxW)"]


def _speed_html(run: Run) -> str:
    rows = []
    if run.speed is not None:
        rows.append(_speed_row(f"{run.name} (this run)", run.speed))
    if run.teacher_speed is not None:
        rows.append(_speed_row(run.teacher_label or "teacher", run.teacher_speed))
    notes = ""
    if run.speed is None:
        notes += _na(f"speed of this run's model: {run.speed_error}")
    if run.teacher_error:
        notes += _na(f"teacher speed: {run.teacher_error}")
    if run.speed and run.teacher_speed:
        notes += (f'<p class="sub">student / teacher: {run.speed.params / run.teacher_speed.params:.2f}x the '
                  f'parameters, {run.teacher_speed.latency_ms / run.speed.latency_ms:.2f}x faster on the CPU</p>')
    body = _table(SPEED_HEAD, rows) if rows else ""
    threads = torch.get_num_threads()
    return body + notes + f'<p class="sub">one image, {threads} CPU thread(s), after 2 warm-up passes</p>'


def _samples_html(run: Run) -> str:
    ev = run.evaluation
    if ev is None:
        return _na(f"needs a re-evaluation: {run.eval_error}")
    if not ev.samples:
        return _na("the val split is empty")
    return "".join(_img(_pil_png(im), f"predictions of {run.name}", cap, min_width=480) for im, cap in ev.samples)


def _distill_images_html(run: Run) -> str:
    if run.cfg is not None and run.cfg.distill is None:
        return _na("not a distillation run")
    images = tensorboard_images(run.path / "tb")
    if not images:
        return _na("no distill/* images in the TensorBoard logs (logged every distill.image_log_every steps)")
    out = []
    for tag, title in DISTILL_IMAGE_TAGS.items():
        if tag not in images:
            out.append(_na(f"{tag}: not logged"))
            continue
        out.append(f"<h4>{_e(title)} <code>{_e(tag)}</code></h4>")
        out += [_img(png, f"{tag} step {step}", f"step {step}", min_width=360) for step, png in images[tag]]
    return "".join(out)


def _run_html(run: Run) -> str:
    a = run.anchor
    parts = [f'<section class="run" id="run-{_e(a)}"><h2>{_e(run.name)}</h2>',
             f'<p class="sub">{_e(run.path)}</p>',
             _guard("setup", lambda: _setup_html(run)),
             _section(f"metrics-{a}", "Metrics", _guard("metrics", lambda: _metrics_html(run))),
             _section(f"per-class-{a}", "Per-class AP (COCO, VOC, KITTI easy / moderate / hard)",
                      _guard("per-class", lambda: _per_class_html(run))),
             _section(f"pr-curves-{a}", "Precision-recall curves", _guard("PR curves", lambda: _pr_html(run))),
             _section(f"training-{a}", "Training curves", _guard("training curves", lambda: _training_html(run))),
             _section(f"losses-{a}", "Loss terms: detection vs distillation",
                      _guard("loss terms", lambda: _losses_html(run))),
             _section(f"speed-{a}", "Speed", _guard("speed", lambda: _speed_html(run))),
             _section(f"samples-{a}", "Sample predictions", _guard("samples", lambda: _samples_html(run))),
             _section(f"aid-weights-{a}", "AID weights: histogram and per class",
                      _guard("AID weights", lambda: _aid_weights_html(run))),
             _section(f"distill-images-{a}", "Distillation: instance weights and attention masks",
                      _guard("distillation images", lambda: _distill_images_html(run))),
             "</section>"]
    return "".join(parts)


# ================================================================================================== comparison

def _mean_kitti(m: dict, d: str) -> float:
    vals = [m.get(f"kitti/{c}/{d}", float("nan")) for c in _classes_of(m)]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _comparison_html(runs: list[Run]) -> str:
    metric_cols = [("COCO AP", lambda m: m.get("coco/AP", float("nan"))),
                   ("AP50", lambda m: m.get("coco/AP50", float("nan"))),
                   ("VOC mAP50", lambda m: m.get("voc/mAP50", float("nan"))),
                   ("KITTI easy", lambda m: _mean_kitti(m, "easy")),
                   ("KITTI moderate", lambda m: m.get("kitti/moderate_mAP", _mean_kitti(m, "moderate"))),
                   ("KITTI hard", lambda m: _mean_kitti(m, "hard"))]
    base = next((r for r in runs if r.name == BASELINE), None)
    base_m = base.best_metrics if base is not None else {}
    head = ["run", "model", "params (M)", "CPU ms"] + [c for c, _ in metric_cols]
    if base is not None:
        head += [f"Δ COCO AP vs {BASELINE}", f"Δ KITTI moderate vs {BASELINE}"]
    head.append("train s")
    nan = float("nan")
    values: dict[int, list[float]] = {}
    noise: dict[int, list[float]] = {}
    rows = []
    for r in runs:
        m = r.best_metrics
        n_gt = r.evaluation.n_gt if r.evaluation is not None else 0  # stored metrics: noise unknown, never best
        model = f"{r.meta['arch']}/{r.meta['backbone']}" if r.meta else (
            f"{r.cfg.model.arch}/{r.cfg.model.backbone}" if r.cfg else "n/a")
        row = [f'<a href="#run-{_e(r.anchor)}">{_e(r.name)}</a>', _e(model),
               f"{r.speed.params / 1e6:.2f}" if r.speed else "n/a",
               f"{r.speed.latency_ms:.1f} ± {r.speed.spread_ms:.1f}" if r.speed else "n/a"]
        values.setdefault(3, []).append(r.speed.latency_ms if r.speed else nan)
        noise.setdefault(3, []).append(r.speed.spread_ms if r.speed else nan)
        for j, (_, get) in enumerate(metric_cols):
            v = float(get(m))
            row.append(_fmt(v))
            values.setdefault(4 + j, []).append(v)
            noise.setdefault(4 + j, []).append(ap_noise(v, n_gt))
        if base is not None:
            for key, get in (("coco/AP", metric_cols[0][1]), ("kitti/moderate_mAP", metric_cols[4][1])):
                d = float(get(m)) - float(get(base_m))
                row.append("—" if r is base else ("n/a" if math.isnan(d) else f"{d:+.{DIGITS}f}"))
        row.append(f"{r.seconds:.0f}" if r.seconds is not None else "n/a")
        rows.append(row)
    best = {c: (c != 3, values[c], noise[c]) for c in values}
    src = ("re-evaluated model_best.pt where possible, else best_metrics.json; metrics in percent; KITTI columns: "
           "mean AP|R40 over classes; CPU ms: median ± standard deviation of the timed passes. A value is marked "
           "best (green) only where it beats the runner-up by more than twice their combined noise: for AP the "
           "approximate standard error sqrt(AP (100 - AP) / N) of N val ground-truth boxes (re-evaluated runs "
           "only)")
    if base is not None:
        src += f"; Δ: difference to the {BASELINE} run (the baseline without distillation)"
    body = f'<p class="sub">{_e(src)}</p>' + _table(head, rows, best)
    with_curves = [r for r in runs if r.evaluation is not None and r.evaluation.kitti is not None]
    if with_curves:
        classes = list(with_curves[0].evaluation.kitti.ap)
        body += "<h3>KITTI moderate precision-recall, all runs</h3>" + _img(
            _pr_compare_figure(with_curves, classes), "precision-recall curves of all runs")
    else:
        body += _na("overlaid PR curves: no run could be re-evaluated with KITTI metrics")
    return body


# ================================================================================================== entry point

def _compute(run: Run, max_eval_images: int | None, num_samples: int, latency_runs: int,
             speed_cache: dict[Path, tuple[Speed, dict]]) -> None:
    try:
        run.evaluation = evaluate_run(run, max_images=max_eval_images, num_samples=num_samples)
    except Exception as e:  # noqa: BLE001 -- reported in the page
        run.eval_error = f"{type(e).__name__}: {e}"
        log.warning("report: %s: re-evaluation not available: %s", run.name, run.eval_error)
    size = (run.cfg.data.min_size, run.cfg.data.max_size) if run.cfg is not None else None
    if run.model_path is None:
        run.speed_error = "no model file"
    else:
        try:
            key = run.model_path.resolve()
            if key not in speed_cache:
                speed_cache[key] = _speed_of(run.model_path, size, latency_runs)
            run.speed, meta = speed_cache[key]
            run.meta = run.meta or meta
        except Exception as e:  # noqa: BLE001
            run.speed_error = f"{type(e).__name__}: {e}"
    if run.cfg is not None and run.cfg.distill is not None:
        tpath = run.cfg.distill.teacher.checkpoint
        if not tpath or not Path(tpath).exists():
            run.teacher_error = f"teacher checkpoint not found: {tpath}"
            return
        try:
            key = Path(tpath).resolve()
            if key not in speed_cache:
                speed_cache[key] = _speed_of(Path(tpath), size, latency_runs)
            run.teacher_speed, tmeta = speed_cache[key]
            run.teacher_label = f"teacher {tmeta['arch']}/{tmeta['backbone']} ({Path(tpath).parent.name})"
        except Exception as e:  # noqa: BLE001
            run.teacher_error = f"{type(e).__name__}: {e}"


def build_report(run_dir: str | Path, out: str | Path | None = None, *, max_eval_images: int | None = 500,
                 num_samples: int = 4, latency_runs: int = 5) -> Path:
    """Write the HTML report of ``run_dir`` (a run, or a folder of runs) to ``out`` (default
    ``<run_dir>/report.html``) and return its path. See the module doc for the contents."""
    from aidkd import __version__

    root = Path(run_dir)
    paths = discover_runs(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no run folder (config.yaml / model_best.pt / best_metrics.json) in it "
                                "or in its sub-folders")
    results = _read_json(root / "results.json") or {}
    seconds = {k: float(v["seconds"]) for k, v in results.items() if isinstance(v, dict) and "seconds" in v}
    runs = [_load_run(p, root, seconds) for p in paths]
    speed_cache: dict[Path, tuple[Speed, dict]] = {}
    t0 = time.perf_counter()
    for run in runs:
        _compute(run, max_eval_images, num_samples, latency_runs, speed_cache)

    title = f"aidkd report: {root.resolve().name}"
    overview = (f'<p class="sub">{len(runs)} run(s) from <code>{_e(root.resolve())}</code>; generated '
                f'{datetime.now().strftime("%Y-%m-%d %H:%M")} by aidkd {_e(__version__)} in '
                f'{time.perf_counter() - t0:.0f} s</p>')
    if len(runs) > 1:
        overview += "<ul>" + "".join(f'<li><a href="#run-{_e(r.anchor)}">{_e(r.name)}</a></li>' for r in runs) + \
            "</ul>"
    parts = [f'<section id="overview"><h1>{_e(title)}</h1>{overview}</section>']
    if len(runs) > 1:
        parts.append(_section("comparison", "Comparison", _guard("comparison", lambda: _comparison_html(runs)), 2))
    if (root / "analysis" / "summary.json").exists():  # written by `aidkd analyze ... --out RUN_DIR/analysis`
        from aidkd.eval.instances import analysis_html

        parts.append(_section("analysis", "Instance analysis (aidkd analyze): where AID's weights act",
                              _guard("instance analysis", lambda: analysis_html(root / "analysis")), 2))
    parts += [_run_html(r) for r in runs]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) +
            "\n</body></html>\n")
    out_path = Path(out) if out is not None else root / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_path)
    return out_path
