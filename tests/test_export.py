"""aidkd.export: ONNX export of tiny detectors, onnxruntime parity (two input sizes), failure reporting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aidkd.export import (
    DEFAULT_BOX_TOL,
    DEFAULT_SCORE_TOL,
    ParityError,
    export_onnx,
    match_detections,
    sample_images,
    sample_sizes,
)
from aidkd.models import build_detector, model_meta, save_model_file

CLASSES = ["Car", "Pedestrian", "Cyclist"]
MIN, MAX = 64, 160  # FCOS's GroupNorm needs more than a 1x1 P7 map: keep the padded input above 128 px wide


def _spread_scores(model, arch: str) -> None:
    """Random heads give ~equal scores; wider weights give distinct, well-separated detections to compare."""
    torch.manual_seed(0)
    with torch.no_grad():
        if arch == "fasterrcnn":
            for p in model.roi_heads.parameters():
                p.normal_(0, 0.01)
            model.roi_heads.box_predictor.cls_score.bias.fill_(-1.0)
            return
        for name, p in model.head.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "cls_logits" in name:
                p.fill_(-2.0)


def _model_file(tmp_path, arch: str):
    torch.manual_seed(0)
    model = build_detector(arch, "resnet18", len(CLASSES) + 1, min_size=MIN, max_size=MAX, fpn_channels=16)
    _spread_scores(model, arch)
    path = save_model_file(tmp_path / f"{arch}.pt", model, model_meta(model, CLASSES, MIN, MAX, {}))
    return path, model.eval()


def test_sample_images_two_sizes():
    imgs = sample_images(3, MIN, MAX)
    sizes = [tuple(x.shape[2:]) for x in imgs]
    assert sizes == [(64, 160), (96, 200), (64, 160)] == [sample_sizes(MIN, MAX)[i % 2] for i in range(3)]
    assert all(x.shape[:2] == (1, 3) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 for x in imgs)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_export_parity_and_report(tmp_path, arch):
    import onnx
    import onnxruntime as ort

    ckpt, model = _model_file(tmp_path, arch)
    out = tmp_path / "sub" / f"{arch}.onnx"
    report = export_onnx(ckpt, out, num_samples=2, latency_runs=2)
    assert out.exists() and not (tmp_path / "sub" / f"{arch}.onnx.failed").exists()
    assert "parity OK" in report and "FAILED" not in report
    assert f"|box diff| <= {DEFAULT_BOX_TOL:g} px" in report and f"|score diff| <= {DEFAULT_SCORE_TOL:g}" in report
    assert "latency" in report and "onnxruntime" in report and "96x200" in report and "64x160" in report
    assert "no detection above" not in report  # the spread heads give real detections to compare

    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["aidkd_meta"])
    assert meta["classes"] == CLASSES and meta["arch"] == arch

    # a third size the export never saw (upscaled in the graph), compared directly
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = sample_images(3, 48, 120, seed=5)[2]
    boxes, scores, labels = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model([x[0]])[0]
    assert len(scores) > 0 and boxes.shape == (len(scores), 4) and labels.dtype == np.int64
    res = match_detections((ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()),
                           (boxes, scores, labels), DEFAULT_BOX_TOL, DEFAULT_SCORE_TOL, 0.05, 300)
    assert res.ok, res.problems
    assert res.matched >= 0.9 * len(scores)
    assert boxes[:, 2].max() <= 120 + 1e-3 and boxes[:, 3].max() <= 48 + 1e-3  # in input pixels


@pytest.mark.parametrize("arch", ["gfl", "fasterrcnn"])
def test_export_other_archs(tmp_path, arch):
    ckpt, _ = _model_file(tmp_path, arch)
    report = export_onnx(ckpt, tmp_path / f"{arch}.onnx", num_samples=2, latency_runs=1)
    assert "parity OK" in report


def test_parity_failure_is_loud(tmp_path, monkeypatch):
    import aidkd.export as ex

    ckpt, _ = _model_file(tmp_path, "retinanet")
    real = ex._ort_session

    class Shifted:  # an ONNX graph whose boxes are off by half a pixel
        def __init__(self, path):
            self.sess = real(path)

        def run(self, names, feed):
            boxes, scores, labels = self.sess.run(names, feed)
            return boxes + 0.5, scores, labels

    monkeypatch.setattr(ex, "_ort_session", Shifted)
    out = tmp_path / "m.onnx"
    with pytest.raises(ParityError, match=r"parity check FAILED") as info:
        export_onnx(ckpt, out, num_samples=1, latency_runs=1)
    msg = str(info.value)
    assert "sample 0 (64x160)" in msg and "no ONNX partner" in msg and "box diff 0.5" in msg
    assert not out.exists() and (tmp_path / "m.onnx.failed").exists()


def test_match_detections_rules():
    rb = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=np.float32)
    rs = np.array([0.9, 0.5, 0.0505], dtype=np.float32)
    rl = np.array([1, 2, 1])
    # same detections, other order, within tolerance
    perm = [2, 0, 1]
    got = (rb[perm] + 1e-3, rs[perm] + 1e-4, rl[perm])
    res = match_detections((rb, rs, rl), got, 1e-2, 1e-3)
    assert res.ok and res.matched == 3 and res.max_box_diff == pytest.approx(1e-3, rel=1e-2)
    # a detection on the score threshold may be missing on one side
    res = match_detections((rb, rs, rl), (rb[:2], rs[:2], rl[:2]), 1e-2, 1e-3, score_thresh=0.05)
    assert res.ok and res.tolerated == 1
    # ... a confident one may not
    res = match_detections((rb, rs, rl), (rb[1:], rs[1:], rl[1:]), 1e-2, 1e-3, score_thresh=0.05)
    assert not res.ok and "score 0.9000" in res.problems[0]
    # wrong label or a box off by more than the tolerance
    res = match_detections((rb, rs, rl), (rb, rs, np.array([1, 1, 1])), 1e-2, 1e-3)
    assert not res.ok
    res = match_detections((rb, rs, rl), (rb + 0.02, rs, rl), 1e-2, 1e-3)
    assert not res.ok and len(res.problems) == 6  # 3 PyTorch detections without partner, 3 ONNX extras
