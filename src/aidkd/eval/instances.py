"""Per-instance analysis of a teacher (``aidkd analyze``): will AID's weights do anything on this data?

For every ground-truth instance of a split it records the teacher's own loss D^T (``aidkd.models.ops.teacher_losses``,
the number AID turns into a weight) and, where the family provides the split, its classification and box parts; the
weight ``w = exp(-alpha * D^T)`` at the configured alpha and at :data:`ALPHAS`; and whether the teacher *detects* the
instance: ``best_iou`` is the largest IoU with a teacher detection of the instance's class, ``det_score`` the highest
score among those detections whose IoU exceeds the KITTI threshold of the class (0.7 Car, 0.5 Pedestrian / Cyclist,
0.5 for other classes; strictly above, as the devkit), and ``found`` means ``det_score >= score_thresh``. KITTI
height / occlusion / truncation / difficulty come from the label (original image pixels); for generated data the
``synth_meta.json`` flags (``hard``: its kinds, ``mislabel``: ``class`` / ``box``) are added.

The summary says how much AID's weights could act: the mean weight of found and of missed instances and their ratio
(the contrast AID puts between them), the ROC AUC of ``w`` for separating found from missed (how well the teacher's
loss *ranks* them; the same at every alpha, as ``w`` is monotone in D^T), and weight histograms per class and per
KITTI difficulty. ``write_analysis`` writes ``instances.csv``, ``summary.json`` and ``weights.png`` into one folder;
``aidkd report`` shows that folder when it is ``RUN_DIR/analysis``.

The pieces (:func:`kitti_difficulty`, :func:`match_detections`, :func:`roc_auc`, :func:`summarize`) are plain
functions of numbers, tested on hand-built cases; :func:`collect_rows` runs the models over a dataset and
:func:`write_analysis` writes the files. Building the dataset and models from a run config is
``aidkd.engine.analysis.analyze`` (this module imports nothing from ``aidkd.engine``).
"""
from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ALPHAS = (0.1, 0.3, 1.0)
DEFAULT_SCORE_THRESH = 0.3
HIST_BINS = 10  # weight histogram: 10 bins over [0, 1]
DIFFICULTIES = ("easy", "moderate", "hard", "none")  # "none": outside every KITTI difficulty

COLUMNS = ["image_id", "stem", "label_line", "class", "x1", "y1", "x2", "y2", "height", "occluded", "truncated",
           "difficulty", "teacher_loss", "teacher_loss_cls", "teacher_loss_box", "weight",
           *[f"weight_a{a:g}" for a in ALPHAS], "best_iou", "det_score", "found", "hard", "mislabel"]
STUDENT_COLUMNS = ["student_loss", "student_best_iou", "student_det_score", "student_found"]


# ------------------------------------------------------------------------------------------------ pure pieces
def kitti_difficulty(height: float, occluded: int, truncated: float) -> str:
    """The easiest KITTI difficulty an instance takes part in (``easy`` / ``moderate`` / ``hard``), ``none``
    when it is in none of them (too low, too occluded or too truncated)."""
    from aidkd.eval.kitti_ap import MAX_OCCLUSION, MAX_TRUNCATION, MIN_HEIGHT

    for name, h, occ, trunc in zip(("easy", "moderate", "hard"), MIN_HEIGHT, MAX_OCCLUSION, MAX_TRUNCATION):
        if height >= h and occluded <= occ and truncated <= trunc:
            return name
    return "none"


def iou_threshold(cls: str) -> float:
    """KITTI's matching IoU of a class (``MIN_OVERLAP``), 0.5 for classes KITTI does not list."""
    from aidkd.eval.kitti_ap import MIN_OVERLAP

    return float(MIN_OVERLAP.get(cls.lower(), 0.5))


