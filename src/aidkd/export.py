"""``aidkd export``: a trained detector (the student alone) to ONNX, checked against PyTorch with onnxruntime.

The exported graph
------------------
* input ``images``: ``float32[1, 3, H, W]``, RGB in ``[0, 1]``; **batch 1**, ``H`` and ``W`` dynamic. The model's
  own ``GeneralizedRCNNTransform`` is part of the graph: it normalises (ImageNet mean/std), resizes keep-ratio to
  the model's ``min_size``/``max_size`` and pads to a multiple of 32, exactly as in PyTorch.
* outputs ``boxes`` ``float32[N, 4]`` (xyxy, in *input* pixels), ``scores`` ``float32[N]``, ``labels``
  ``int64[N]`` (``1..K``; ``classes[label - 1]``), ``N`` dynamic (after the model's score threshold and NMS).
* ONNX metadata (``metadata_props``): ``aidkd_meta`` (JSON: arch, backbone, classes, min_size, max_size, ...).

Batch is fixed at 1: torchvision detectors take a *list* of images, so a traced graph has the list length
baked in; run the session once per image.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which torchvision's detection
models support (their transform, anchors, box coding and NMS have ONNX-tracing code paths). It exports RetinaNet,
FCOS, Faster R-CNN and aidkd's GFL. (The dynamo exporter needs ``onnxscript`` and does not handle the
data-dependent post-processing of these models.)

Parity check
------------
The command renders ``num_samples`` generated driving scenes (``aidkd.data.synth.render_scene``), alternating
between two sizes (``min_size x max_size`` and a larger one of another aspect ratio, which the graph resizes), runs
both PyTorch and onnxruntime (CPU) on each and matches the detections one to one (same label, nearest box). It
passes when every detection has a partner with ``max |box diff| <= box_tol`` pixels and ``|score diff| <=
score_tol``. A detection without a partner is tolerated only when it sits on a cut-off where float rounding may
decide (its score within ``score_tol`` of the score threshold, or of the lowest score of a full
``detections_per_img`` list on the other side). On failure the file is renamed to ``<name>.onnx.failed`` and
:class:`ParityError` says which sample and detection differ.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger("aidkd.export")

DEFAULT_BOX_TOL = 1e-2  # pixels, max abs coordinate difference of matched boxes
DEFAULT_SCORE_TOL = 1e-3  # abs score difference of matched detections
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")

__all__ = ["DEFAULT_BOX_TOL", "DEFAULT_SCORE_TOL", "DetectorForExport", "ExportError", "ParityError",
           "SampleParity", "check_parity", "export_model", "export_onnx", "match_detections", "sample_images"]


class ExportError(ValueError):
    """The model could not be exported."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree beyond the tolerances."""


class DetectorForExport(nn.Module):
    """``(1, 3, H, W)`` float tensor in [0, 1] -> ``(boxes, scores, labels)`` of that image (input pixels)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([images[0]])[0]
        return out["boxes"], out["scores"], out["labels"]


# ---------------------------------------------------------------------------------------------- export
def _onnx_file(onnx_path: str | Path) -> Path:
    """``onnx_path`` as a file path; a folder there is refused before anything is written."""
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise ValueError(f"--onnx {onnx_path} is a folder: give the file to write, e.g. {onnx_path / 'model.onnx'}")
    return onnx_path


def export_model(model: nn.Module, onnx_path: str | Path, example: Tensor, opset: int = 17,
                 meta: dict | None = None) -> Path:
    """Trace ``model`` (a torchvision-style detector, eval mode, CPU) on ``example`` (1,3,H,W) and write ONNX."""
    import onnx

    onnx_path = _onnx_file(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = DetectorForExport(model.eval().cpu().float()).eval()
    dynamic_axes = {INPUT_NAME: {2: "height", 3: "width"}, **{name: {0: "num_detections"} for name in OUTPUT_NAMES}}
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from torchvision internals, exporter deprecation notes
        try:
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as e:  # the exporter raises many types
            tmp.unlink(missing_ok=True)
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    try:  # whatever fails from here on (a check, a full disk, a folder at onnx_path), no .tmp is left behind
        proto = onnx.load(str(tmp))
        if meta is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = "aidkd_meta", json.dumps(meta, sort_keys=True, default=str)
        proto.producer_name = "aidkd"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, onnx_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return onnx_path


# ---------------------------------------------------------------------------------------------- samples

def sample_sizes(min_size: int, max_size: int) -> list[tuple[int, int]]:
    """Two (H, W) input sizes: the model's own working size and a larger one of another aspect ratio."""
    h, w = int(min_size), int(max_size)
    return [(h, w), (round(h * 1.5), round(w * 1.25))]


def sample_images(num_samples: int, min_size: int, max_size: int, seed: int = 0) -> list[Tensor]:
    """Generated driving scenes as (1, 3, H, W) float tensors, alternating between :func:`sample_sizes`."""
    from aidkd.data.synth import render_scene

    sizes = sample_sizes(min_size, max_size)
    out = []
    for i in range(num_samples):
        h, w = sizes[i % len(sizes)]
        img, _, _ = render_scene(seed + i, width=w, height=h)
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)[None])
    return out


