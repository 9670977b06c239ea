"""The report's charts as PNG bytes (matplotlib, no display): KITTI precision-recall curves, training curves, loss
terms, AID weights."""
from __future__ import annotations

import io
import math

import numpy as np

from aidkd.eval.kitti_ap import DIFFICULTIES
from aidkd.report.collect import Run


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return buf.getvalue()


def pil_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _pr_panels(classes: list[str]):
    """A figure with one precision-recall panel a class, and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(classes), 3.6))
    return fig, fig.subplots(1, len(classes), squeeze=False)[0]


def _finish_pr_panel(ax, title: str) -> bool:
    """Title, limits, labels, grid and legend of one panel; False when no curve was drawn in it."""
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        return False
    ax.legend(fontsize=8, loc="lower left")
    return True


def pr_figure(kitti, classes: list[str], title: str) -> bytes:
    fig, axes = _pr_panels(classes)
    for ax, cls in zip(axes, classes):
        for diff, style in zip(DIFFICULTIES, ("-", "--", ":")):
            curve = kitti.curves.get(cls, {}).get(diff)
            ap = kitti.ap.get(cls, {}).get(diff, float("nan"))
            if curve is None or math.isnan(ap):
                continue
            rec, prec = curve
            ax.plot(rec, prec, style, label=f"{diff} AP {ap:.1f}")
        if not _finish_pr_panel(ax, cls):
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return figure_png(fig)


def pr_compare_figure(runs: list[Run], classes: list[str], difficulty: str = "moderate") -> bytes:
    fig, axes = _pr_panels(classes)
    for ax, cls in zip(axes, classes):
        for run in runs:
            k = run.evaluation.kitti if run.evaluation else None
            if k is None or cls not in k.curves or math.isnan(k.ap[cls][difficulty]):
                continue
            rec, prec = k.curves[cls][difficulty]
            ax.plot(rec, prec, label=f"{run.name} AP {k.ap[cls][difficulty]:.1f}")
        _finish_pr_panel(ax, f"{cls} ({difficulty})")
    return figure_png(fig)


def training_figure(series: dict[str, list[tuple[float, float]]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(series), 3.2))
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (label, pts) in zip(axes, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return figure_png(fig)


def _summed(terms: dict[str, list[tuple[float, float]]], keys: list[str]) -> list[tuple[float, float]]:
    by_step: dict[float, float] = {}
    for k in keys:
        for x, y in terms[k]:
            by_step[x] = by_step.get(x, 0.0) + y
    return sorted(by_step.items())


def loss_figure(terms: dict[str, list[tuple[float, float]]]) -> bytes:
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
    return figure_png(fig)


def aid_figure(weights: list[float], classes: list[str]) -> bytes:
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
    return figure_png(fig)