def match_detections(gt_boxes: Tensor, gt_labels: Tensor, thresholds: Sequence[float], det: dict,
                     score_thresh: float) -> tuple[list[float], list[float], list[bool]]:
    """Per ground-truth box: best IoU with a detection of its label, the highest score of such a detection with IoU
    strictly above the box's threshold (0 if none), and whether that score reaches ``score_thresh``."""
    from torchvision.ops import box_iou

    n = gt_boxes.shape[0]
    if n == 0:
        return [], [], []
    boxes, scores, labels = det["boxes"].float(), det["scores"].float(), det["labels"]
    if boxes.numel() == 0:
        return [0.0] * n, [0.0] * n, [False] * n
    iou = box_iou(gt_boxes.float(), boxes) * (gt_labels[:, None] == labels[None, :])  # other classes -> 0
    best = iou.max(dim=1).values
    thr = torch.as_tensor(list(thresholds), dtype=iou.dtype)
    above = iou > thr[:, None]
    score = torch.where(above, scores[None, :].expand_as(iou), torch.zeros_like(iou)).max(dim=1).values
    return best.tolist(), score.tolist(), [bool(s >= score_thresh and s > 0) for s in score.tolist()]


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest (the Mann-Whitney U statistic
    over ``n_pos * n_neg``, ties counted one half); NaN when either group is empty."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def weight_at(loss: float, alpha: float) -> float:
    """AID's instance weight ``exp(-alpha * D^T)`` (``aidkd.distill.aid.aid_weights`` for one number)."""
    return math.exp(-alpha * loss)


def _contrast(found: float, missed: float) -> float:
    return found / missed if missed > 0 else float("nan")


def summarize(rows: list[dict], alpha: float, alphas: Sequence[float] = ALPHAS) -> dict:
    """Summary of :func:`collect_rows`' rows (``teacher_loss``, ``found``, ``class``, ``difficulty``, optional
    ``hard`` / ``mislabel``): per alpha (the configured one and ``alphas``) the weights' range, the mean weight of
    found and missed instances, their ratio and the ROC AUC of ``w`` for found vs missed; weight histograms (at the
    configured alpha) per class and per difficulty; and for generated data the same for hard / mislabelled ones."""
    losses = [float(r["teacher_loss"]) for r in rows]
    found = [bool(r["found"]) for r in rows]
    out: dict = {"instances": len(rows), "found": sum(found), "missed": len(rows) - sum(found), "alpha": alpha,
                 "auc_found_vs_missed": roc_auc([-d for d in losses], found),
                 "mean_loss_found": _mean(d for d, f in zip(losses, found) if f),
                 "mean_loss_missed": _mean(d for d, f in zip(losses, found) if not f),
                 # the best score of a matching teacher detection: what --score-thresh would have to be to find one
                 "best_det_score": max((float(r.get("det_score") or 0.0) for r in rows), default=0.0),
                 "by_alpha": {}}
    for a in dict.fromkeys([alpha, *alphas]):  # configured alpha first, no duplicates
        w = [weight_at(d, a) for d in losses]
        mf = _mean(x for x, f in zip(w, found) if f)
        mm = _mean(x for x, f in zip(w, found) if not f)
        out["by_alpha"][f"{a:g}"] = {
            "min": min(w) if w else float("nan"), "max": max(w) if w else float("nan"), "mean": _mean(w),
            "mean_found": mf, "mean_missed": mm, "contrast": _contrast(mf, mm), "auc": roc_auc(w, found)}
    w = [weight_at(d, alpha) for d in losses]
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)

    def group(key: str, names) -> dict:
        res = {}
        for name in names:
            idx = [i for i, r in enumerate(rows) if r[key] == name]
            if not idx:
                continue
            ws = [w[i] for i in idx]
            res[name] = {"instances": len(idx), "found": sum(found[i] for i in idx), "mean_weight": _mean(ws),
                         "hist": np.histogram(np.clip(ws, 0, 1), bins=edges)[0].tolist()}
        return res

    out["hist_edges"] = edges.tolist()
    out["by_class"] = group("class", sorted({r["class"] for r in rows}))
    out["by_difficulty"] = group("difficulty", DIFFICULTIES)
    flags = {}
    for flag in ("hard", "mislabel"):
        if any(r.get(flag) not in (None, "") for r in rows):
            flagged = [bool(r.get(flag)) for r in rows]
            flags[flag] = {"instances": sum(flagged),
                           "mean_weight": _mean(x for x, f in zip(w, flagged) if f),
                           "mean_weight_rest": _mean(x for x, f in zip(w, flagged) if not f),
                           "found": sum(fd for fd, f in zip(found, flagged) if f),
                           # how well w ranks the unflagged (clean, easy) instances above the flagged ones
                           "auc_rest_vs_flagged": roc_auc(w, [not f for f in flagged])}
    if flags:
        out["synth_flags"] = flags
    if rows and "student_found" in rows[0]:
        sf = [bool(r["student_found"]) for r in rows]
        out["student"] = {"found": sum(sf), "found_teacher_missed": sum(s and not t for s, t in zip(sf, found)),
                          "missed_teacher_found": sum(t and not s for s, t in zip(sf, found))}
    return out


