"""One preprocessing for eval, predict and export: `eval` and `eval-kitti(predict(...))` agree on a trained model.

`predict` (like the exported graph) runs one image at a time; `eval` runs `data.val_batch_size` images together.
A convolution over a batch may round differently from one over a single image (CPU kernels pick their blocking by
batch size), ~1e-6 here, and this short run's scores sit at RetinaNet's prior, hundreds of them equal to 1e-8: at
the per-image limit such a rounding decides which of the tied boxes are kept. So the exact promise is for
`val_batch_size: 1` (the same computation, on any machine); with larger batches the two agree up to that rounding.
"""
from __future__ import annotations

import pytest
import torch

from aidkd.data import read_split_file
from aidkd.engine import module as module_mod
from aidkd.engine.config import config_from_dict
from aidkd.engine.predict import predict_command
from aidkd.engine.run import evaluate, train
from aidkd.eval import DetectionEvaluator
from aidkd.eval.kitti_io import evaluate_kitti_dirs, read_kitti_predictions


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    from tests.conftest import TINY_DATA, TINY_MODEL

    out = tmp_path_factory.mktemp("agree")
    # 48 x 144 < the 64 x 192 images: the resize matters (at 1:1 any two resizes agree)
    cfg = config_from_dict({"name": "agree", "output_dir": str(out / "run"), "seed": 0,
                            "data": dict(TINY_DATA, root=str(synth_root), min_size=48, max_size=144,
                                         val_batch_size=1),
                            # a short run scores near RetinaNet's prior (0.01): low thresholds keep detections
                            "model": dict(TINY_MODEL, kwargs={"score_thresh": 0.001}),
                            "eval": {"score_thresh": 0.002},
                            "train": {"epochs": 2, "lr": 0.01, "warmup_steps": 2, "log_every": 1,
                                      "progress_bar": False}})
    torch.set_num_threads(1)
    train(cfg)
    return cfg, out / "run" / "model_last.pt", out


def test_eval_and_eval_kitti_of_predict_give_the_same_ap(trained, synth_root, monkeypatch):
    cfg, model_path, out = trained
    seen: dict[int, dict] = {}
    update = DetectionEvaluator.update

    def record(self, ids, preds):
        seen.update({int(i): p for i, p in zip(ids, preds)})
        return update(self, ids, preds)

    monkeypatch.setattr(module_mod.DetectionEvaluator, "update", record)
    metrics = evaluate(cfg, model_path)
    pred_dir = out / "pred"
    predict_command(cfg, model_path, pred_dir)  # default threshold: eval.score_thresh, as eval
    stems = read_split_file(synth_root / "ImageSets" / "val.txt")
    kitti = evaluate_kitti_dirs(synth_root / "training" / "label_2", pred_dir, stems=stems)
    for cls, by_diff in kitti.items():
        for diff, ap in by_diff.items():
            assert ap == pytest.approx(metrics[f"kitti/{cls}/{diff}"], abs=1e-6, nan_ok=True), (cls, diff)
    # the same detections, image by image (boxes in original pixels; files keep 4 decimals)
    assert sorted(seen) == sorted(int(s) for s in stems)
    total = 0
    for stem in stems:
        dets = read_kitti_predictions(pred_dir / f"{stem}.txt")
        ev = seen[int(stem)]
        assert len(dets) == len(ev["scores"]), stem
        got = torch.tensor([(*d.box, d.score) for d in dets], dtype=torch.float64).reshape(-1, 5)
        want = torch.cat([ev["boxes"].double(), ev["scores"].double()[:, None]], 1)
        # equal scores may come in either order: every row must have a twin in the other set
        dist = torch.cdist(got, want, p=float("inf"))
        assert dist.min(1).values.max() < 1e-3 and dist.min(0).values.max() < 1e-3, stem
        total += len(dets)
    assert total > 0 and metrics["coco/AP"] > 0

