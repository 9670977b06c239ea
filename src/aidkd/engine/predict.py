"""``aidkd predict``: KITTI-format prediction files (15 fields + score) and, with ``--draw``, drawn images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from aidkd.engine.config import RunConfig
from aidkd.engine.model_io import load_detector

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
def detect(model: torch.nn.Module, image: Image.Image, min_size: int, max_size: int,
           score_thresh: float) -> dict:
    """Detections in the original image's pixels (the model resizes internally with its own transform)."""
    model.eval()
    tensor = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    device = next(model.parameters()).device
    pred = model([tensor.to(device)])[0]
    keep = pred["scores"] >= score_thresh
    return {k: v[keep].cpu() for k, v in pred.items()}


def is_video_source(source: str | Path | None) -> bool:
    """``--input`` names a video file (anything that is neither a folder nor a single image file)."""
    if source is None:
        return False
    p = Path(source)
    return not p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES


def iter_source(source: Path):
    """(name, PIL image) pairs from a folder of images, a single image file or a video file (one per frame)."""
    from aidkd.data.images import read_image

    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        for p in files:
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
                    draw: bool = False, score_thresh: float = 0.3) -> int:
    """Predict on the configured val set, or on ``source`` (a folder of images, an image or a video file).

    Writes ``out/<name>.txt`` (KITTI format, one per image or video frame ``<stem>_<frame:06d>``) and, with
    ``draw``, ``out/drawn/<name>.png`` for images or ``out/<video stem>_boxes.mp4`` (source frame rate) for a
    video. Returns the number of images / frames.
    """
    from aidkd.engine.datamodule import load_records, resolve_classes
    from aidkd.eval.kitti_io import write_kitti_predictions

    classes, _ = resolve_classes(cfg.data)
    model, meta = load_detector(checkpoint, classes=classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        frames = ((r.stem or Path(r.image_path).stem, r.image_path) for r in load_records(cfg.data, "val", classes))
        items = ((name, _load(path)) for name, path in frames)
    else:
        items = iter_source(Path(source))
    drawn_dir = out / "drawn"
    writer = None
    if draw and is_video_source(source):
        from aidkd.engine.video import VideoWriter, video_fps

        writer = VideoWriter(out / (Path(source).stem + "_boxes.mp4"), fps=video_fps(source))
    n = 0
    try:
        for name, image in items:
            det = detect(model, image, meta["min_size"], meta["max_size"], score_thresh)
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
    return n


def _load(path) -> Image.Image:
    from aidkd.data.images import read_image

    return _as_pil(read_image(path))