def format_summary(summary: dict) -> str:
    """The summary as plain text tables (what ``aidkd analyze`` prints)."""
    if summary["found"] == 0:  # found-vs-missed numbers are undefined: say why and what to do instead of NaNs
        lines = [nothing_found_text(summary), "", "alpha   w min   w max   mean w"]
        for a, s in summary["by_alpha"].items():
            mark = "  (configured)" if float(a) == summary["alpha"] else ""
            lines.append(f"{a:<7} {s['min']:6.3f}  {s['max']:6.3f}  {s['mean']:6.3f}{mark}")
    else:
        lines = [(f"{summary['instances']} instances, teacher finds {summary['found']}, misses {summary['missed']}; "
                  f"ROC AUC of w (found vs missed): {summary['auc_found_vs_missed']:.3f}"),
                 (f"mean teacher loss D^T: found {summary['mean_loss_found']:.3f}, "
                  f"missed {summary['mean_loss_missed']:.3f}"),
                 "", "alpha   w min   w max   mean found   mean missed   found/missed   AUC"]
        for a, s in summary["by_alpha"].items():
            mark = "  (configured)" if float(a) == summary["alpha"] else ""
            lines.append(f"{a:<7} {s['min']:6.3f}  {s['max']:6.3f}  {s['mean_found']:11.3f}  {s['mean_missed']:12.3f}"
                         f"  {s['contrast']:13.2f}  {s['auc']:.3f}{mark}")
    edges = summary["hist_edges"]
    head = " ".join(f"{edges[i]:.1f}+" for i in range(len(edges) - 1))
    for key, title in (("by_class", "class"), ("by_difficulty", "difficulty")):
        lines += ["", f"{title:<12} n    found  mean w   histogram of w (alpha {summary['alpha']:g}): {head}"]
        for name, g in summary[key].items():
            lines.append(f"{name:<12} {g['instances']:<4} {g['found']:<6} {g['mean_weight']:.3f}    "
                         + " ".join(f"{c:4d}" for c in g["hist"]))
    for flag, g in summary.get("synth_flags", {}).items():
        lines.append(f"{flag}: {g['instances']} instances (teacher finds {g['found']}), mean w {g['mean_weight']:.3f} "
                     f"vs {g['mean_weight_rest']:.3f} for the rest; AUC of w, rest vs {flag}: "
                     f"{g['auc_rest_vs_flagged']:.3f}")
    if "student" in summary:
        s = summary["student"]
        lines.append(f"student finds {s['found']} (teacher missed {s['found_teacher_missed']} of those; "
                     f"misses {s['missed_teacher_found']} the teacher finds)")
    return "\n".join(lines)