# ---------------------------------------------------------------------------------------------- parity

@dataclass
class SampleParity:
    size: tuple[int, int]
    n_torch: int
    n_onnx: int
    matched: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    tolerated: int = 0  # unmatched detections on a cut-off (see module doc)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self, index: int) -> str:
        h, w = self.size
        status = "OK" if self.ok else "FAILED"
        extra = f", {self.tolerated} on a cut-off" if self.tolerated else ""
        return (f"  sample {index} {h}x{w}: {self.n_torch} PyTorch / {self.n_onnx} ONNX detections, {self.matched} "
                f"matched{extra}; max |box diff| {self.max_box_diff:.2e} px, max |score diff| "
                f"{self.max_score_diff:.2e}  {status}")


def _postprocess_limits(model: nn.Module) -> tuple[float, int | None]:
    """(score threshold, detections per image) of a torchvision-style detector."""
    holder = getattr(model, "roi_heads", model)  # Faster R-CNN keeps them on its RoI heads
    thresh = getattr(holder, "score_thresh", getattr(model, "score_thresh", 0.0))
    dets = getattr(holder, "detections_per_img", getattr(model, "detections_per_img", None))
    return float(thresh or 0.0), (int(dets) if dets is not None else None)


def _set_score_thresh(model: nn.Module, value: float) -> None:
    holder = model.roi_heads if hasattr(model, "roi_heads") else model
    holder.score_thresh = value


def match_detections(ref: tuple[np.ndarray, np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray, np.ndarray],
                     box_tol: float, score_tol: float, score_thresh: float = 0.0,
                     max_detections: int | None = None, size: tuple[int, int] = (0, 0)) -> SampleParity:
    """Match ``got`` (boxes, scores, labels) to ``ref`` one to one; see the module doc for the rules."""
    rb, rs, rl = (np.asarray(a) for a in ref)
    gb, gs, gl = (np.asarray(a) for a in got)
    res = SampleParity(size=size, n_torch=len(rs), n_onnx=len(gs))
    used = np.zeros(len(gs), dtype=bool)
    unmatched_ref = []
    for i in np.argsort(-rs, kind="stable"):
        cand = np.flatnonzero((gl == rl[i]) & ~used)
        if cand.size:
            box_d = np.abs(gb[cand] - rb[i]).max(axis=1)
            score_d = np.abs(gs[cand] - rs[i])
            ok = (box_d <= box_tol) & (score_d <= score_tol)
            if ok.any():
                # the closest acceptable partner
                k = int(np.argmin(np.where(ok, box_d, np.inf)))
                j = int(cand[k])
                used[j] = True
                res.matched += 1
                res.max_box_diff = max(res.max_box_diff, float(box_d[k]))
                res.max_score_diff = max(res.max_score_diff, float(score_d[k]))
                continue
        unmatched_ref.append(int(i))

    def on_cutoff(score: float, other_scores: np.ndarray) -> bool:
        if score <= score_thresh + score_tol:
            return True
        full = max_detections is not None and len(other_scores) >= max_detections
        return bool(full and score <= float(other_scores.min()) + score_tol)

    def describe(tag: str, box, score, label) -> str:
        return f"{tag} detection label {int(label)} score {float(score):.4f} box {np.round(box, 2).tolist()}"

    for i in unmatched_ref:
        if on_cutoff(float(rs[i]), gs):
            res.tolerated += 1
            continue
        msg = describe("PyTorch", rb[i], rs[i], rl[i]) + " has no ONNX partner within tolerance"
        cand = np.flatnonzero(gl == rl[i])
        if cand.size:
            d = np.abs(gb[cand] - rb[i]).max(axis=1)
            j = int(cand[np.argmin(d)])
            msg += (f" (nearest: box diff {float(d.min()):.3g} px, score {float(gs[j]):.4f}, "
                    f"score diff {abs(float(gs[j]) - float(rs[i])):.3g})")
        res.problems.append(msg)
    for j in np.flatnonzero(~used):
        if on_cutoff(float(gs[j]), rs):
            res.tolerated += 1
            continue
        res.problems.append(describe("ONNX", gb[j], gs[j], gl[j]) + " has no PyTorch partner")
    return res


def _ort_session(onnx_path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()  # the same CPU threads as PyTorch: a fair latency comparison
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | Path, images: list[Tensor], box_tol: float = DEFAULT_BOX_TOL,
                 score_tol: float = DEFAULT_SCORE_TOL, session=None) -> list[SampleParity]:
    """Per sample, PyTorch vs onnxruntime detections matched (see :func:`match_detections`)."""
    sess = session or _ort_session(onnx_path)
    wrapper = DetectorForExport(model.eval()).eval()
    thresh, max_dets = _postprocess_limits(model)
    results = []
    for x in images:
        ref = tuple(t.numpy() for t in wrapper(x))
        got = tuple(sess.run(None, {INPUT_NAME: x.numpy()}))
        results.append(match_detections(ref, got, box_tol, score_tol, thresh, max_dets,
                                        size=(int(x.shape[2]), int(x.shape[3]))))
    return results


