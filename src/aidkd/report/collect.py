"""Everything the report shows, gathered from a run folder: the run's config and stored metrics, a re-evaluation
of its model file, its speed (and its teacher's), the training series and loss terms of ``csv/metrics.csv`` /
``metrics_history.jsonl``, the AID weights of ``aid_weights.jsonl``, the images in its TensorBoard logs, and the
noise of an AP (``ap_noise``, ``best_row``). Nothing here writes HTML or draws a chart (``figures.py``, ``html.py``).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from aidkd.data import collate_fn
from aidkd.engine.config import load_config
from aidkd.engine.datamodule import DetectionDataModule, synth_root
from aidkd.engine.module import VAL_PREFIX
from aidkd.engine.predict import draw_detections
from aidkd.engine.run import uses_kitti_metrics
from aidkd.eval import DetectionEvaluator
from aidkd.eval.evaluator import KITTI_METRIC, PRIMARY_METRIC, scored_detections
from aidkd.models import load_detector

log = logging.getLogger("aidkd.report")

DISTILL_IMAGE_TAGS = {"distill/instance_weights": "AID instance weights (red: low weight) over the input",
                      "distill/teacher_spatial_attention": "teacher spatial attention (finest FPN level)"}
RUN_ORDER = ("teacher", "student", "kd", "kd_aid")
MAX_DRAWN = 30  # most confident detections (at or above eval.score_thresh) drawn per sample image


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
    latency_ms: float  # median of the timed passes
    size: tuple[int, int]
    device: str = "cpu"
    spread_ms: float = 0.0  # standard deviation of the timed passes
    load_avg: float | None = None  # the machine's 1-min load average when they were timed
    passes: int = 0


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
    seconds: float | None = None  # training time (train_time.json, else the demo's results.json)
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

def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("config.yaml", "model_best.pt", "best_metrics.json"))


def discover_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run folder, else its run sub-folders (two levels deep), demo order first."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    if is_run(root):
        return [root]
    found = [p for p in sorted(root.iterdir()) if is_run(p)]
    if not found:
        found = [q for p in sorted(root.iterdir()) if p.is_dir() for q in sorted(p.iterdir()) if is_run(q)]
    rank = {n: i for i, n in enumerate(RUN_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), str(p)))


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(path: Path, root: Path, seconds: dict[str, float]) -> Run:
    name = path.name if path != root else (path.name or str(path))
    run = Run(name=name, path=path, seconds=seconds.get(path.name))
    train_time = read_json(path / "train_time.json")  # the run's own record: every segment of a resumed run
    if train_time and isinstance(train_time.get("seconds"), (int, float)):
        run.seconds = float(train_time["seconds"])
    try:
        run.cfg = load_config(path / "config.yaml")
    except Exception as e:  # noqa: BLE001 -- shown in the page
        run.cfg_error = str(e)
    for fname in ("best_metrics.json", "final_metrics.json"):
        data = read_json(path / fname)
        if data:
            # null: a metric without a value (aidkd writes NaN as null)
            run.metrics = {k: float("nan") if v is None else float(v) for k, v in data.items()
                           if v is None or isinstance(v, (int, float))}
            run.metrics_source = fname
            break
    for fname in ("model_best.pt", "model_last.pt"):
        if (path / fname).exists():
            run.model_path = path / fname
            break
    return run


# ================================================================================================== computations

def _data_root_problem(cfg) -> str | None:
    """Why the run's val data cannot be read without side effects (None when it can)."""
    d = cfg.data
    if d.format == "synth":
        root = synth_root(d)
        return None if (root / ".complete").exists() else f"generated data not found at {root}"
    if d.format == "kitti":
        return None if d.root and Path(d.root).is_dir() else f"KITTI root not found: {d.root}"
    if d.format == "yolo":
        return None if d.root and Path(d.root).exists() else f"YOLO data.yaml not found: {d.root}"
    ann, images = d.val_ann, d.val_images
    if not ann or not Path(ann).exists():
        return f"COCO val annotations not found: {ann}"
    if not images or not Path(images).is_dir():
        return f"COCO val images not found: {images}"
    return None


