"""``aidkd predict``: KITTI-format prediction files (15 fields + score), a COCO results json or YOLO label files
(``labels/<name>.txt``, ``class cx cy w h conf``) and, with ``--draw``, drawn images.

Images go to the model at their original size; its own transform resizes them -- the same path as ``aidkd eval``
and the exported ONNX graph, so ``eval``'s metrics are those of what ``predict`` and ``export`` ship."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from aidkd.engine.config import RunConfig
from aidkd.engine.run_folder import claim_output_folder
from aidkd.eval import strict_json
from aidkd.models import load_detector

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_detections(image: Image.Image, det: dict, classes: list[str]) -> Image.Image:
    """A copy of ``image`` with each detection's box, class name and score drawn on it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        color = PALETTE[(label - 1) % len(PALETTE)]
        draw.rectangle(box, outline=color, width=2)
        name = classes[label - 1] if 0 < label <= len(classes) else str(label)
        draw.text((box[0] + 2, max(0, box[1] - 10)), f"{name} {score:.2f}", fill=color)
    return out


@torch.no_grad()
def detect(model: torch.nn.Module, image: Image.Image, score_thresh: float) -> dict:
    """Detections in the original image's pixels (the model resizes internally with its own transform, as in
    evaluation), scores ``>= score_thresh``, labels ``>= 1`` (as in evaluation)."""
    from aidkd.data.images import image_to_tensor

    model.eval()
    device = next(model.parameters()).device
    pred = model([image_to_tensor(image.convert("RGB")).to(device)])[0]
    keep = (pred["scores"] >= score_thresh) & (pred["labels"] >= 1)  # label 0 is background, never a class
    return {k: v[keep].cpu() for k, v in pred.items()}


def coco_results(image_id: int, det: dict, category_ids: list[int]) -> list[dict]:
    """COCO results entries (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``) of one image;
    ``category_ids[label - 1]`` is a label's category id."""
    out = []
    for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        out.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(float(score), 6)})
    return out


def yolo_lines(det: dict, class_ids: list[int], image_size: tuple[int, int]) -> list[str]:
    """YOLO label lines (``class cx cy w h conf``, normalised to ``image_size`` (width, height)) of one image;
    ``class_ids[label - 1]`` is a label's class index."""
    from aidkd.data import format_yolo_line

    return [format_yolo_line(class_ids[label - 1], box, image_size, score)
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())]


def default_output_format(cfg: RunConfig) -> str:
    """``coco`` for COCO data, ``yolo`` for YOLO data, ``kitti`` otherwise."""
    return cfg.data.format if cfg.data.format in ("coco", "yolo") else "kitti"


def _category_ids(cfg: RunConfig, classes: list[str]) -> list[int]:
    """The COCO category id of each class (from the configured json), or 1..K without one."""
    ann = (cfg.data.val_ann or cfg.data.train_ann) if cfg.data.format == "coco" else None
    if not ann:
        return list(range(1, len(classes) + 1))
    from aidkd.data import coco_category_ids

    ids = coco_category_ids(ann)
    missing = [c for c in classes if c not in ids]
    if missing:
        raise ValueError(f"{ann}: the model's classes {missing} are not categories of this json")
    return [ids[c] for c in classes]


def _yolo_class_ids(cfg: RunConfig, classes: list[str]) -> list[int]:
    """The index of each class in the configured data.yaml's names (YOLO data), or 0..K-1 without one."""
    if cfg.data.format != "yolo":
        return list(range(len(classes)))
    from aidkd.data import read_data_yaml

    data = read_data_yaml(cfg.data.root)
    missing = [c for c in classes if c not in data.names]
    if missing:
        raise ValueError(f"{data.yaml_file}: the model's classes {missing} are not in its names")
    return [data.names.index(c) for c in classes]


def is_video_source(source: str | Path | None) -> bool:
    """``--input`` names a video file (anything that is neither a folder nor a single image file)."""
    if source is None:
        return False
    p = Path(source)
    return not p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES


def source_images(folder: Path) -> list[Path]:
    """The image files of a folder ``--input``, sorted; an error when it holds none."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def check_unique_names(named: list[tuple[str, Path]]) -> None:
    """Refuse images whose output files would share a name (``a.png`` and ``a.jpg`` both write ``a.txt``): one
    prediction would silently replace the other."""
    by_name: dict[str, list[str]] = {}
    for name, path in named:
        by_name.setdefault(name, []).append(str(path))
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:
        listed = "; ".join(" and ".join(paths) for paths in clashes[:5])
        raise ValueError(f"{len(clashes)} image name(s) shared by several images, whose prediction files would "
                         f"replace each other: {listed}{' ...' if len(clashes) > 5 else ''}. Rename them, predict "
                         "them from separate folders, or write --format coco (one file for all images)")


def iter_source(source: Path):
    """(name, PIL image) pairs from a folder of images, a single image file or a video file (one per frame)."""
    from aidkd.data.images import read_image

    if source.is_dir():
        for p in source_images(source):
            yield p.stem, _as_pil(read_image(p))
        return
    if not source.exists():
        raise FileNotFoundError(f"--input not found: {source}")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        yield source.stem, _as_pil(read_image(source))
        return
    from aidkd.engine.video import iter_video_frames

    yield from iter_video_frames(source)


def _as_pil(img) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def predict_command(cfg: RunConfig, checkpoint: str | Path, out: Path, source: str | None = None,
                    draw: bool = False, score_thresh: float | None = None, fmt: str | None = None) -> int:
    """Predict on the configured val set, or on ``source`` (a folder of images, an image or a video file).

    ``score_thresh`` defaults to ``cfg.eval.score_thresh`` (0.05), the threshold ``eval`` scores with.
    ``fmt="kitti"`` writes ``out/<name>.txt`` (KITTI format, one per image or video frame
    ``<stem>_<frame:06d>``; whitespace in class names percent-encoded, ``fire%20hydrant``); ``fmt="coco"`` writes
    ``out/predictions.json``, a COCO results list (``image_id``: the COCO id for the configured val set, else the
    0-based index of the image / frame; ``category_id``: the configured json's id of the class, else its label
    1..K); ``fmt="yolo"`` writes ``out/labels/<name>.txt`` (``class cx cy w h conf``, normalised, as Ultralytics'
    ``save_txt`` with ``save_conf``; ``class``: the index in the configured data.yaml's names, else the label - 1).
    Default: the data's format for COCO and YOLO data, ``kitti`` otherwise. With ``draw``: ``out/drawn/<name>.png`` for
    images or ``out/<video stem>_boxes.mp4`` (source frame rate) for a video. Returns the number of images / frames.
    """
    from aidkd.engine.datamodule import load_records, resolve_classes
    from aidkd.eval.kitti_io import write_kitti_predictions

    fmt = fmt or default_output_format(cfg)
    if fmt not in ("kitti", "coco", "yolo"):
        raise ValueError(f"unknown prediction format {fmt!r} (expected 'kitti', 'coco' or 'yolo')")
    thresh = cfg.eval.score_thresh if score_thresh is None else float(score_thresh)
    classes, _ = resolve_classes(cfg.data)
    model, meta = load_detector(checkpoint, classes=classes)
    category_ids = _category_ids(cfg, meta["classes"]) if fmt == "coco" else None
    class_ids = _yolo_class_ids(cfg, meta["classes"]) if fmt == "yolo" else None
    if source is None:
        records = load_records(cfg.data, "val", classes)
        named = [(r.stem or Path(r.image_path).stem, r.image_path) for r in records]
        items = ((name, _load(path)) for name, path in named)
        ids = (int(r.image_id) for r in records)
    else:
        named = [(p.stem, p) for p in source_images(Path(source))] if Path(source).is_dir() else []
        items = iter_source(Path(source))
        ids = itertools.count()
    if fmt != "coco" or draw:  # one file per image, named by the image
        check_unique_names(named)
    out = claim_output_folder(out, "--out", inputs=(source, checkpoint))
    results: list[dict] = []
    drawn_dir = out / "drawn"
    writer = None
    if draw and is_video_source(source):
        from aidkd.engine.video import VideoWriter, video_fps

        writer = VideoWriter(out / (Path(source).stem + "_boxes.mp4"), fps=video_fps(source))
    n = 0
    try:
        for (name, image), image_id in zip(items, ids):
            det = detect(model, image, thresh)
            if fmt == "coco":
                results += coco_results(image_id, det, category_ids)
            elif fmt == "yolo":
                (out / "labels").mkdir(exist_ok=True)
                (out / "labels" / f"{name}.txt").write_text(
                    "".join(line + "\n" for line in yolo_lines(det, class_ids, image.size)))
            else:
                write_kitti_predictions(out / f"{name}.txt", det, meta["classes"])
            if draw:
                drawn = draw_detections(image, det, meta["classes"])
                if writer is not None:
                    writer.write(np.asarray(drawn))
                else:
                    drawn_dir.mkdir(exist_ok=True)
                    drawn.save(drawn_dir / f"{name}.png")
            n += 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if fmt == "coco":
        (out / "predictions.json").write_text(strict_json(results))
    return n


def _load(path) -> Image.Image:
    from aidkd.data.images import read_image

    return _as_pil(read_image(path))
