"""aidkd predict on a folder of PNGs and on a video file (KITTI txt per image / frame, drawn PNGs / mp4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aidkd.engine.config import config_from_dict
from aidkd.engine.predict import is_video_source, predict_command
from aidkd.engine.video import count_frames, iter_video_frames, video_fps, write_video
from aidkd.eval.kitti_io import read_kitti_predictions
from aidkd.models import build_detector, model_meta, save_model_file
from tests.conftest import confident_retinanet_file

CLASSES = ["Car", "Pedestrian", "Cyclist"]
H, W = 64, 160


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return confident_retinanet_file(tmp_path_factory.mktemp("model") / "model.pt", CLASSES, H, W)


def _cfg():
    return config_from_dict({"data": {"format": "synth", "min_size": H, "max_size": W}})


def _scenes(n: int, h: int = H, w: int = W) -> list[np.ndarray]:
    from aidkd.data.synth import render_scene

    return [render_scene(i, width=w, height=h)[0] for i in range(n)]


def test_video_roundtrip(tmp_path):
    frames = _scenes(5, 63, 101)  # odd sizes are padded to even for yuv420p
    path = write_video(tmp_path / "v.mp4", frames, fps=8)
    assert path.exists() and not list(tmp_path.glob("*.partial*"))
    assert count_frames(path) == 5 and video_fps(path) == pytest.approx(8)
    got = list(iter_video_frames(path))
    assert [n for n, _ in got] == [f"v_{i:06d}" for i in range(5)]
    img = np.asarray(got[2][1], dtype=np.float32)
    assert img.shape == (64, 102, 3)
    assert np.abs(img[:63, :101] - frames[2]).mean() < 12  # lossy, but the same picture


def test_video_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="bad.mp4"):
        list(iter_video_frames(bad))
    with pytest.raises(FileNotFoundError):
        list(iter_video_frames(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="frame 1 is"):
        write_video(tmp_path / "x.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    assert not (tmp_path / "x.mp4").exists()
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "y.mp4", [np.zeros((8, 8, 3), np.float32)])


def test_predict_on_video(tmp_path, model_file):
    video = write_video(tmp_path / "drive.mp4", _scenes(6), fps=5)
    assert is_video_source(video) and not is_video_source(tmp_path) and not is_video_source(None)
    out = tmp_path / "out"
    n = predict_command(_cfg(), model_file, out, source=str(video), draw=True, score_thresh=0.3)
    assert n == 6
    txts = sorted(out.glob("*.txt"))
    assert [p.stem for p in txts] == [f"drive_{i:06d}" for i in range(6)]
    dets = [read_kitti_predictions(p) for p in txts]
    assert sum(len(d) for d in dets) > 0
    assert all(o.cls in CLASSES and o.score >= 0.3 for d in dets for o in d)
    boxed = out / "drive_boxes.mp4"
    assert count_frames(boxed) == 6 and video_fps(boxed) == pytest.approx(5)
    assert not (out / "drawn").exists()


def test_predict_on_image_folder(tmp_path, model_file):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_scenes(3)):
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert predict_command(_cfg(), model_file, out, source=str(folder), draw=True) == 3
    assert sorted(p.name for p in out.glob("*.txt")) == ["img0.txt", "img1.txt", "img2.txt"]
    drawn = sorted((out / "drawn").glob("*.png"))
    assert [p.name for p in drawn] == ["img0.png", "img1.png", "img2.png"]
    with Image.open(drawn[0]) as im:
        assert im.size == (W, H)
    # a single image file, without drawing
    out2 = tmp_path / "out2"
    assert predict_command(_cfg(), model_file, out2, source=str(folder / "img1.png")) == 1
    assert [p.name for p in out2.iterdir() if p.name != ".aidkd-output"] == ["img1.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict_command(_cfg(), model_file, out2, source=str(tmp_path / "empty"))


def _folder(tmp_path, n=3):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_scenes(n)):
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_default_score_threshold_is_the_eval_threshold(tmp_path, model_file, capsys):
    from aidkd.cli.main import main

    folder = _folder(tmp_path)
    out = tmp_path / "out"
    predict_command(_cfg(), model_file, out, source=str(folder))
    scores = [d.score for p in sorted(out.glob("*.txt")) for d in read_kitti_predictions(p)]
    assert scores and min(scores) >= 0.05 and min(scores) < 0.3  # the old default (0.3) wrote none of these
    cfg = config_from_dict({"data": {"format": "synth", "min_size": H, "max_size": W}, "eval": {"score_thresh": 0.5}})
    predict_command(cfg, model_file, tmp_path / "out2", source=str(folder))
    scores2 = [d.score for p in sorted((tmp_path / "out2").glob("*.txt")) for d in read_kitti_predictions(p)]
    assert scores2 and min(scores2) >= 0.5 and len(scores2) < len(scores)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "eval.score_thresh, 0.05" in text and "--format {kitti,coco,yolo}" in text


@pytest.fixture(scope="module")
def coco_setup(tmp_path_factory):
    """A 3-image COCO json whose categories have a space in a name, and a detector for its two classes."""
    import json

    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, anns = [], []
    for i, img in enumerate(_scenes(3)):
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png", "width": W, "height": H})
        anns.append({"id": 1 + i, "image_id": 100 + i, "category_id": 11, "bbox": [10, 10, 20, 30], "area": 600,
                     "iscrowd": 0})
    cats = [{"id": 3, "name": "car"}, {"id": 11, "name": "fire hydrant"}]
    ann = root / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    torch.manual_seed(0)
    classes = ["car", "fire hydrant"]
    model = build_detector("retinanet", "resnet18", 3, min_size=H, max_size=W, fpn_channels=16)
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "cls_logits" in name:
                p.fill_(-2.0)
    path = save_model_file(root / "model.pt", model, model_meta(model, classes, H, W, {}))
    cfg = config_from_dict({"data": {"format": "coco", "train_ann": str(ann), "train_images": str(root / "images"),
                                     "val_ann": str(ann), "val_images": str(root / "images"),
                                     "min_size": H, "max_size": W}})
    return cfg, path, ann


def test_predict_on_coco_writes_a_coco_results_json(tmp_path, coco_setup):
    import json

    from pycocotools.coco import COCO

    cfg, model_path, ann = coco_setup
    out = tmp_path / "out"
    assert predict_command(cfg, model_path, out) == 3  # the default for COCO data: --format coco
    assert sorted(p.name for p in out.iterdir()) == [".aidkd-output", "predictions.json"]
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["image_id"] for r in results} <= {100, 101, 102}
    assert {r["category_id"] for r in results} == {3, 11} and min(r["score"] for r in results) >= 0.05
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0 for r in results)
    gt = COCO(str(ann))
    assert len(gt.loadRes(str(out / "predictions.json")).getAnnIds()) == len(results)
    # KITTI files are still possible; the space is escaped and read back
    predict_command(cfg, model_path, tmp_path / "k", fmt="kitti")
    names = {d.cls for p in (tmp_path / "k").glob("*.txt") for d in read_kitti_predictions(p)}
    assert names == {"car", "fire hydrant"}
    assert "fire%20hydrant" in (tmp_path / "k" / "000.txt").read_text() + (tmp_path / "k" / "001.txt").read_text()


def test_images_that_share_a_name_are_refused_before_anything_is_written(tmp_path, model_file):
    """a.png and a.jpg would both write a.txt (and drawn/a.png): one prediction would silently replace the other."""
    src = tmp_path / "images"
    src.mkdir()
    frame = _scenes(1)[0]
    for name in ("a.png", "a.jpg", "b.png"):
        Image.fromarray(frame).save(src / name)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"a\.jpg.*a\.png|a\.png.*a\.jpg"):
        predict_command(_cfg(), model_file, out, source=str(src))
    assert not out.exists() or not any(out.iterdir())
    # COCO results name images by index: no file per image, nothing to collide
    assert predict_command(_cfg(), model_file, tmp_path / "coco", source=str(src), fmt="coco") == 3