def _draw_sample(image_tensor: torch.Tensor, det: dict, gt_boxes: torch.Tensor, classes: list[str]):
    arr = (image_tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for b in gt_boxes.tolist():
        draw.rectangle(b, outline=(255, 255, 255), width=1)
    return draw_detections(img, det, classes)


@torch.no_grad()
def evaluate_run(run: Run, max_images: int | None = 500, num_samples: int = 4) -> EvalResult:
    """Re-evaluate ``run.model_path`` on the val split of its config; keeps ``num_samples`` drawn predictions."""
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
            keep, scored = scored_detections(p, t, thresh)
            ids.append(int(t["image_id"]))
            dets.append(scored)
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


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return None


@torch.no_grad()
def measure_speeds(models: dict[Any, tuple[torch.nn.Module, tuple[int, int]]], runs: int = 10) -> dict[Any, Speed]:
    """Parameters and CPU latency of one image of each model's ``size`` (H, W): every model is timed in this one
    process, interleaved (round ``r`` times each model once, in an order rotated by ``r``) after two warm-up passes
    each, so that a change of the machine's load falls on all models alike; the median and standard deviation of
    the ``runs`` passes, with the 1-min load average."""
    inputs = {}
    for key, (model, size) in models.items():
        model.eval().cpu()
        inputs[key] = [torch.rand(3, *size, generator=torch.Generator().manual_seed(0))]
        for _ in range(2):  # warm-up (allocator, oneDNN primitives)
            model(inputs[key])
    keys = list(models)
    times: dict[Any, list[float]] = {k: [] for k in keys}
    loads = [_load_avg()]
    for r in range(max(1, runs)):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            models[key][0](inputs[key])
            times[key].append((time.perf_counter() - t0) * 1000)
    loads.append(_load_avg())
    load = max((v for v in loads if v is not None), default=None)
    return {k: Speed(sum(p.numel() for p in models[k][0].parameters()), float(statistics.median(t)), models[k][1],
                     spread_ms=float(statistics.stdev(t)) if len(t) > 1 else 0.0, load_avg=load, passes=len(t))
            for k, t in times.items()}


def measure_speed(model: torch.nn.Module, size: tuple[int, int], runs: int = 5) -> Speed:
    """:func:`measure_speeds` of one model."""
    return measure_speeds({0: (model, size)}, runs)[0]


def measure_run_speeds(runs: list[Run], latency_runs: int) -> None:
    """The speed of every run's model and of its teacher, all timed together (:func:`measure_speeds`); what cannot
    be loaded is recorded as ``speed_error`` / ``teacher_error``."""
    models: dict[Path, tuple[torch.nn.Module, tuple[int, int]]] = {}
    metas: dict[Path, dict] = {}
    errors: dict[Path, str] = {}

    def load(path: Path, size) -> Path:
        key = path.resolve()
        if key not in models and key not in errors:
            try:
                model, metas[key] = load_detector(path)
                models[key] = (model, size or (metas[key]["min_size"], metas[key]["max_size"]))
            except Exception as e:  # noqa: BLE001 -- reported in the page
                errors[key] = f"{type(e).__name__}: {e}"
        return key

    wanted = []
    for run in runs:
        size = (run.cfg.data.min_size, run.cfg.data.max_size) if run.cfg is not None else None
        model_key = load(run.model_path, size) if run.model_path is not None else None
        teacher_key = None
        if run.cfg is not None and run.cfg.distill is not None:
            tpath = run.cfg.distill.teacher.checkpoint
            if tpath and Path(tpath).exists():
                teacher_key = load(Path(tpath), size)
            else:
                run.teacher_error = f"teacher checkpoint not found: {tpath}"
        wanted.append((run, model_key, teacher_key))
    speeds = measure_speeds(models, latency_runs) if models else {}
    for run, model_key, teacher_key in wanted:
        if model_key is None:
            run.speed_error = "no model file"
        elif model_key in errors:
            run.speed_error = errors[model_key]
        else:
            run.speed, run.meta = speeds[model_key], run.meta or metas[model_key]
        if teacher_key is not None:
            if teacher_key in errors:
                run.teacher_error = errors[teacher_key]
            else:
                tmeta = metas[teacher_key]
                run.teacher_speed = speeds[teacher_key]
                run.teacher_label = f"teacher {tmeta['arch']}/{tmeta['backbone']} ({teacher_key.parent.name})"


def compute_run(run: Run, max_eval_images: int | None, num_samples: int) -> None:
    """The run's re-evaluation (its speed: :func:`measure_run_speeds`, over all runs at once)."""
    try:
        run.evaluation = evaluate_run(run, max_images=max_eval_images, num_samples=num_samples)
    except Exception as e:  # noqa: BLE001 -- reported in the page
        run.eval_error = f"{type(e).__name__}: {e}"
        log.warning("report: %s: re-evaluation not available: %s", run.name, run.eval_error)


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


def training_series(run: Run) -> dict[str, list[tuple[float, float]]]:
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
                                         (VAL_PREFIX + PRIMARY_METRIC, "epoch", "val COCO AP (epoch)"),
                                         (VAL_PREFIX + KITTI_METRIC, "epoch", "val KITTI moderate mAP (epoch)")):
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
                for key, label in ((PRIMARY_METRIC, "val COCO AP (epoch)"),
                                   (KITTI_METRIC, "val KITTI moderate mAP (epoch)")):
                    if m.get(key) is not None and "epoch" in m and not math.isnan(float(m[key])):
                        series.setdefault(label, []).append((float(m["epoch"]), float(m[key])))
    return series


def loss_terms(run: Run) -> dict[str, list[tuple[float, float]]]:
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