def weakening_advice(summary: dict) -> str:
    """What to expect from AID with this teacher, as measured where it could be tested (the controlled experiment of
    docs/results.md): AID lowers KD where the teacher's loss is high, and no form of it protected the student on the
    teacher's wrong instances more than KD weakened uniformly by the same mean weight. So: how much it weakens KD
    here, and the control to compare it with."""
    s = summary["by_alpha"][f"{summary['alpha']:g}"]
    where = ("" if summary["found"] == 0 or summary["missed"] == 0 else
             f" ({s['mean_found']:.2f} on the instances the teacher finds, {s['mean_missed']:.2f} on those it misses)")
    return (f"What to expect: at alpha {summary['alpha']:g} AID scales the distillation terms by {s['mean']:.2f} on "
            f"average{where}. In a controlled test with a teacher wrong on a known subset, AID acted as "
            "teacher-aware weakening: it did not protect the student on that subset more than the same distillation "
            "(feature or head terms) weakened uniformly by the same mean weight (docs/results.md, controlled "
            "experiment). Before crediting AID's weighting, "
            f"compare it with KD at distill.loss_scale x {s['mean']:.2f} (or distill.aid.granularity: batch).")


def nothing_found_text(summary: dict) -> str:
    """One line for an analysis in which the teacher finds no instance: why AUC and the found / missed means are
    missing, and what to do."""
    thresh = summary.get("score_thresh", DEFAULT_SCORE_THRESH)
    best = summary.get("best_det_score", 0.0)
    best_text = (f"its best-scoring matching detection scores {best:.3g}" if best > 0 else
                 "it has no detection overlapping an instance enough")
    return (f"{summary['instances']} instances: the teacher finds none of them at score >= {thresh:g} ({best_text}), "
            "so there is nothing to compare found and missed instances by (no AUC, no found / missed means). Train "
            "the teacher longer, or lower --score-thresh" + (f" (e.g. to {best * 0.9:.2g})" if best > 0 else "") + ".")


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    columns = COLUMNS + (STUDENT_COLUMNS if rows and "student_loss" in rows[0] else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def read_csv(path: str | Path) -> list[dict]:
    """Rows of an ``instances.csv`` with numbers and booleans parsed back."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if v in ("True", "False"):
                    r[k] = v == "True"
                elif k not in ("stem", "class", "difficulty", "hard", "mislabel") and v != "":
                    r[k] = float(v)
            rows.append(r)
    return rows


def plot_weights(rows: list[dict], summary: dict, path: str | Path) -> Path:
    """Histograms of w at the configured alpha per class and per difficulty, and found vs missed per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = summary["hist_edges"]
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in ((axes[0], "by_class", "class"), (axes[1], "by_difficulty", "KITTI difficulty")):
        groups = summary[key]
        width = 0.1 / max(1, len(groups))
        for k, (name, g) in enumerate(groups.items()):
            ax.bar([c - 0.05 + (k + 0.5) * width for c in centres], g["hist"], width=width, label=name)
        ax.set(title=f"w (alpha {summary['alpha']:g}) by {title}", xlabel="w", ylabel="instances", xlim=(0, 1))
        ax.legend(fontsize=7)
    ax = axes[2]
    losses = np.array([float(r["teacher_loss"]) for r in rows])
    found = np.array([bool(r["found"]) for r in rows])
    for k, a in enumerate(summary["by_alpha"]):
        w = np.exp(-float(a) * losses)
        for f, marker in ((True, "o"), (False, "x")):
            sel = w[found == f]
            ax.scatter(np.full(len(sel), k) + (0.12 if f else -0.12), sel, s=8, marker=marker,
                       color="tab:green" if f else "tab:red", label=("found" if f else "missed") if k == 0 else None)
    ax.set_xticks(range(len(summary["by_alpha"])), [f"alpha {a}" for a in summary["by_alpha"]])
    ax.set(title="w of found vs missed instances", ylabel="w", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ models
def read_synth_meta(root: Path) -> dict | None:
    """The ``frames`` of ``root/synth_meta.json`` (the generator's per-object flags), None without that file."""
    p = root / "synth_meta.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))["frames"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{p}: not a synth_meta.json ({e})") from None


def _kept_positives(ds, record, target, hw: tuple[int, int]) -> list[int]:
    """Indices into ``record.objects`` of the boxes in ``target["boxes"]``, in order (the dataset keeps positive
    objects whose resized, clipped box still has an area; repeated here because the target does not say which)."""
    from aidkd.data.transforms import clip_boxes, scale_boxes

    idx = [j for j, o in enumerate(record.objects) if ds.label_for(o.cls, o.iscrowd) > 0]
    if not idx:
        return []
    sx, sy = target["scale_xy"]
    h, w = hw
    b = clip_boxes(scale_boxes(torch.tensor([record.objects[j].box for j in idx], dtype=torch.float32), sx, sy),
                   h, w)
    keep = ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).tolist()
    kept = [j for j, k in zip(idx, keep) if k]
    if len(kept) != target["boxes"].shape[0]:
        raise RuntimeError(f"{record.source}: {len(kept)} positive objects but {target['boxes'].shape[0]} boxes "
                           "in the dataset's target")
    return kept