# ---------------------------------------------------------------------------------------------- latency

def median_latency_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


# ---------------------------------------------------------------------------------------------- command

def export_onnx(checkpoint: str | Path, onnx_path: str | Path, num_samples: int = 4, opset: int = 17,
                box_tol: float = DEFAULT_BOX_TOL, score_tol: float = DEFAULT_SCORE_TOL, latency_runs: int = 10,
                seed: int = 0) -> str:
    """Export the detector in ``checkpoint`` (an aidkd model file or Lightning checkpoint) to ``onnx_path``, check
    parity with onnxruntime on ``num_samples`` generated scenes at two sizes and time both (CPU, one image, median
    of ``latency_runs``). Returns a human-readable report; raises :class:`ParityError` when parity fails."""
    import onnxruntime as ort

    from aidkd.models import load_detector

    if num_samples < 1:
        raise ValueError(f"--samples must be >= 1, got {num_samples}")
    checkpoint, onnx_path = Path(checkpoint), _onnx_file(onnx_path)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model, meta = load_detector(checkpoint)
    model = model.eval().cpu().float()
    images = sample_images(num_samples, meta["min_size"], meta["max_size"], seed=seed)

    t0 = time.perf_counter()
    export_model(model, onnx_path, images[0], opset=opset, meta=meta)
    export_s = time.perf_counter() - t0

    sess = _ort_session(onnx_path)
    results = check_parity(model, onnx_path, images, box_tol=box_tol, score_tol=score_tol, session=sess)

    size_mb = onnx_path.stat().st_size / 2**20
    classes = ", ".join(meta["classes"])
    lines = [
        (f"exported {meta['arch']}/{meta['backbone']} ({len(meta['classes'])} classes: {classes}) from "
         f"{checkpoint} -> {onnx_path} ({size_mb:.1f} MiB, opset {opset}, TorchScript-based exporter, "
         f"{export_s:.1f} s)"),
        (f"input  {INPUT_NAME}: float32[1, 3, H, W], RGB in [0, 1], batch 1, any H and W (resized in the graph "
         f"to min_size={meta['min_size']} / max_size={meta['max_size']})"),
        ("output boxes: float32[N, 4] xyxy in input pixels; scores: float32[N]; labels: int64[N] "
         "(label k: the k-th class, 1-based)"),
        (f"parity, onnxruntime {ort.__version__} vs PyTorch {torch.__version__} on {num_samples} generated "
         f"scene(s) (tolerance after matching: |box diff| <= {box_tol:g} px, |score diff| <= {score_tol:g}):"),
    ]
    lines += [r.line(i) for i, r in enumerate(results)]
    if sum(r.n_torch + r.n_onnx for r in results) == 0:
        # An untrained or very weak model: nothing above its score threshold. Check the same graph with the
        # threshold at 0 (a throw-away export) so boxes and scores are compared all the same.
        import copy
        import tempfile

        low = copy.deepcopy(model)
        _set_score_thresh(low, 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            low_path = export_model(low, Path(tmp) / "low_thresh.onnx", images[0], opset=opset)
            low_results = check_parity(low, low_path, images, box_tol=box_tol, score_tol=score_tol)
        lines.append("  no detection above the model's score threshold on any sample; the same model exported "
                     "with score threshold 0 for this check:")
        lines += [r.line(i) for i, r in enumerate(low_results)]
        results = results + low_results

    failed = [(i, r) for i, r in enumerate(results) if not r.ok]
    if failed:
        bad = onnx_path.with_name(onnx_path.name + ".failed")
        os.replace(onnx_path, bad)
        details = []
        for i, r in failed:
            details += [f"sample {i} ({r.size[0]}x{r.size[1]}): {p}" for p in r.problems[:5]]
            if len(r.problems) > 5:
                details.append(f"sample {i}: ... and {len(r.problems) - 5} more")
        raise ParityError("ONNX parity check FAILED: onnxruntime and PyTorch disagree beyond the tolerance "
                          f"(|box| <= {box_tol:g} px, |score| <= {score_tol:g}); the exported graph was kept as "
                          f"{bad} for inspection.\n" + "\n".join(lines) + "\n" + "\n".join(details))

    x = images[0]
    with torch.no_grad():
        wrapper = DetectorForExport(model).eval()
        torch_ms = median_latency_ms(lambda: wrapper(x), latency_runs)
    feed = {INPUT_NAME: x.numpy()}
    onnx_ms = median_latency_ms(lambda: sess.run(None, feed), latency_runs)
    speedup = torch_ms / onnx_ms if onnx_ms > 0 else math.nan
    lines.append(f"latency (CPU, {torch.get_num_threads()} thread(s) each, one {x.shape[2]}x{x.shape[3]} image, "
                 f"median of {latency_runs} runs): PyTorch {torch_ms:.1f} ms, onnxruntime {onnx_ms:.1f} ms "
                 f"({speedup:.2f}x)")
    lines.append("parity OK")
    return "\n".join(lines)
