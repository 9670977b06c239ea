"""The report page: self-contained HTML (inline PNGs and styles, no script) from the collected runs."""
from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aidkd.eval.evaluator import (
    HEADLINE_METRICS,
    KITTI_METRIC,
    PRIMARY_METRIC,
    VOC_METRIC,
    coco_class_key,
    coco_key,
    kitti_class_key,
    metric_classes,
    voc_class_key,
)
from aidkd.eval.kitti_ap import DIFFICULTIES
from aidkd.report.collect import (
    DISTILL_IMAGE_TAGS,
    Run,
    Speed,
    ap_noise,
    best_row,
    log,
    loss_terms,
    read_aid_weights,
    tensorboard_images,
    training_series,
)
from aidkd.report.figures import (
    aid_figure,
    loss_figure,
    pil_png,
    pr_compare_figure,
    pr_figure,
    training_figure,
)

# element ids of the page's sections (the per-run ones get a "-<run>" suffix)
SECTION_IDS = ("overview", "comparison", "metrics", "per-class", "pr-curves", "training", "losses", "speed",
               "samples", "aid-weights", "distill-images")
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
    keys = [k for k in HEADLINE_METRICS if k in stored or (ev and k in ev.metrics)]
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


def _per_class_html(run: Run) -> str:
    m = run.best_metrics
    classes = metric_classes(m)
    if not classes:
        return _na("no per-class metrics")
    has_kitti = any(k.startswith("kitti/") for k in m)
    head = ["class", "COCO AP", "VOC AP50"] + ([f"KITTI {d}" for d in DIFFICULTIES] if has_kitti else [])
    rows = []
    for c in classes:
        row = [_e(c), _fmt(m.get(coco_class_key(c))), _fmt(m.get(voc_class_key(c)))]
        if has_kitti:
            row += [_fmt(m.get(kitti_class_key(c, d))) for d in DIFFICULTIES]
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
    return _img(pr_figure(ev.kitti, classes, f"{run.name}: KITTI precision-recall (41 recall points)"),
                f"precision-recall curves of {run.name}")


def _training_html(run: Run) -> str:
    series = training_series(run)
    if not series:
        return _na("no csv/metrics.csv or metrics_history.jsonl")
    return _img(training_figure(series), f"training curves of {run.name}")