@torch.no_grad()
def _model_view(model, images: list[Tensor], targets: list[dict], score_thresh: float, thresholds: list[list[float]]
                ) -> tuple[list[Tensor], dict | None, list[tuple]]:
    """Per image: teacher losses, their cls/box parts (None if the family has no split) and detection matches."""
    from aidkd.models import ops

    model.eval()
    image_list, tt = ops.prepare_inputs(model, images, [dict(t) for t in targets])
    feats = ops.extract_features(model, image_list)
    outputs = None
    try:
        outputs = ops.head_outputs(model, image_list, feats)
    except NotImplementedError:
        pass
    tl = ops.teacher_losses(model, image_list, feats, tt, outputs=outputs)
    try:
        parts = ops.teacher_loss_parts(model, image_list, feats, tt, outputs=outputs)
    except NotImplementedError:
        parts = None
    dets = ops.predict(model, image_list, feats, outputs=outputs)
    matches = [match_detections(t["boxes"], t["labels"], thr, d, score_thresh)
               for t, d, thr in zip(tt, dets, thresholds)]
    return tl.per_instance, parts, matches


def collect_rows(dataset, classes: Sequence[str], teacher: torch.nn.Module, student: torch.nn.Module | None = None,
                 synth_meta: dict | None = None, batch_size: int = 8, score_thresh: float = DEFAULT_SCORE_THRESH,
                 alpha: float = 0.1) -> list[dict]:
    """One row (dict with :data:`COLUMNS`, plus :data:`STUDENT_COLUMNS` with a student) per ground-truth instance of
    ``dataset`` (a ``DetectionDataset`` built with ``train=False``), from the ``teacher`` model (and ``student``).
    ``synth_meta``: the ``frames`` of the data's ``synth_meta.json`` (:func:`read_synth_meta`), if it has one.
    ``aidkd.engine.analysis`` builds the dataset and models from a config."""
    from aidkd.data import collate_fn

    ds, meta, bs = dataset, synth_meta, batch_size
    rows: list[dict] = []
    for start in range(0, len(ds), bs):
        idx = list(range(start, min(start + bs, len(ds))))
        images, targets = collate_fn([ds[i] for i in idx])
        kept = [_kept_positives(ds, ds.records[i], t, tuple(img.shape[-2:]))
                for i, t, img in zip(idx, targets, images)]
        thresholds = [[iou_threshold(classes[int(lab) - 1]) for lab in t["labels"]] for t in targets]
        t_loss, t_parts, t_match = _model_view(teacher, images, targets, score_thresh, thresholds)
        s_loss, _, s_match = (_model_view(student, images, targets, score_thresh, thresholds) if student is not None
                              else (None, None, None))
        for b, i in enumerate(idx):
            r = ds.records[i]
            frame = (meta or {}).get(r.stem, {}).get("objects") if meta else None
            for k, j in enumerate(kept[b]):
                o = r.objects[j]
                d = float(t_loss[b][k])
                height = float(o.box[3] - o.box[1])
                row = {"image_id": r.image_id, "stem": r.stem, "label_line": o.line if o.line is not None else j + 1,
                       "class": o.cls, "x1": o.box[0], "y1": o.box[1], "x2": o.box[2], "y2": o.box[3],
                       "height": height, "occluded": o.occluded, "truncated": o.truncated,
                       "difficulty": kitti_difficulty(height, o.occluded, o.truncated),
                       "teacher_loss": d,
                       "teacher_loss_cls": float(t_parts["cls"][b][k]) if t_parts else "",
                       "teacher_loss_box": float(t_parts["box"][b][k]) if t_parts else "",
                       "weight": weight_at(d, alpha), **{f"weight_a{a:g}": weight_at(d, a) for a in ALPHAS},
                       "best_iou": t_match[b][0][k], "det_score": t_match[b][1][k], "found": t_match[b][2][k],
                       "hard": "", "mislabel": ""}
                if frame is not None and j < len(frame):
                    row["hard"] = ";".join(frame[j].get("hard") or [])
                    row["mislabel"] = frame[j].get("mislabel") or ""
                if s_loss is not None:
                    row.update({"student_loss": float(s_loss[b][k]), "student_best_iou": s_match[b][0][k],
                                "student_det_score": s_match[b][1][k], "student_found": s_match[b][2][k]})
                rows.append(row)
    return rows


