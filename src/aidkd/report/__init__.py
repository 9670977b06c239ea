"""``aidkd report``: one self-contained HTML page for a run folder or a folder of runs (a demo or a benchmark).

The page has no external resource: images are inlined as base64 PNG, styles are in the page, there is no script.
For every run (a folder with ``config.yaml``, ``model_best.pt``, ``best_metrics.json``, ... as ``aidkd train`` /
``aidkd distill`` write them) it shows

* the run's setup and its metrics (``best_metrics.json``) next to a fresh re-evaluation of ``model_best.pt`` on the
  val split of the run's ``config.yaml`` (at most ``max_eval_images`` images);
* per-class AP (COCO AP, VOC AP50, KITTI AP|R40 easy/moderate/hard) and the KITTI precision-recall curves of the
  re-evaluation (:class:`aidkd.eval.KittiAPResult` curves);
* training curves (``csv/metrics.csv`` or ``metrics_history.jsonl``);
* speed: parameters and CPU latency of one image at the configured size, for the model and its teacher (all models
  of the page timed interleaved in one process; median, spread and the machine's load average);
* detection vs distillation loss terms over training (the ``train/*`` columns of ``csv/metrics.csv``);
* sample predictions on val images at the evaluation threshold ``eval.score_thresh`` (predictions coloured per
  class, ground truth in white);
* the AID weights: a histogram and per-class weights on one colour scale, from the weights training logged
  (``aid_weights.jsonl``), and the AID instance-weight and teacher attention images logged to TensorBoard
  (``distill/instance_weights``, ``distill/teacher_spatial_attention``).

A folder holding several runs (e.g. ``teacher``, ``student``, ``kd``, ``kd_aid`` of ``aidkd demo``) gets a
comparison table (with each run's difference to the ``student`` baseline), a speed table, overlaid PR curves and
the instance analysis of each run that has one (``RUN/analysis``, ``aidkd analyze``) first. A value is marked best only where it beats the runner-up by more than twice their combined noise
(:func:`ap_noise`; latency: the spread of the timed passes). Anything that cannot be produced (no model file, no
data, no TensorBoard images, ...) is shown as "not available" with the reason, never raised.

The package: ``collect.py`` gathers what a run folder holds (runs, metrics, re-evaluation, speed, training series,
AID weights, TensorBoard images); ``figures.py`` draws the charts; ``html.py`` writes the page; ``build_report``
(here) runs the three.
"""
from __future__ import annotations

import time
from pathlib import Path

from aidkd.engine.run_folder import record_run_file, recorded_entries
from aidkd.report.collect import (
    DISTILL_IMAGE_TAGS,
    EvalResult,
    Run,
    Speed,
    ap_noise,
    best_row,
    compute_run,
    discover_runs,
    evaluate_run,
    load_run,
    measure_run_speeds,
    measure_speed,
    measure_speeds,
    read_aid_weights,
    read_json,
    tensorboard_images,
)
from aidkd.report.html import SECTION_IDS, page

__all__ = ["DISTILL_IMAGE_TAGS", "SECTION_IDS", "EvalResult", "Run", "Speed", "ap_noise", "best_row",
           "build_report", "discover_runs", "evaluate_run", "measure_speed", "measure_speeds", "read_aid_weights",
           "tensorboard_images"]


def build_report(run_dir: str | Path, out: str | Path | None = None, *, max_eval_images: int | None = 500,
                 num_samples: int = 4, latency_runs: int = 10) -> Path:
    """Write the HTML report of ``run_dir`` (a run, or a folder of runs) to ``out`` (default
    ``<run_dir>/report.html``) and return its path. See the module doc for the contents."""
    started = time.perf_counter()
    root = Path(run_dir)
    paths = discover_runs(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no run folder (config.yaml / model_best.pt / best_metrics.json) in it "
                                "or in its sub-folders")
    results = read_json(root / "results.json") or {}
    seconds = {k: float(v["seconds"]) for k, v in results.items() if isinstance(v, dict) and "seconds" in v}
    runs = [load_run(p, root, seconds) for p in paths]
    for run in runs:
        compute_run(run, max_eval_images, num_samples)
    measure_run_speeds(runs, latency_runs)
    text = page(root, runs, started)
    out_path = Path(out) if out is not None else root / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out_path)
    if out is None and recorded_entries(root) is not None:  # a run folder: --overwrite may remove its report
        record_run_file(root, out_path.name)
    return out_path