def _losses_html(run: Run) -> str:
    terms = loss_terms(run)
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
    return (_img(loss_figure(terms), f"loss terms of {run.name}") + note +
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
    return (sub + _img(aid_figure(weights, classes), f"AID weights of {run.name}") +
            _table(["class", "instances", "mean", "p10", "median", "p90"], rows))


def _speed_row(label: str, sp: Speed) -> list[str]:
    return [_e(label), f"{sp.params / 1e6:.2f}", f"{sp.latency_ms:.1f} ± {sp.spread_ms:.1f}",
            f"{sp.size[0]}x{sp.size[1]}"]


SPEED_HEAD = ["model", "params (M)", "CPU latency (ms, median ± std)", "input (HxW)"]


def _timing_note(speeds: list[Speed]) -> str:
    """How the latencies were measured, with the machine's load (a loaded CPU makes every number larger and
    noisier)."""
    passes = max((s.passes for s in speeds), default=0)
    load = max((s.load_avg for s in speeds if s.load_avg is not None), default=None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_text = f"1-min load average {load:.1f} on {cores} cores" if load is not None else "load average unknown"
    return (f"one image, {torch.get_num_threads()} CPU thread(s), {passes} passes a model after 2 warm-up passes, "
            f"every model of this page timed interleaved in one process; {load_text} while timing")


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
                  f'parameters, latency {run.speed.latency_ms / run.teacher_speed.latency_ms:.2f}x on the CPU</p>')
    body = _table(SPEED_HEAD, rows) if rows else ""
    speeds = [s for s in (run.speed, run.teacher_speed) if s is not None]
    return body + notes + f'<p class="sub">{_e(_timing_note(speeds))}</p>'


def _samples_html(run: Run) -> str:
    ev = run.evaluation
    if ev is None:
        return _na(f"needs a re-evaluation: {run.eval_error}")
    if not ev.samples:
        return _na("the val split is empty")
    return "".join(_img(pil_png(im), f"predictions of {run.name}", cap, min_width=480) for im, cap in ev.samples)


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
    vals = [m.get(kitti_class_key(c, d), float("nan")) for c in metric_classes(m)]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _comparison_html(runs: list[Run]) -> str:
    metric_cols = [("COCO AP", lambda m: m.get(PRIMARY_METRIC, float("nan"))),
                   ("AP50", lambda m: m.get(coco_key("AP50"), float("nan"))),
                   ("VOC mAP50", lambda m: m.get(VOC_METRIC, float("nan"))),
                   ("KITTI easy", lambda m: _mean_kitti(m, "easy")),
                   ("KITTI moderate", lambda m: m.get(KITTI_METRIC, _mean_kitti(m, "moderate"))),
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
            for get in (metric_cols[0][1], metric_cols[4][1]):
                d = float(get(m)) - float(get(base_m))
                row.append("—" if r is base else ("n/a" if math.isnan(d) else f"{d:+.{DIGITS}f}"))
        row.append(f"{r.seconds:.0f}" if r.seconds is not None else "n/a")
        rows.append(row)
    best = {c: (c != 3, values[c], noise[c]) for c in values}
    src = ("re-evaluated model_best.pt where possible, else best_metrics.json; metrics in percent; KITTI columns: "
           "mean AP|R40 over classes; CPU ms: median ± standard deviation of the timed passes. A value is marked "
           "best (green) only where it beats the runner-up by more than twice their combined noise: for AP the "
           "approximate standard error sqrt(AP (100 - AP) / N) of N val ground-truth boxes (re-evaluated runs "
           "only). CPU ms: " + _timing_note([r.speed for r in runs if r.speed is not None]))
    if base is not None:
        src += f"; Δ: difference to the {BASELINE} run (the baseline without distillation)"
    body = f'<p class="sub">{_e(src)}</p>' + _table(head, rows, best)
    with_curves = [r for r in runs if r.evaluation is not None and r.evaluation.kitti is not None]
    if with_curves:
        classes = list(with_curves[0].evaluation.kitti.ap)
        body += "<h3>KITTI moderate precision-recall, all runs</h3>" + _img(
            pr_compare_figure(with_curves, classes), "precision-recall curves of all runs")
    else:
        body += _na("overlaid PR curves: no run could be re-evaluated with KITTI metrics")
    return body


# ================================================================================================== the page

def _analysis_html(root: Path, runs: list[Run]) -> str | None:
    """The instance analyses (``aidkd analyze ... --out RUN_DIR/analysis``) of ``root`` and of each run, one
    sub-section per run on a page of several; None when there is none."""
    from aidkd.eval.instances import analysis_html

    folders = {root.resolve(): root.name, **{r.path.resolve(): r.name for r in runs}}
    found = [(name, path / "analysis") for path, name in folders.items()
             if (path / "analysis" / "summary.json").exists()]
    if not found:
        return None
    if len(found) == 1 and len(runs) == 1:
        return _guard("instance analysis", lambda: analysis_html(found[0][1]))
    return "".join(f"<h3>{_e(name)} <code>{_e(folder)}</code></h3>"
                   + _guard(f"instance analysis of {name}", lambda folder=folder: analysis_html(folder))
                   for name, folder in found)


def page(root: Path, runs: list[Run], started: float) -> str:
    """The whole page for the runs of ``root`` (``started``: ``time.perf_counter()`` when the report began; the
    header says how long making it took, this page included)."""
    from aidkd import __version__

    title = f"aidkd report: {root.resolve().name}"
    parts = []
    if len(runs) > 1:
        parts.append(_section("comparison", "Comparison", _guard("comparison", lambda: _comparison_html(runs)), 2))
    analysis = _analysis_html(root, runs)
    if analysis is not None:
        parts.append(_section("analysis", "Instance analysis (aidkd analyze): where AID's weights act", analysis, 2))
    parts += [_run_html(r) for r in runs]
    # written last: the charts and images above are most of the work
    overview = (f'<p class="sub">{len(runs)} run(s) from <code>{_e(root.resolve())}</code>; generated '
                f'{datetime.now().strftime("%Y-%m-%d %H:%M")} by aidkd {_e(__version__)} in '
                f'{time.perf_counter() - started:.0f} s</p>')
    if len(runs) > 1:
        overview += "<ul>" + "".join(f'<li><a href="#run-{_e(r.anchor)}">{_e(r.name)}</a></li>' for r in runs) + \
            "</ul>"
    parts.insert(0, f'<section id="overview"><h1>{_e(title)}</h1>{overview}</section>')
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) +
            "\n</body></html>\n")
    return page