#: what :func:`write_analysis` writes: a folder holding only these (or nothing) is an analysis folder
ANALYSIS_OUTPUTS = ("instances.csv", "summary.json", "weights.png")


def write_analysis(rows: list[dict], out_dir: str | Path, alpha: float, info: dict) -> dict:
    """Summarise ``rows`` (:func:`summarize`, plus ``info``: checkpoints, split, threshold, config name), write
    ``instances.csv``, ``summary.json`` and ``weights.png`` into ``out_dir`` and return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from aidkd.eval.evaluator import strict_json

    summary = summarize(rows, alpha)
    summary.update(info)
    write_csv(rows, out / "instances.csv")
    (out / "summary.json").write_text(strict_json(summary, indent=2) + "\n", encoding="utf-8")
    plot_weights(rows, summary, out / "weights.png")
    return summary


# ------------------------------------------------------------------------------------------------ report section
def analysis_html(folder: str | Path) -> str:
    """The report's section body for an ``aidkd analyze`` folder (its summary table and plot)."""
    folder = Path(folder)
    s = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(a)}</td><td>{v['min']:.3f}-{v['max']:.3f}</td><td>{v['mean_found']:.3f}</td>"
        f"<td>{v['mean_missed']:.3f}</td><td>{v['contrast']:.2f}</td><td>{v['auc']:.3f}</td></tr>"
        for a, v in s["by_alpha"].items())
    body = (f"<p>{s['instances']} ground-truth instances of the {e(str(s.get('split', 'val')))} split; the teacher "
            f"(<code>{e(str(s.get('teacher_checkpoint', '')))}</code>) finds {s['found']} and misses {s['missed']} "
            f"(same-class detection above the KITTI IoU with score &ge; {s.get('score_thresh', 0.3):g}). "
            f"ROC AUC of w for found vs missed: {s['auc_found_vs_missed']:.3f}. Configured alpha "
            f"{s['alpha']:g}.</p><table><thead><tr><th>alpha</th><th>w range</th><th>mean w found</th>"
            f"<th>mean w missed</th><th>found / missed</th><th>AUC</th></tr></thead><tbody>{rows}</tbody></table>")
    if s["found"] == 0:
        body = f"<p><strong>{e(nothing_found_text(s))}</strong></p>" + body
    png = folder / "weights.png"
    if png.exists():
        src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        body += f'<figure><img alt="AID weights" src="{src}"></figure>'
    return body
